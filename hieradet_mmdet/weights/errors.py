"""The one error type of weight loading."""


class CheckpointError(RuntimeError):
    """A checkpoint cannot be had, read safely, or loaded into the model; the message names the
    file and says what to do."""
