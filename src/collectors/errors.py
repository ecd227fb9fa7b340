"""Errors raised while reading corpora and run folders and collecting, that a user can
act on; the CLI reports them as one line and a non-zero exit."""


class CollectError(Exception):
    """Bad input or state of a collection the user can fix; the message names the file
    and field."""


class CorpusError(CollectError):
    """A corpus file or line that cannot be used; the message names the file and line."""


class RunFolderError(CollectError):
    """A run folder that is missing, incomplete or written by another schema version."""
