"""Why a stateful layer (BatchNorm, Dropout, spectral norm, random numbers, variables a call
updates) cannot live inside a fixed-point map, and the error that says so by name with the
alternative."""

from __future__ import annotations

# Why each kind of stateful layer cannot live inside a fixed-point map, and what to use instead.
_BATCHNORM = (
    "it normalises with statistics of the current batch and updates running statistics on "
    "every call, i.e. on every solver iteration; it also couples the samples of a batch, "
    "while the batched solve treats them as independent. Use GroupNorm or LayerNorm inside "
    "the cell (and weight normalisation on its linear maps/convolutions), or put BatchNorm "
    "outside the DEQ layer."
)
_DROPOUT = (
    "it would draw a new mask on every solver iteration, so the map changes from step to step "
    "and has no fixed point. Apply dropout outside the DEQ layer (to its input or output)."
)
_SPECTRALNORM = (
    "it runs and stores a power iteration on every call, i.e. on every solver iteration. Use "
    "weight normalisation instead (deq.cells: weight_norm=True), or normalise the weights "
    "once outside the solve."
)
_RNG = (
    "it draws random numbers on every call, so the map changes from step to step and has no "
    "fixed point. Keep randomness outside the DEQ layer."
)
_MUTABLE = (
    "a variable that the cell updates would be updated on every solver iteration, with "
    "values of iterates that are not the fixed point (and the solve cannot keep the "
    "updates). Keep only parameters in the cell: use GroupNorm or LayerNorm instead of "
    "BatchNorm and weight normalisation instead of spectral norm; keep counters and running "
    "statistics outside the DEQ layer."
)
_WEIGHTNORM = (
    "Flax's nnx.WeightNorm normalises the wrapped layer's kernel in place on every call, i.e. "
    "it writes the cell's parameters at every solver iteration. Use "
    "deq.cells.nnx.WeightNorm(layer) instead: the same weight normalisation (g v / |v|), "
    "computed on each call without writing the kernel."
)
REASONS = {
    "WeightNorm": _WEIGHTNORM,
    "BatchNorm": _BATCHNORM,
    "Dropout": _DROPOUT,
    "SpectralNorm": _SPECTRALNORM,
    "rng": _RNG,
    "mutable": _MUTABLE,
}


class StatefulCellError(ValueError):
    """A cell holds or uses state that changes on each call (see :func:`stateful_error`)."""


def stateful_error(layer: str, what: str, where: str, reason: str) -> StatefulCellError:
    """The error raised when a cell holds a layer with state that changes on each call."""
    return StatefulCellError(
        f"{layer}: the cell contains {what} at {where!r}, which cannot be used inside a "
        f"fixed-point solve: {REASONS[reason]}"
    )
