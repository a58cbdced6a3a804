"""The one exception type a user ever sees: a sentence that names the file and the problem."""


class LocalseekError(Exception):
    """Bad input or an impossible request, said in one sentence.

    The CLI prints the message and exits non-zero; library users catch it like any exception.
    """


class CheckpointError(LocalseekError):
    """A model file or folder that cannot be read as a supported checkpoint."""
