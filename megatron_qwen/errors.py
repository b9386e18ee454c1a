"""Errors caused by user input (config, checkpoint, data): reported as one line, exit code 2."""

import argparse
from typing import NoReturn


class UserError(Exception):
    """Bad input; the message names the problem and the fix."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one ``error: ...`` line and exit code 2, like every other bad input
    (argparse's own prints the usage block first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message}; see {self.prog} --help\n")
