"""How far an artifact may move the outputs from the float reference: what passes declare and
verification enforces."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class Tolerance:
    """How far a pass may move the outputs, measured against the float reference.

    ``max_rel_err`` is max |out - ref| / max |ref| over each output; ``min_cosine`` is the cosine
    similarity of the flattened outputs. Exact rewrites keep float-reassociation slack only.
    """

    max_rel_err: float = 1e-4
    min_cosine: float = 0.9999
    min_top1: float = 1.0

    def loosest(self, other: Tolerance) -> Tolerance:
        return Tolerance(
            max(self.max_rel_err, other.max_rel_err),
            min(self.min_cosine, other.min_cosine),
            min(self.min_top1, other.min_top1),
        )


# The presets passes declare; a pipeline is verified against the loosest of its passes'.
EXACT = Tolerance()
# Dead Relu channels are exact on the calibration data, not on every input.
CALIBRATED = Tolerance(max_rel_err=1e-2, min_cosine=0.999, min_top1=0.99)
INT8 = Tolerance(max_rel_err=0.25, min_cosine=0.99, min_top1=0.97)
INT4 = Tolerance(max_rel_err=0.5, min_cosine=0.97, min_top1=0.9)
# Importance pruning, sparsity and weight sharing before recovery training promise outputs of the
# right shape, not accuracy (their cost is measured in benchmarks/); heal moves every weight and
# is checked by its own held-out score before and after (a heal that lowers it is undone).
# Verification records the metrics; nothing is enforced.
LOSSY = Tolerance(max_rel_err=10.0, min_cosine=0.0, min_top1=0.0)
# Binary weights without retraining keep little of a model's function: recorded, not enforced.
BINARY = Tolerance(max_rel_err=1e9, min_cosine=-1.0, min_top1=0.0)
