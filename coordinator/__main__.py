"""`python -m coordinator ARGS` is `fedlm coordinator ARGS`."""

from __future__ import annotations

import sys

from edge_sdk.cli import main

if __name__ == "__main__":
    sys.exit(main(["coordinator", *sys.argv[1:]]))
