"""Rerun a result set from a clean checkout and write what the README shows.

Usage::

  python -m experiments.reproduce digits                  # 5 seeds x (DEQ, unrolled), ~5 min
  python -m experiments.reproduce mnist --mnist-dir DIR   # 3 seeds x (DEQ, unrolled), 1 epoch
  python -m experiments.reproduce mnist_multiscale --mnist-dir DIR  # 1 seed, 200-step runs
  python -m experiments.reproduce stale                   # list result sets to rerun
  python -m experiments.reproduce readme                  # rewrite the README's results block

A set ``S`` is written to ``experiments/results/S/``: ``seeds.md`` / ``seeds.json`` (per-seed
accuracies, mean +- standard deviation, the paired DEQ - unrolled difference, memory, time,
solver steps), ``compute_accuracy.png`` / ``.json`` (test accuracy and equilibrium residual
against the number of forward solver steps at inference, DEQ and unrolled), ``solvers.md`` /
``.json`` (steps to a relative residual of 1e-4 on the trained DEQ's cell for plain iteration,
Anderson and Broyden) and ``provenance.json`` (the commit, whether the tree was clean, the
command, the machine, versions, the date). Training runs go to ``--workdir`` (default
``runs/reproduce``) and resume if interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from experiments.provenance import RESULTS, machine_name, provenance, stale_sets
from experiments.readme_results import update_readme
from experiments.seeds import (
    DEFAULT_SEEDS,
    SET_OVERRIDES,
    SETS,
    WITH_CURVES,
    _train,
    budget_check,
    compute_accuracy,
    solver_steps,
    solvers_markdown,
    write_seed_tables,
)

# ------------------------------------------------------------------------------------------
# Command line


def run_set(name: str, seeds: int, workdir: Path, overrides: list[str], command: list[str],
            out: Path | None = None):
    prov = provenance(command)
    if prov["dirty"]:
        print("warning: the code has uncommitted changes; this set will be marked dirty "
              "(stale) until rerun from a clean commit.", file=sys.stderr)
    out = out or RESULTS / name
    out.mkdir(parents=True, exist_ok=True)
    deq_cfg, unrolled_cfg = SETS[name]
    runs = {"deq": [], "unrolled": []}
    overrides = [*SET_OVERRIDES.get(name, []), *overrides]
    for seed in range(seeds):
        runs["deq"].append(_train(deq_cfg, seed, workdir / name, overrides))
        runs["unrolled"].append(_train(unrolled_cfg, seed, workdir / name, overrides))
    machine_str = machine_name(prov["machine"])
    print("== equilibrium check: the DEQs again with more evaluation steps", flush=True)
    print(write_seed_tables(out, runs, machine_str, budget_check(runs["deq"])), flush=True)
    if name not in WITH_CURVES:
        (out / "provenance.json").write_text(json.dumps(prov, indent=1) + "\n")
        print(f"\nwrote {out}")
        return
    print("== compute-accuracy curves", flush=True)
    compute_accuracy(runs, out, machine_str)
    print("== forward solvers on the trained cells", flush=True)
    solvers = [solver_steps(wd) for wd in runs["deq"]]
    (out / "solvers.json").write_text(json.dumps(solvers, indent=1))
    smd = solvers_markdown(solvers, machine_str)
    (out / "solvers.md").write_text(smd + "\n")
    print(smd)
    (out / "provenance.json").write_text(json.dumps(prov, indent=1) + "\n")
    print(f"\nwrote {out}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="python -m experiments.reproduce", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("set", choices=[*SETS, "stale", "readme"])
    parser.add_argument("--seeds", type=int, default=None,
                        help="number of seeds, 0..N-1 (default: " + ", ".join(
                            f"{n} {name}" for name, n in DEFAULT_SEEDS.items()) + ")")
    parser.add_argument("--workdir", type=Path, default=Path("runs/reproduce"),
                        help="where the training runs go (default runs/reproduce)")
    parser.add_argument("--mnist-dir", default=os.environ.get("DEQ_MNIST_DIR", ""),
                        help="folder with the MNIST IDX files (default $DEQ_MNIST_DIR)")
    parser.add_argument("--out", type=Path, default=None,
                        help="result folder (default experiments/results/<set>)")
    parser.epilog = ("Config fields of every run can be overridden as in deq-train: "
                     "--config.<field>=<value>, e.g. --config.train.num_epochs=2.")
    args, rest = parser.parse_known_args(argv)
    unknown = [a for a in rest if not a.startswith("--config.")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.set == "stale":
        stale = stale_sets()
        for name, why in stale.items():
            print(f"stale: experiments/results/{name}: {why}")
        if not stale:
            print("every result set is up to date with the code.")
        return 1 if stale else 0
    if args.set == "readme":
        changed = update_readme()
        print("README results block " + ("updated." if changed else "already up to date."))
        return 0
    overrides = [a.removeprefix("--") for a in rest]
    if args.set.startswith("mnist"):
        if not args.mnist_dir or not Path(args.mnist_dir).is_dir():
            parser.error("the mnist set needs --mnist-dir DIR (or DEQ_MNIST_DIR) with the "
                         "MNIST IDX files")
        overrides.append(f"data.dir={args.mnist_dir}")
    seeds = args.seeds or DEFAULT_SEEDS[args.set]
    run_set(args.set, seeds, args.workdir, overrides,
            ["python", "-m", "experiments.reproduce", *argv], out=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
