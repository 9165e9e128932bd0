"""Errors a person can act on: the CLI prints the message as one line and exits non-zero."""


class UserError(Exception):
    """Something outside the code is not as it must be (an argument, a service, the schema);
    the message says what to do about it."""
