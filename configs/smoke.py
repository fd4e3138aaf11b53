"""Tiny end-to-end config for tests: a few steps on a slice of the digits."""

from configs import default


def get_config():
    config = default.get_config()
    config.name = "smoke"
    config.data.limit_train = 96
    config.data.limit_test = 40
    config.model.features = 16
    config.solver.max_steps = 8
    config.solver.eval_max_steps = 10
    config.adjoint.max_steps = 8
    config.optim.warmup_steps = 2
    config.train.num_epochs = 2
    config.train.batch_size = 16
    config.train.eval_batch_size = 32
    config.train.log_every = 2
    config.train.checkpoint_every = 4
    config.train.progress_bar = False
    return config
