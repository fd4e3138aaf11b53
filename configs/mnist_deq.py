"""MDEQ-style conv DEQ on MNIST from local IDX files (--config.data.dir=/path/to/mnist)."""

from configs import default


def get_config():
    config = default.get_config()
    config.name = "mnist_deq"
    config.data.name = "mnist"
    config.model.cell = "mdeq"
    config.model.features = 16
    config.model.num_groups = 4
    config.model.stem_stride = 2  # 28x28 -> 14x14
    config.model.z_init = "zeros"
    config.model.head_channels = 64
    # The head sees every position of the 7x7x64 map; global average pooling (model.head=
    # 'pool') would throw away where the strokes are.
    config.model.head = "flatten"
    config.solver.max_steps = 12
    config.solver.rtol = 1e-3
    config.solver.eval_max_steps = 30
    # The stabiliser (the Jacobian penalty with its adaptive weight, on 32 samples of each
    # batch) is the default's. Plain iteration for the adjoint needs no history buffers.
    config.adjoint.solver = "iteration"
    config.adjoint.max_steps = 25
    # With the default's adjoint fallback (plain iteration, up to 25 more steps): on the
    # untrained cell 18 of the first 40 backward solves (seed 1) needed more than 25 steps.
    config.optim.learning_rate = 2e-3
    config.optim.warmup_steps = 200
    config.train.num_epochs = 8
    config.train.batch_size = 128
    config.train.log_every = 20
    config.train.checkpoint_every = 100
    return config
