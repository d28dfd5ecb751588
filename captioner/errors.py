"""The one exception type a user can see: the CLI prints its message and exits non-zero."""


class CaptionerError(Exception):
    """An error caused by the user's input or environment (missing file, bad model, offline...)."""

    exit_code: int = 1


class UsageProblem(CaptionerError):
    """A usage error found once files or the model are looked at (an existing output without --resume or
    --overwrite, --topk above the model's beam): one line, exit 2, nothing written."""

    exit_code = 2
