"""Compare training runs: a markdown table and PNG plots from several workdirs.

Usage::

  # run (or resume) each config into <workdir>/<config name>, then compare them
  deq-compare --configs configs/digits_deq.py,configs/digits_unrolled.py --workdir runs/digits

  # only read existing workdirs
  deq-compare --runs runs/mnist/mnist_deq,runs/mnist/mnist_unrolled --out runs/mnist/compare

Writes ``comparison.md`` (also printed), ``comparison.json`` and ``*.png`` into ``--out``
(default ``<workdir>/compare``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

from experiments.train import read_metrics


def load_config(path: str, overrides: list[str] | None = None):
    """Load an ml_collections config file (``get_config()``) and apply ``a.b=value`` overrides."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file {path} does not exist.")
    spec = importlib.util.spec_from_file_location(f"_deq_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for item in overrides or []:
        key, _, raw = item.partition("=")
        key = key.removeprefix("config.")
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        if leaf not in node:
            raise KeyError(f"config has no field {key!r} (override {item!r}).")
        old = node[leaf]
        node[leaf] = _parse_like(raw, old, key)
    return config


def _parse_like(raw: str, old, key: str):
    try:
        if isinstance(old, bool):
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError(raw)
            return raw.lower() in ("true", "1")
        if isinstance(old, int):
            return int(raw)
        if isinstance(old, float):
            return float(raw)
    except ValueError:
        raise ValueError(
            f"config.{key}={raw!r}: expected a {type(old).__name__} like {old!r}."
        ) from None
    return raw


def _fmt_bytes(n):
    if n is None:
        return "n/a"
    return f"{n / 2**20:.1f} MiB"


def _fmt(x, spec=".4f"):
    return "n/a" if x is None else format(x, spec)


def summarize(workdir: Path) -> dict:
    summary_path = workdir / "summary.json"
    if not summary_path.exists():
        raise FileNotFoundError(
            f"{workdir} has no summary.json: the run has not finished (rerun its config to "
            "resume it)."
        )
    summary = json.loads(summary_path.read_text())
    summary["workdir"] = str(workdir)
    return summary


def markdown_table(summaries: list[dict]) -> str:
    base = next((s for s in summaries if s.get("mode") == "unrolled"), None)
    rows = [
        "| run | mode | test acc | best test acc | train step (median) | epoch time | "
        "train-step memory (compiled temp) | vs unrolled | fwd steps (train/test) | "
        "fwd rel. residual (train/test) | bwd steps | params |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
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
            f"{_fmt(s.get('test_fwd_rel_residual'), '.1e')} | "
            f"{_fmt(s.get('train_bwd_steps'), '.1f')} | {s.get('num_params')} |"
        )
    machines = sorted({s.get("machine", "?") for s in summaries})
    rows.append("")
    rows.append(f"Machine: {'; '.join(machines)}. jax {summaries[0].get('jax', '?')}.")
    return "\n".join(rows)


def plot(workdirs: list[Path], names: list[str], out: Path) -> list[Path]:
    import matplotlib

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
    mems = [summarize(wd).get("train_step_temp_bytes") or 0 for wd in workdirs]
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
    out.mkdir(parents=True, exist_ok=True)
    summaries = [summarize(wd) for wd in workdirs]
    table = markdown_table(summaries)
    (out / "comparison.md").write_text(table + "\n")
    (out / "comparison.json").write_text(json.dumps(summaries, indent=1))
    plot(workdirs, [s["name"] for s in summaries], out)
    return table


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="", help="comma-separated config files to run")
    parser.add_argument("--workdir", default="runs", help="parent workdir for --configs")
    parser.add_argument("--runs", default="", help="comma-separated existing workdirs to read")
    parser.add_argument("--out", default="", help="output folder (default <workdir>/compare)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a field in every config, e.g. --set train.num_epochs=2")
    args = parser.parse_args(argv)
    workdirs = [Path(r) for r in args.runs.split(",") if r]
    if args.configs:
        import logging

        from experiments.main import quiet_third_party_logs
        from experiments.train import train_and_evaluate

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
        quiet_third_party_logs()
        for cfg_path in [c for c in args.configs.split(",") if c]:
            config = load_config(cfg_path, args.set)
            wd = Path(args.workdir) / config.name
            print(f"== {config.name}: training into {wd} (resumes if interrupted)", flush=True)
            train_and_evaluate(config, wd)
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
