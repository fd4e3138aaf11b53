"""Unrolled baseline of the multiscale MNIST DEQ: same model and cell, 16 unrolled steps."""

from configs import mnist_multiscale_deq, mnist_unrolled


def get_config():
    config = mnist_multiscale_deq.get_config()
    baseline = mnist_unrolled.get_config()  # what makes the MNIST baseline a baseline
    config.name = "mnist_multiscale_unrolled"
    config.mode = baseline.mode
    config.solver.name = baseline.solver.name
    config.solver.eval_max_steps = baseline.solver.eval_max_steps
    config.reg.jac_weight = baseline.reg.jac_weight
    # 16 unrolled steps, about the DEQ's mean training solve (its budget of 24 is a cap that
    # only the first steps reach; unrolled backprop always runs all of its steps).
    config.solver.max_steps = 16
    return config
