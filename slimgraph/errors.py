"""One exception type per failure class; the CLI turns each into one message and exit code 2."""

from __future__ import annotations


class SlimgraphError(Exception):
    """Base class: a failure the user can fix, reported as one clear message."""

    exit_code = 2


class ModelLoadError(SlimgraphError):
    """The model file (or torch callable) cannot be loaded safely."""


class UnsupportedOpError(SlimgraphError):
    """A node uses an operator that a pass or backend cannot handle."""


class PipelineSpecError(SlimgraphError):
    """A pass spec, recipe or option is malformed or names something unknown."""


class InputSpecError(SlimgraphError):
    """An --input shape or calibration feed does not match the model."""


class OutputExistsError(SlimgraphError):
    """The output directory exists and --force was not given."""


class BackendError(SlimgraphError):
    """A backend is unknown, unavailable, or failed to build or run."""


class VerificationError(SlimgraphError):
    """The artifact's outputs diverge from the float reference beyond tolerance."""


class DataError(SlimgraphError):
    """A data file (npz, text) is unreadable, empty, or holds values that cannot be used."""


class PartitionError(SlimgraphError):
    """A partition folder or its pipeline.json is malformed, escapes its folder, or fails its hashes."""


class CatalogueError(SlimgraphError):
    """A device catalogue (advise --devices) has a missing, mistyped or out-of-range field."""


class OutputPathError(SlimgraphError):
    """An output path cannot be written (its parent is a file, a dangling symlink, ...)."""
