"""pixgen: a reproducible PixMix robustness pipeline for small images."""

__version__ = "0.1.0"


class PixgenError(Exception):
    """A user-facing error: the message is one line saying what is wrong and how to fix it."""
