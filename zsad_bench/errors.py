"""The one exception type the CLI turns into a one-line message (no traceback)."""


class ZsadError(Exception):
    """A user-facing error: bad input, missing file or weights, unsupported combination.

    The message must be a single line naming the offending file/option and how to fix it.
    """


class DataError(ZsadError):
    """A dataset problem (layout, missing/unreadable file, bad mask)."""
