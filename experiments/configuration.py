"""Checks of a training config, and the config stored in a workdir.

``validate_config`` builds the ``deq`` objects the config describes (solvers, adjoint, the
model and its DEQ layer), which check their own options, and names the config field behind
an error: ``config.solver.history=2.5: Anderson: history must be an integer ...``. Fields
that no ``deq`` object sees (dataset and optimiser names, batch sizes, epochs) are checked
here.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import jax
import ml_collections

from experiments import data as data_lib
from experiments import models
from experiments.cli import config_fields, get_field
from experiments.errors import ConfigError
from experiments.runfiles import read_json, write_json

logger = logging.getLogger(__name__)

CHOICES = {
    "data.name": data_lib.DATASETS, "mode": models.MODES, "model.cell": models.CELLS,
    "model.z_init": ("zeros", "inject"), "model.head": models.HEADS,
    "solver.name": models.SOLVERS, "solver.eval_fallback": ("", *models.SOLVERS),
    "solver.fallback": ("", *models.SOLVERS),
    "adjoint.name": models.ADJOINTS, "adjoint.fallback": ("", *models.SOLVERS),
    "adjoint.solver": models.ADJOINT_SOLVERS, "optim.name": ("adamw", "adam", "sgd"),
    "optim.schedule": ("cosine", "constant"), "train.on_nonfinite": ("stop", "skip"),
    "solver.precision": ("", "default", "high", "highest", "float32", "bfloat16",
                         "tensorfloat32"),
}
# Numbers no deq object checks: (minimum, integer only).
NUMBERS = {
    **dict.fromkeys(("model.features", "model.num_groups", "model.stem_stride",
                     "train.num_epochs", "train.batch_size", "train.eval_batch_size",
                     "train.log_every", "train.checkpoint_every", "train.keep_checkpoints"),
                    (1, True)),
    **dict.fromkeys(("model.hidden", "model.head_channels", "data.limit_train",
                     "data.limit_test", "optim.warmup_steps", "seed", "solver.eval_max_steps"),
                    (0, True)),
    **dict.fromkeys(("optim.weight_decay", "optim.grad_clip", "reg.jac_weight",
                     "solver.eval_rtol"), (0, False)),
}
# The config field behind each option of the deq objects built from a config.
SOLVER_FIELDS = {"history": "solver.history", "rtol": "solver.rtol", "atol": "solver.atol",
                 "damping": "solver.damping"}
ADJOINT_FIELDS = {"steps": "adjoint.phantom_steps", "damping": "adjoint.phantom_damping",
                  "max_steps": "adjoint.max_steps", "rtol": "adjoint.rtol"}
LAYER_FIELDS = {"max_steps": "solver.max_steps", "jac_reg_samples": "reg.jac_samples",
                "jac_reg_batch": "reg.jac_batch"}


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raise ConfigError (a ValueError) naming the first bad field of ``config``."""
    for field, value in config_fields(config.to_dict()).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"config.{field}={value!r} must be a finite number.")
    for field, options in CHOICES.items():
        if get_field(config, field) not in options:
            raise ConfigError(f"config.{field}={get_field(config, field)!r} is not one of "
                              f"{sorted(options)}.")
    for field, (minimum, integer) in NUMBERS.items():
        value = get_field(config, field)
        if (isinstance(value, bool) or not isinstance(value, int if integer else (int, float))
                or value < minimum):
            raise ConfigError(f"config.{field}={value!r} must be "
                              f"{'an integer' if integer else 'a number'} >= {minimum}.")
    damping = config.solver.get("fallback_damping", 0.0)
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not 0 <= damping < 1:
        raise ConfigError(f"config.solver.fallback_damping={damping!r} must be a number in "
                          "[0, 1).")
    if config.optim.learning_rate <= 0:
        raise ConfigError(f"config.optim.learning_rate={config.optim.learning_rate!r} must be "
                          "> 0.")
    m = config.model
    if m.cell == "mlp" and m.head != "pool":
        raise ConfigError(
            f"config.model.head={m.head!r} applies to the 'mdeq' cell only; the 'mlp' cell's "
            "head is a linear layer on its state (leave model.head='pool')."
        )
    if m.cell == "mdeq":
        for name, ch in (("model.features", m.features), ("model.hidden", m.hidden or m.features)):
            if ch % m.num_groups:
                raise ConfigError(f"config.{name}={ch} must be divisible by "
                                  f"config.model.num_groups={m.num_groups}.")
    _build_deq_objects(config)
    if config.data.name == "mnist" and not config.data.dir and not config.data.tfds_dir:
        logger.info("data.dir is empty: MNIST must already be built in the TFDS directory.")


