"""Train a DEQ (or its unrolled baseline) from a config file.

usage: deq-train --config FILE --workdir DIR [--config.FIELD=VALUE ...] [--distributed]

  deq-train --config configs/digits_deq.py --workdir runs/digits_deq
  deq-train --config configs/mnist_deq.py --workdir runs/mnist_deq \\
      --config.data.dir=~/data/mnist --config.solver.max_steps=20

Rerunning the same command resumes from the last checkpoint in --workdir (after Ctrl-C too);
a second run on a workdir that a run holds is refused. Prints one line per epoch and a final
summary (also in DIR/summary.json, with per-epoch records in DIR/metrics.jsonl). Exit status:
0 done, 1 the run failed (non-finite loss, damaged checkpoint or dataset, workdir held by
another run), 2 bad command line, config, data or run folder, 130 interrupted.

Multi-process (data parallel): start the same command in every process with --distributed.
Under SLURM (srun), Open MPI or on Cloud TPU, JAX finds the processes itself; elsewhere give
--coordinator_address HOST:PORT (process 0's), --num_processes N and --process_id I, or the
environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID. Every
process reads the data and trains on its share of each global batch; process 0 writes the
metrics, the summary and the console lines (the workdir must be shared).
"""

import os
import sys

from experiments import cli
from experiments.errors import EXIT_INTERRUPTED

PROG = "deq-train"
cli.require_experiments_extra(PROG)  # before the imports below, which need it

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the summary.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-process).")
flags.DEFINE_string("coordinator_address", None, "With --distributed: process 0's HOST:PORT.")
flags.DEFINE_integer("num_processes", None, "With --distributed: the number of processes.")
flags.DEFINE_integer("process_id", None, "With --distributed: this process's index.")

FLAGS_HELP = """flags:
  --config FILE         an ml_collections config file (configs/*.py), required
  --workdir DIR         checkpoints, metrics.jsonl, summary.json; an existing run resumes
  --distributed         multi-process data parallelism (jax.distributed.initialize())
  --coordinator_address HOST:PORT, --num_processes N, --process_id I
                        with --distributed, where no cluster (SLURM, MPI, TPU) says them
  --config.FIELD=VALUE  override one config field (repeatable)
  --help                this help; --helpfull lists absl's own flags too"""


def parse_flags(argv):
    """absl's flag parsing, with our --help and short errors instead of tracebacks."""
    if cli.wants_help(argv[1:]) or "--helpfull" in argv[1:]:
        print(__doc__.strip(), FLAGS_HELP, cli.OVERRIDE_HELP,
              cli.fields_help(cli.config_path_in(argv)), sep="\n\n")
        if "--helpfull" in argv[1:]:
            print("\nall flags, absl's included:\n" + FLAGS.get_help())
        sys.exit(0)
    path = cli.config_path_in(argv)
    try:
        if path is None:
            raise cli.ConfigError("--config FILE is required (e.g. --config configs/smoke.py); "
                                  "see --help.")
        if not any(a == "--workdir" or a.startswith("--workdir=") for a in argv):
            raise cli.ConfigError("--workdir DIR is required; see --help.")
        cli.check_override_fields(cli._base_config(path), cli.override_fields(argv), path)
        with cli.config_imports(path):
            rest = FLAGS(argv)
    except cli.ConfigError as e:
        cli.fail(PROG, str(e))
    except flags.Error as e:
        cli.fail(PROG, f"{e} (see --help)")
    if len(rest) > 1:
        cli.fail(PROG, f"unexpected arguments {rest[1:]}; overrides are written "
                       "--config.FIELD=VALUE (see --help).")
    return rest


def main(argv):
    del argv
    cli.setup_console()
    try:
        import jax

        if FLAGS.distributed:
            initialize_distributed()
        elif any(v is not None for v in (FLAGS.coordinator_address, FLAGS.num_processes,
                                         FLAGS.process_id)):
            cli.fail(PROG, "--coordinator_address, --num_processes and --process_id go with "
                           "--distributed; add it (see --help).")
        from experiments.train import convergence_report, train_and_evaluate

        with cli.short_errors(PROG):
            summary = train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except KeyboardInterrupt as e:  # Ctrl-C: one line, not orbax's and asyncio's tracebacks
        step, saved = getattr(e, "step", None), getattr(e, "checkpoint", None)
        if step is None:  # before the run had restored its checkpoint, if it has one
            told = "interrupted before training; rerun the same command to run (or resume) it"
        elif saved:
            told = (f"interrupted at step {step}; rerun the same command to resume from the "
                    f"checkpoint of step {saved}")
        else:
            told = (f"interrupted at step {step}, before the first checkpoint: rerunning the "
                    "same command starts over")
        print(f"{PROG}: {told}.", file=sys.stderr, flush=True)
        sys.stdout.flush()
        # Skip the shutdown, where orbax/TensorStore threads can still be busy.
        os._exit(EXIT_INTERRUPTED)
    if jax.process_index() != 0:
        return
    print(f"{summary['name']}: test accuracy {summary['test_accuracy']:.4f} after "
          f"{summary['epochs']} epochs; summary in {FLAGS.workdir}/summary.json")
    print(convergence_report(summary))


def initialize_distributed():
    """``jax.distributed.initialize`` from the flags, else the environment, else the cluster
    JAX detects (SLURM, Open MPI, Cloud TPU); CPU processes talk over gloo."""
    import logging

    import jax

    def env_int(name):
        value = os.environ.get(name)
        if value is None:
            return None
        if not value.strip().isdigit():
            cli.fail(PROG, f"{name}={value!r} is not a non-negative integer.")
        return int(value)

    address = FLAGS.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    num = FLAGS.num_processes if FLAGS.num_processes is not None \
        else env_int("JAX_NUM_PROCESSES")
    pid = FLAGS.process_id if FLAGS.process_id is not None else env_int("JAX_PROCESS_ID")
    if num is not None and pid is not None and not 0 <= pid < num:
        cli.fail(PROG, f"--process_id={pid} must be in [0, {num}) for --num_processes={num}.")
    if not os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address=address, num_processes=num,
                                   process_id=pid)
    except (ValueError, TypeError) as e:
        cli.fail(PROG, f"--distributed: {e} No cluster (SLURM, Open MPI, Cloud TPU) was "
                       "found to say it: pass --coordinator_address HOST:PORT, --num_processes "
                       "N and --process_id I (see --help).")
    except RuntimeError as e:  # e.g. the coordinator cannot be reached
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"{PROG}: --distributed: could not join the other processes "
              f"({first[:300]}). Check that every process was started with the same "
              "coordinator address and process count.", file=sys.stderr)
        sys.exit(1)
    if jax.process_index() != 0:  # one process speaks for the run
        logging.getLogger("experiments").setLevel(logging.WARNING)


def run():
    """Console entry point (``deq-train``)."""
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
