"""Errors a user can act on. The CLI prints their message and exits non-zero."""


class UserError(Exception):
    """Bad input or state that the user can fix; the message names the file and field."""


class CheckpointError(UserError):
    """A transcoder-adapter checkpoint that is missing, corrupt or not in the paper's format."""
