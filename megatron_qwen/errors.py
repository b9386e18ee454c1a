"""Errors caused by user input (config, checkpoint, data): reported as one line, exit code 2."""


class UserError(Exception):
    """Bad input; the message names the problem and the fix."""
