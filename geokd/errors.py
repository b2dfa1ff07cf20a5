"""The one exception type for user errors.

A `GeokdError` says what was wrong, the value received and how to fix it, in one line. The CLI
prints it without a traceback and exits with status 2; library callers can catch it (it is a
`ValueError`). Bugs are never wrapped in it: they keep raising normally.
"""

from __future__ import annotations


class GeokdError(ValueError):
    """A problem with the user's input (path, option, shape, value), not a bug in geokd."""
