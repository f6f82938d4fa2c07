"""Errors that carry a message meant for the user (the CLI prints them as one line)."""


class OvssError(Exception):
    """Base class of every error whose message is a complete instruction for the user."""


class WeightsNotFoundError(OvssError):
    """A checkpoint is needed but is not on disk and cannot be downloaded."""


class StoreError(OvssError):
    """A store is missing, malformed, or does not hold what was asked for."""


class ProvenanceMismatchError(StoreError):
    """A feature set exists but was made with other settings than the caller requires."""


class ImageReadError(OvssError):
    """An image file could not be decoded."""
