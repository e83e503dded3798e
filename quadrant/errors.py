"""Typed errors for bad user input: the CLI prints them as one line, the server maps them to JSON."""


class QuadrantError(Exception):
    """Base class: the message says what is wrong and how to fix it."""


class ModelNotFoundError(QuadrantError):
    """A model name or path that resolves to nothing."""


class ModelLoadError(QuadrantError):
    """A model file that exists but cannot be used (corrupt, truncated, unsupported)."""


class UnsupportedError(ModelLoadError):
    """A valid file whose architecture, tensor type or tokenizer quadrant does not implement."""
