"""deq: deep equilibrium models in JAX.

The core (``fixed_point``, solvers, adjoints) knows nothing of Flax; ``deq.nnx`` and
``deq.linen`` hold the layers built on it.
"""

from deq._adjoint import (
    Adjoint,
    ImplicitAdjoint,
    JacobianFreeAdjoint,
    PhantomAdjoint,
    UnrolledAdjoint,
)
from deq._fixed_point import fixed_point
from deq._linear_solve import GMRES
from deq._solution import (
    RESULTS,
    TRACE_CAP,
    BackwardStats,
    Solution,
    SolverStats,
    backward_stats,
    backward_stats_probe,
    trace_size,
    trace_stride,
)
from deq._solvers import Anderson, Broyden, FixedPointIteration, ForwardSolver
from deq._sqrt import fixed_point_sqrt

__version__ = "0.1.0"

__all__ = [
    "GMRES",
    "RESULTS",
    "Adjoint",
    "Anderson",
    "BackwardStats",
    "Broyden",
    "FixedPointIteration",
    "ForwardSolver",
    "ImplicitAdjoint",
    "JacobianFreeAdjoint",
    "PhantomAdjoint",
    "Solution",
    "TRACE_CAP",
    "SolverStats",
    "UnrolledAdjoint",
    "backward_stats",
    "backward_stats_probe",
    "fixed_point",
    "fixed_point_sqrt",
    "trace_size",
    "trace_stride",
]
