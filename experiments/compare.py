"""Compare training runs: a markdown table and PNG plots from several workdirs.

usage:

  # run (or resume) each config into <workdir>/<config name>, then compare them
  deq-compare --configs configs/digits_deq.py,configs/digits_unrolled.py --workdir runs/digits

  # only read existing workdirs
  deq-compare --runs runs/mnist/mnist_deq,runs/mnist/mnist_unrolled --out runs/mnist/compare

  # override config fields of every run, with the same syntax as deq-train
  deq-compare --configs configs/digits_deq.py,configs/digits_unrolled.py --workdir runs/d2 \\
      --config.train.num_epochs=2

Writes comparison.md (also printed), comparison.json and *.png into --out (default
<workdir>/compare).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from experiments import cli
from experiments.runfiles import read_json

PROG = "deq-compare"
cli.require_experiments_extra(PROG)


def _fmt_bytes(n):
    if n is None:
        return "n/a"
    return f"{n / 2**20:.1f} MiB"


def _fmt(x, spec=".4f"):
    return "n/a" if x is None else format(x, spec)


def summarize(workdir: Path) -> dict:
    summary_path = workdir / "summary.json"
    if not workdir.is_dir():
        raise FileNotFoundError(f"run directory {workdir} does not exist.")
    if not summary_path.exists():
        raise FileNotFoundError(
            f"{workdir} has no summary.json: the run has not finished (rerun its config to "
            "resume it)."
        )
    summary = read_json(summary_path, "the summary of a finished run (rerun its config in a "
                        "new workdir to write it again)")
    summary["workdir"] = str(workdir)
    return summary


def _equilibrium(s: dict) -> str:
    """Test samples whose relative residual is at most 1e-3 at the final evaluation."""
    if not s.get("test_samples"):
        return "n/a"
    return (f"{s['test_at_equilibrium']} / {s['test_samples']} "
            f"(worst {s['test_worst_residual']:.1e})")


def markdown_table(summaries: list[dict]) -> str:
    base = next((s for s in summaries if s.get("mode") == "unrolled"), None)
    rows = [
        "| run | mode | test acc | best test acc | train step (median) | epoch time | "
        "train-step memory (compiled temp) | vs unrolled | fwd steps (train/test) | "
        "fwd rel. residual (train/test) | test samples at equilibrium | bwd steps | params |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        ratio = "n/a"
        if base and s.get("train_step_temp_bytes") and base.get("train_step_temp_bytes"):
            ratio = f"{s['train_step_temp_bytes'] / base['train_step_temp_bytes']:.2f}x"
        rows.append(
            f"| {s['name']} | {s['mode']} | {_fmt(s.get('test_accuracy'))} | "
            f"{_fmt(s.get('best_test_accuracy'))} | "
            f"{_fmt(1e3 * s['median_step_time'] if s.get('median_step_time') else None, '.1f')}"
            f" ms | {_fmt(s.get('mean_epoch_time'), '.1f')} s | "
            f"{_fmt_bytes(s.get('train_step_temp_bytes'))} | {ratio} | "
            f"{_fmt(s.get('train_fwd_steps'), '.1f')} / {_fmt(s.get('test_fwd_steps'), '.1f')} | "
            f"{_fmt(s.get('train_fwd_rel_residual'), '.1e')} / "
            f"{_fmt(s.get('test_fwd_rel_residual'), '.1e')} | {_equilibrium(s)} | "
            f"{_fmt(s.get('train_bwd_steps'), '.1f')} | {s.get('num_params')} |"
        )
    machines = sorted({s.get("machine", "?") for s in summaries})
    rows.append("")
    rows.append(f"Machine: {'; '.join(machines)}. jax {summaries[0].get('jax', '?')}.")
    return "\n".join(rows)


def plot(workdirs: list[Path], summaries: list[dict], out: Path) -> list[Path]:
    # Imported here, not at the top: --help stays instant (they load JAX and matplotlib).
    import matplotlib

    from experiments.metrics import read_metrics

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("test_accuracy", "test accuracy", "epoch"),
        ("train_loss", "training loss", "epoch"),
        ("epoch_time", "epoch time (s)", "epoch"),
        ("train_step_time", "train step time (s)", "epoch"),
        ("train_fwd_steps", "forward solver steps (train mean)", "epoch"),
        ("train_fwd_rel_residual", "forward rel. residual (train mean)", "epoch"),
        ("train_bwd_steps", "backward solver steps (train mean)", "epoch"),
        ("peak_memory_bytes", "peak device memory (bytes)", "epoch"),
    ]
    written = []
    names = [s["name"] for s in summaries]
    fig, axes = plt.subplots(2, 4, figsize=(18, 8))
    for ax, (key, title, xlabel) in zip(axes.ravel(), panels):
        any_data = False
        for wd, name in zip(workdirs, names):
            recs = [r for r in read_metrics(wd) if r.get("kind") == "epoch"]
            xs = [r["epoch"] for r in recs if r.get(key) is not None]
            ys = [r[key] for r in recs if r.get(key) is not None]
            if ys:
                any_data = True
                ax.plot(xs, ys, marker="o", label=name)
        ax.set_title(title if any_data else f"{title}\n(not reported by this backend)", fontsize=10)
        ax.set_xlabel(xlabel)
        if "residual" in key and any_data:
            ax.set_yscale("log")
        if any_data:
            ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "comparison.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    # Memory bar chart: compiled temporary memory of one training step.
    fig, ax = plt.subplots(figsize=(6, 4))
    mems = [s.get("train_step_temp_bytes") or 0 for s in summaries]
    ax.bar(names, [m / 2**20 for m in mems])
    ax.set_ylabel("MiB")
    ax.set_title("training-step memory (XLA compiled temporaries)")
    fig.tight_layout()
    path = out / "memory.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written


def compare(workdirs: list[Path], out: Path) -> str:
    """Write the comparison of ``workdirs`` into ``out``; return the markdown table. A missing
    or unfinished run fails before anything is written."""
    summaries = [summarize(wd) for wd in workdirs]
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(summaries)
    (out / "comparison.md").write_text(table + "\n")
    (out / "comparison.json").write_text(json.dumps(summaries, indent=1))
    plot(workdirs, summaries, out)
    return table


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"{cli.OVERRIDE_HELP}\n(applied to every config of --configs)\n\n"
               f"{cli.fields_help(None)}")
    parser.add_argument("--configs", default="", help="comma-separated config files to run")
    parser.add_argument("--workdir", default="runs", help="parent workdir for --configs")
    parser.add_argument("--runs", default="", help="comma-separated existing workdirs to read")
    parser.add_argument("--out", default="", help="output folder (default <workdir>/compare)")
    args, rest = parser.parse_known_args(argv)
    overrides = []
    while rest:
        arg = rest.pop(0)
        if not arg.startswith("--config."):
            cli.fail(PROG, f"unexpected argument {arg!r}; overrides are written "
                           "--config.FIELD=VALUE (see --help).")
        if "=" not in arg and rest and not rest[0].startswith("--"):
            arg = f"{arg}={rest.pop(0)}"
        overrides.append(arg)
    workdirs = [Path(r) for r in args.runs.split(",") if r]
    with cli.short_errors(PROG):
        configs = [cli.load_config(c, overrides) for c in args.configs.split(",") if c]
        if overrides and not configs:
            raise cli.ConfigError("--config.FIELD=VALUE overrides apply to --configs only.")
        if configs:
            from experiments.train import convergence_report, train_and_evaluate

            cli.setup_console()
            for config in configs:
                wd = Path(args.workdir) / config.name
                print(f"== {config.name}: training into {wd} (resumes if interrupted)",
                      flush=True)
                print(convergence_report(train_and_evaluate(config, wd)), flush=True)
                workdirs.append(wd)
        if not workdirs:
            parser.error("give --configs to run, or --runs to read")
        out = Path(args.out) if args.out else Path(args.workdir) / "compare"
        table = compare(workdirs, out)
    print(table)
    print(f"\nwrote {out}/comparison.md, comparison.json, comparison.png, memory.png")


def run():
    """Console entry point (``deq-compare``)."""
    main(sys.argv[1:])


if __name__ == "__main__":
    run()
