"""Unrolled baseline of the MNIST DEQ: same model and cell, the same forward step budget."""

from configs import mnist_deq


def get_config():
    config = mnist_deq.get_config()
    config.name = "mnist_unrolled"
    config.mode = "unrolled"
    config.solver.name = "iteration"
    config.solver.eval_max_steps = 0
    config.reg.jac_weight = 0.0  # a DEQ remedy; plain backprop needs none
    return config