def _build_deq_objects(config) -> None:
    """Build what the config describes; a deq error names the config field behind it."""
    from flax import nnx

    eval_solver = {**SOLVER_FIELDS, "rtol": "solver.eval_rtol"}
    eval_layer = {**LAYER_FIELDS, "max_steps": "solver.eval_max_steps"}
    for fields, build in [
        (SOLVER_FIELDS, lambda: models.make_solver(config.solver, mode=config.mode)),
        (eval_solver, lambda: models.make_solver(config.solver, mode=config.mode,
                                                 evaluation=True)),
        (ADJOINT_FIELDS, lambda: models.make_adjoint(config)),
        (LAYER_FIELDS, lambda: nnx.eval_shape(
            lambda: models.Classifier(config, (8, 8, 1), 10, rngs=nnx.Rngs(0)))),
        (eval_layer, lambda: nnx.eval_shape(
            lambda: models.Classifier(config, (8, 8, 1), 10, evaluation=True,
                                      rngs=nnx.Rngs(0)))),
    ]:
        try:
            build()
        except (TypeError, ValueError) as e:
            m = re.match(r"[\w.]+: (\w+) ", str(e))
            field = fields.get(m.group(1)) if m else None
            if field is None:
                raise ConfigError(f"config: {e}") from None
            raise ConfigError(f"config.{field}={get_field(config, field)!r}: {e}") from None


# ------------------------------------------------------------------------------------------
# The config stored in a workdir

# Fields that may change between an interrupted run and its resumption: they do not change
# what is computed. Anything else must match the config stored in the workdir.
RESUMABLE_FIELDS = {
    "train.progress_bar", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
    "train.eval_batch_size", "train.on_nonfinite", "data.dir", "data.tfds_dir",
}
# A config (stored or current) that lacks one of these fields compares as if it held this
# value: the model that a config without the field builds.
STORED_DEFAULTS = {"model.head": "pool", "model.multiscale_channels": []}


def _json_fields(config) -> dict:
    """The leaf fields of ``config`` as ``config.json`` stores them (tuples become lists)."""
    return json.loads(json.dumps(config_fields(config.to_dict())))


def check_stored_config(config, workdir: Path) -> None:
    """Refuse, with a ConfigError, to resume a run stored in ``workdir`` with a different
    config (writes nothing). Values are compared as JSON stores them."""
    path = workdir / "config.json"
    current = {**STORED_DEFAULTS, **_json_fields(config)}
    if path.exists():
        stored = {**STORED_DEFAULTS,
                  **read_json(path, "the config of the run stored in this workdir")}
        diff = sorted(
            k for k in set(stored) | set(current)
            if k not in RESUMABLE_FIELDS and stored.get(k) != current.get(k)
        )
        if diff:
            details = ", ".join(f"{k}: {stored.get(k)!r} -> {current.get(k)!r}" for k in diff)
            raise ConfigError(
                f"workdir {workdir} holds a run with a different config ({details}). Resuming "
                "would mix two experiments: use a new --workdir, or delete this one."
            )


def store_config(config, workdir: Path) -> None:
    path = workdir / "config.json"
    if jax.process_index() == 0 and not path.exists():
        write_json(path, _json_fields(config), indent=1, sort_keys=True)
