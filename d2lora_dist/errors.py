"""The project's one error type for bad input, so that real bugs keep their traceback.

Everything a user can fix (the experiment file, a dataset, an adapter, a plan, a predictions
file, an asset, an environment setting) raises an InputError (or a subclass) whose message
names the key, the file, the column or the row. The CLI prints that message and exits 2;
any other exception is a bug and surfaces with its traceback.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad input: the message says what is wrong and where."""


class UnknownName(InputError, KeyError):
    """A name that is not in a registry (dataset, method, cell); the message lists the valid ones."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class MissingInput(InputError, FileNotFoundError):
    """A file or artifact an entry needs does not exist yet; the message names the command that makes it."""
