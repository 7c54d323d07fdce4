"""The one base class of every user-facing error.

A `RaymollError` is a mistake the user can fix (a bad setting, a missing or damaged file, a
checkpoint that does not fit the data); its message is one paragraph naming what was wrong and
what would be right. `raymoll.cli.main` prints it without a traceback and exits 2. Anything else
that escapes is a bug and keeps its traceback.

Pure Python (no torch, Ray or FFCV), so every module can import it cheaply.
"""
from __future__ import annotations


class RaymollError(ValueError):
    """A user mistake: the message says what was wrong and what would be right."""
