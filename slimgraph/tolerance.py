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


EXACT = Tolerance()
