"""Errors that mean "the user's input is wrong", as opposed to a bug."""


class UserError(Exception):
    """Bad input, named precisely (file, line, flag): the CLI prints it on one line and exits 2."""
