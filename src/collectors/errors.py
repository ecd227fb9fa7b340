"""Errors raised while reading corpora and run folders."""

from adapters.errors import UserError


class CorpusError(UserError):
    """A corpus file or line that cannot be used; the message names the file and line."""


class RunFolderError(UserError):
    """A run folder that is missing, incomplete or written by another schema version."""
