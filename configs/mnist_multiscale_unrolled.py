"""Unrolled baseline of the multiscale MNIST DEQ: same model and cell, same forward budget."""

from configs import mnist_multiscale_deq, mnist_unrolled


def get_config():
    config = mnist_multiscale_deq.get_config()
    baseline = mnist_unrolled.get_config()  # what makes the MNIST baseline a baseline
    config.name = "mnist_multiscale_unrolled"
    config.mode = baseline.mode
    config.solver.name = baseline.solver.name
    config.solver.eval_max_steps = baseline.solver.eval_max_steps
    config.reg.jac_weight = baseline.reg.jac_weight
    return config
