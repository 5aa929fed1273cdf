"""User-facing errors: a message that names the file or key and the fix, printed without a traceback."""


class LifelogError(ValueError):
    """Base of every error the CLI reports as `error: ...` with exit code 2."""


USER_ERRORS = (LifelogError,)
