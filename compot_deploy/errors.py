"""User-facing errors: the CLI prints `error: <message>` on one line and exits non-zero."""


class CompotError(Exception):
    """Bad input or a condition the user must fix; its message is one clear line."""


class CheckFailed(CompotError):
    """An artifact failed a check (the parity gate, a package's checksums): exit code 3, the artifact stays."""


class GateFailed(CheckFailed):
    """The exported model does not match the PyTorch model within the thresholds."""


class VerifyFailed(CheckFailed):
    """A package file does not match its manifest, or the package does not reproduce its stored sample."""
