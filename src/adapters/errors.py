"""Errors of the model side that a user can act on: a checkpoint, tokenizer or output
path they gave that cannot be used. The CLI reports them as one line and a non-zero exit
(``labeler.errors.USER_ERRORS``)."""


class AdapterError(Exception):
    """A model-side input or output the user can fix; the message names the file."""


class CheckpointError(AdapterError):
    """A transcoder-adapter checkpoint that is missing, corrupt or not in the paper's format."""
