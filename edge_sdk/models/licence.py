"""Classify a model licence string (GGUF `general.license`) for federation policies.

Classes:
- `permissive`: OSI-style licences with no use restrictions (Apache-2.0, MIT, BSD, ...);
- `open-weights-restricted`: weights are downloadable but the licence restricts use or
  redistribution (Gemma terms, Llama community licences, OpenRAIL, non-commercial CC, ...);
- `unknown`: missing or unrecognised; a cautious policy refuses it.
"""

from __future__ import annotations

import re
from enum import Enum


class LicenceClass(str, Enum):
    PERMISSIVE = "permissive"
    RESTRICTED = "open-weights-restricted"
    UNKNOWN = "unknown"


# Normalised SPDX-like ids (lower case, '_' and ' ' -> '-').
_PERMISSIVE = {
    "apache-2.0",
    "apache2",
    "apache-2",
    "mit",
    "bsd",
    "bsd-2-clause",
    "bsd-3-clause",
    "bsd-3-clause-clear",
    "isc",
    "unlicense",
    "cc0-1.0",
    "cc-by-4.0",
    "cc-by-3.0",
    "mpl-2.0",
    "zlib",
    "bsl-1.0",
    "postgresql",
    "wtfpl",
    "afl-3.0",
    "artistic-2.0",
    "ecl-2.0",
    "odc-by",
    "pddl",
    "openmdw-1.0",
}
# Prefixes of restricted-use licences (model-specific terms and use-restricted families).
_RESTRICTED_PREFIXES = (
    "gemma",
    "llama",
    "llama2",
    "llama3",
    "llama-3",
    "llama-2",
    "openrail",
    "bigscience",
    "creativeml-openrail",
    "bigcode-openrail",
    "cc-by-nc",
    "cc-by-nd",
    "deepseek",
    "tongyi-qianwen",
    "qwen",
    "falcon",
    "apple-ascl",
    "nvidia-open-model",
    "health-ai",
    "intel-research",
    "lgpl-lr",
    "c-uda",
    "mistral-research",
    "mnpl",
    "aml",
)


def normalise(licence: str) -> str:
    return re.sub(r"[\s_]+", "-", licence.strip().lower())


def classify(licence: str | None) -> LicenceClass:
    """The class of a licence id; `None`, empty or unrecognised ids are `unknown`."""
    if not licence:
        return LicenceClass.UNKNOWN
    lid = normalise(licence)
    if lid in _PERMISSIVE:
        return LicenceClass.PERMISSIVE
    if lid.startswith(_RESTRICTED_PREFIXES):
        return LicenceClass.RESTRICTED
    return LicenceClass.UNKNOWN


def parse_policy(refused: str | list[str] | tuple[str, ...] | None) -> frozenset[LicenceClass]:
    """Licence classes a policy refuses, from a comma list like
    `"unknown,open-weights-restricted"`."""
    if refused is None:
        return frozenset()
    items = refused.split(",") if isinstance(refused, str) else list(refused)
    out: set[LicenceClass] = set()
    for item in (i.strip() for i in items):
        if not item:
            continue
        try:
            out.add(LicenceClass(item))
        except ValueError:
            valid = ", ".join(c.value for c in LicenceClass)
            raise ValueError(f"unknown licence class {item!r}; expected one of {valid}") from None
    return frozenset(out)
