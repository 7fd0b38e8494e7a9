"""Errors a user can cause by pointing the library at the wrong files."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked: missing, corrupt, or not matching the model."""
