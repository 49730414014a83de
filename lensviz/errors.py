"""Errors lensviz raises on bad input: one base class, so callers can catch everything at once."""


class LensvizError(ValueError):
    """Bad input to lensviz. The message says what was wrong and what is allowed."""


class UnsupportedModelError(LensvizError):
    """The model's architecture has no lensviz adapter."""
