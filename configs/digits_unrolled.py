"""Unrolled baseline of the digits DEQ: the same model and cell, backprop through a fixed
number of plain iterations equal to the DEQ's forward step budget."""

from configs import default


def get_config():
    config = default.get_config()
    config.name = "digits_unrolled"
    config.mode = "unrolled"
    config.solver.name = "iteration"
    config.solver.eval_max_steps = 0  # evaluate with the same unrolled depth it trained with
    config.reg.jac_weight = 0.0  # a DEQ remedy; plain backprop needs none
    return config
