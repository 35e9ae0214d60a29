"""One exception hierarchy for everything subfit_fx raises on purpose.

`SubfitError` subclasses are *user errors*: their message is one line that names the problem
and the fix, and the CLI prints it without a traceback and exits with code 2. Anything else
that escapes is a bug.
"""

from __future__ import annotations

__all__ = [
    "CalibrationError",
    "CaptureError",
    "InputError",
    "ModelLoadError",
    "NoBranchesError",
    "NonFiniteError",
    "OutputExistsError",
    "RecipeMismatchError",
    "SubfitError",
    "ValidationError",
]


class SubfitError(Exception):
    """Base class of every error that is the user's to fix (CLI: one line, exit code 2)."""


class InputError(SubfitError, ValueError):
    """An argument or option has a value that cannot work (sparsity out of range, unknown method...)."""


class ModelLoadError(SubfitError):
    """A model path is missing, is not a model directory, or holds unreadable weights."""


class CaptureError(SubfitError):
    """torch.export could not capture the model."""


class NoBranchesError(SubfitError):
    """The captured graph has no residual branches to compress."""


class CalibrationError(SubfitError):
    """Calibration data is unusable (empty, too short) or produced non-finite statistics."""


class NonFiniteError(SubfitError):
    """A result to be written (a metric, a score) is NaN or infinite, which JSON cannot hold."""


class RecipeMismatchError(SubfitError):
    """A recipe does not match the model it is applied to (labels or shapes differ)."""


class ValidationError(SubfitError):
    """An exported artifact failed its numerical check against torch."""


class OutputExistsError(SubfitError, FileExistsError):
    """The output path exists and --force was not given."""
