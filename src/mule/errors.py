"""One exception type for every error a user can fix, and a helper that suggests the nearest name."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class MuleError(Exception):
    """An error caused by the user's input (config, files, options). The CLI prints it without a traceback."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return ' Did you mean X?' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" Did you mean {close[0]!r}?" if close else ""


def unknown(kind: str, name: str, choices: Iterable[str]) -> MuleError:
    """An error for an unknown method, option or benchmark, naming the nearest valid one."""
    choices = sorted(choices)
    return MuleError(f"unknown {kind} {name!r}.{did_you_mean(name, choices)} Valid: {', '.join(choices)}")
