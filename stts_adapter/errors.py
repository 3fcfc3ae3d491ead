"""Exceptions raised by stts_adapter.

Every error is a `ValueError` or `TypeError` subclass, so code that already guards transformers or PEFT calls
with those keeps working, and every message says what to do next.
"""

from __future__ import annotations


class STTSConfigError(ValueError):
    """An `STTSConfig` field holds a value outside its allowed range."""


class UnsupportedModelError(TypeError):
    """`apply_stts` was given a model that no registered architecture entry recognises."""


class AdapterLoadError(ValueError):
    """A saved STTS adapter cannot be loaded onto the given base model (missing, corrupt or mismatched)."""


class STTSInputError(ValueError):
    """A batch passed to an STTS model is inconsistent (e.g. placeholders that do not match the video grid)."""
