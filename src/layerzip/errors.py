"""User-facing errors: the CLI prints their message on one line and exits with code 2."""


class LayerzipError(Exception):
    """Bad input. The message says what is wrong and what to do."""
