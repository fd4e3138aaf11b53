"""One warning when a layer's training solves keep failing: the solves are counted on the
host, through a callback that runs only when a solve did not converge (effect-free:
:mod:`deq._host`)."""

from __future__ import annotations

import functools
import warnings
from typing import Any

import numpy as np

from deq._host import report_unless
from deq._solution import RESULTS


class UnconvergedWarning(UserWarning):
    """A DEQ layer's training solves keep stopping before they converge."""


# Unconverged training solves seen so far in this process, per (layer class, cell class,
# threshold): the warning is shown once per process for each such kind of layer.
unconverged_counts: dict[tuple, int] = {}


def watch_unconverged(options: Any, cell_name: str, stats: Any, z: Any) -> Any:
    """``z`` unchanged in value, with unconverged training solves counted on the host; no
    callback when the solve converged (under ``vmap`` both branches run, so the host checks
    ``converged`` too). An effect-free callback (:func:`deq._host.report_unless`): a jitted
    training step keeps JAX's fast dispatch path."""
    key = (options.layer, cell_name, options.warn_after)
    report = functools.partial(count_unconverged, key, options.max_steps)
    return report_unless(stats.converged, report,
                         (stats.converged, stats.result, stats.rel_residual, stats.num_steps), z)


def count_unconverged(key: tuple, max_steps: int, converged, result, rel_residual,
                       num_steps) -> None:
    converged = np.asarray(converged)
    if converged.all():
        return
    layer, cell_name, threshold = key
    count = unconverged_counts[key] = unconverged_counts.get(key, 0) + 1
    if count != threshold:
        return
    worst = int(np.argmax(np.asarray(rel_residual).reshape(-1)))
    result = int(np.asarray(result).reshape(-1)[worst])
    rel = float(np.asarray(rel_residual).reshape(-1)[worst])
    steps = int(np.asarray(num_steps).reshape(-1)[worst])
    warnings.warn(
        f"{layer} with cell {cell_name}: {count} training solves have stopped without "
        f"converging (the latest: {RESULTS.describe(result)}, relative residual {rel:.1e} "
        f"after {steps} of max_steps={max_steps} steps). The model then trains on points "
        f"that are not equilibria, and its gradients are inexact. Things to try: a stronger "
        f"Jacobian stabiliser (jac_reg_samples >= 1 with jac_reg_weight=1.0, or "
        f"deq.regularization.AdaptiveWeight(max_weight=10.0)); {_cell_advice(cell_name)}"
        f"a larger max_steps; solver=deq.Anderson() if another solver is used. Shown "
        f"once; the layer's stats report every solve.",
        UnconvergedWarning,
        stacklevel=2,
    )


# The package's cells that are already weight-normalised, with per-sample GroupNorm.
_NORMALISED_CELLS = ("MDEQCell", "MultiscaleMDEQCell")


def _cell_advice(cell_name: str) -> str:
    """Advice on the cell itself, unless it is one of the package's normalised cells."""
    if cell_name.rsplit(".", 1)[-1] in _NORMALISED_CELLS:
        return ""
    return ("weight normalisation of the cell's linear maps/convolutions and GroupNorm in "
            "the cell; ")
