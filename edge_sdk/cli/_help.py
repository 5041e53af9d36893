"""`--help` that shows every default: argparse's defaults formatter, minus its noise."""

from __future__ import annotations

import argparse


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to an option's help, unless the help already says its default
    in words ("default: ...", e.g. for an environment variable) or it is an off-by-default flag."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default:" in text or "%(default)" in text:
            return text
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)
