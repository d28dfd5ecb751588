"""The one exception type a user can see: the CLI prints its message and exits non-zero."""


class CaptionerError(Exception):
    """An error caused by the user's input or environment (missing file, bad model, offline...)."""

    exit_code: int = 1


class OutputExists(CaptionerError):
    """An output that exists, named without --resume or --overwrite: a usage error (nothing was run)."""

    exit_code = 2
