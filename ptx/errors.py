"""The one exception type for user errors, and "did you mean" suggestions."""

import difflib


class PtxError(Exception):
    """A user error: bad input, a missing file, a mismatch. The CLI prints it on one line and exits 2."""


class SweepInterrupted(KeyboardInterrupt):
    """A sweep stopped by Ctrl-C or SIGTERM; resumable (the message names the `ptx resume` command)."""


def suggest(name: str, choices) -> str:
    """Return "; did you mean 'x'?" for the closest choice, or "" when nothing is close."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else ""
