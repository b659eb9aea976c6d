"""Errors that mean "the user's input is wrong" (exit code 2), as opposed to a bug or a crash (1)."""


class InputError(ValueError):
    """Bad config or input data. The message names the key, the file or the folder."""
