"""User-facing errors: the CLI prints `error: <message>` on one line and exits non-zero."""


class CompotError(Exception):
    """Bad input or a condition the user must fix; its message is one clear line."""
