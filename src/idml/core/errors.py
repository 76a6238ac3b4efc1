"""The one base class of idml's own errors.

Every error idml raises on purpose (bad input, a damaged file, a missing optional package) is
an :class:`IdmlError`: a ``ValueError`` whose message names the file, field or parameter and
what to do. Library messages speak of parameters (``data_root``, ``batch_size``); the CLI
maps them to its flags (:func:`idml.cli.main`).
"""

from __future__ import annotations


class IdmlError(ValueError):
    """A problem with what idml was given; the message says which input and what to do."""


class ConfigError(IdmlError):
    """A run configuration that cannot work; the message names the field."""


class CheckpointError(IdmlError):
    """A checkpoint file that cannot be used; the message names the file."""
