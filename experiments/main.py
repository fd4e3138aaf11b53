"""Train a DEQ (or its unrolled baseline) from a config file.

Usage::

  deq-train --config configs/digits_deq.py --workdir runs/digits_deq
  deq-train --config configs/mnist_deq.py --workdir runs/mnist_deq \
      --config.data.dir ~/data/mnist --config.solver.max_steps=20

Rerunning the same command resumes from the last checkpoint in ``--workdir``. For a multi-host
run, start the same command on every host with ``--distributed`` (it calls
``jax.distributed.initialize()``, which reads the coordinator address from the environment
on Cloud TPU / SLURM, or from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID).
"""

import logging

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the summary.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    quiet_third_party_logs()
    import jax

    if FLAGS.distributed:
        jax.distributed.initialize()
    from experiments.train import train_and_evaluate

    summary = train_and_evaluate(FLAGS.config, FLAGS.workdir)
    print(f"{summary['name']}: test accuracy {summary['test_accuracy']:.4f} after "
          f"{summary['epochs']} epochs; summary in {FLAGS.workdir}/summary.json")


def quiet_third_party_logs():
    """Orbax and TFDS log every checkpoint step at INFO through absl: keep our own lines."""
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    for name in ("absl", "orbax", "tensorflow_datasets", "jax"):
        logging.getLogger(name).setLevel(logging.WARNING)


def run():
    """Console entry point (``deq-train``)."""
    app.run(main)


if __name__ == "__main__":
    run()
