"""experiments.models: the multiscale MDEQ cell option (model.cell='mdeq_multiscale')."""

from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from experiments import models
from experiments.cli import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _config(name):
    return load_config(str(CONFIGS / f"{name}.py"))


@pytest.mark.parametrize("head", ["pool", "flatten"])
def test_multiscale_classifier_builds_and_runs(head):
    config = _config("smoke")
    config.model.cell = "mdeq_multiscale"
    config.model.features = 4
    config.model.num_groups = 2
    config.model.head = head
    config.model.head_channels = 8 if head == "flatten" else 0
    config.model.stem_stride = 2
    model = models.Classifier(config, (8, 8, 1), 10, rngs=nnx.Rngs(0))
    assert model.deq.cell.channels == (4, 8)  # default: features, then twice as many
    logits = nnx.eval_shape(lambda m: m(jnp.zeros((2, 8, 8, 1))), model)
    assert logits.shape == (2, 10)


def test_multiscale_flatten_head_needs_head_channels():
    config = _config("smoke")
    config.model.cell = "mdeq_multiscale"
    config.model.features = 4
    config.model.num_groups = 2
    config.model.head = "flatten"
    with pytest.raises(ValueError, match="head_channels"):
        models.Classifier(config, (8, 8, 1), 10, rngs=nnx.Rngs(0))


def test_multiscale_configs_differ_only_in_what_makes_the_baseline():
    deq_cfg = _config("mnist_multiscale_deq")
    unrolled = _config("mnist_multiscale_unrolled")
    assert deq_cfg.model.to_dict() == unrolled.model.to_dict()
    assert deq_cfg.model.cell == "mdeq_multiscale" and unrolled.mode == "unrolled"
    assert unrolled.reg.jac_weight == 0.0 and deq_cfg.reg.jac_weight > 0
    assert jax.tree_util.tree_leaves(deq_cfg.model.multiscale_channels) == [16, 32]


def test_multiscale_channels_is_a_field_of_every_config():
    config = load_config(str(CONFIGS / "smoke.py"), ["model.cell=mdeq_multiscale",
                                                     "model.features=4", "model.num_groups=2",
                                                     "model.multiscale_channels=(4, 6)"])
    model = models.Classifier(config, (8, 8, 1), 10, rngs=nnx.Rngs(0))
    assert model.deq.cell.channels == (4, 6)


def test_multiscale_channels_other_than_two_branches_are_a_config_error():
    from experiments.cli import ConfigError
    from experiments.configuration import validate_config

    config = load_config(str(CONFIGS / "smoke.py"), ["model.cell=mdeq_multiscale",
                                                     "model.features=4", "model.num_groups=2",
                                                     "model.multiscale_channels=(4, 8, 16)"])
    with pytest.raises(ConfigError, match=r"multiscale_channels=\(4, 8, 16\): .* two branches"):
        validate_config(config)
