"""Result sets: provenance, the staleness check, and the README numbers generated from them."""

import json
import subprocess

import pytest

from experiments import provenance, seeds


def _set(root, name, prov):
    d = root / name
    d.mkdir()
    if prov is not None:
        (d / "provenance.json").write_text(json.dumps(prov))


def test_stale_sets_names_every_reason(tmp_path):
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=provenance.ROOT, capture_output=True,
                          text=True, check=True).stdout.strip()
    _set(tmp_path, "fresh", {"git_commit": head, "dirty": False})
    _set(tmp_path, "missing", None)
    _set(tmp_path, "dirty", {"git_commit": head, "dirty": True})
    _set(tmp_path, "unknown", {"git_commit": "0" * 40, "dirty": False})
    stale = provenance.stale_sets(tmp_path)
    assert set(stale) == {"missing", "dirty", "unknown"}
    assert "no provenance" in stale["missing"]
    assert "uncommitted" in stale["dirty"]
    assert "not in this repository" in stale["unknown"]


def test_a_set_from_an_older_commit_is_stale_when_code_changed_since(tmp_path):
    # The first commit of the repository predates nearly all of the code.
    first = subprocess.run(["git", "rev-list", "--max-parents=0", "HEAD"], cwd=provenance.ROOT,
                           capture_output=True, text=True, check=True).stdout.split()[-1]
    _set(tmp_path, "old", {"git_commit": first, "dirty": False})
    assert "changed since" in provenance.stale_sets(tmp_path)["old"]


def test_provenance_names_commit_machine_and_versions():
    prov = provenance.provenance(["python", "-m", "experiments.reproduce", "digits"])
    assert len(prov["git_commit"]) == 40 and isinstance(prov["dirty"], bool)
    assert prov["machine"]["cores"] >= 1 and prov["machine"]["cpu"]
    assert prov["jax"] and prov["flax"] and prov["date"]
    assert prov["command"].endswith("digits")


def test_seeds_table_mean_std_and_paired_difference(tmp_path):
    runs = {"deq": [], "unrolled": []}
    for mode, accs in (("deq", [0.97, 0.98, 0.99]), ("unrolled", [0.96, 0.98, 0.97])):
        for seed, acc in enumerate(accs):
            wd = tmp_path / f"{mode}{seed}"
            wd.mkdir()
            (wd / "config.json").write_text(json.dumps({"seed": seed}))
            summary = {k: 1.0 for k in seeds.SUMMARY_FIELDS}
            summary.update(test_accuracy=acc, train_step_temp_bytes=100 if mode == "deq" else 400)
            (wd / "summary.json").write_text(json.dumps(summary))
            runs[mode].append(wd)
    table = seeds.seeds_table(runs)
    agg = table["aggregate"]
    assert agg["deq"]["test_accuracy"]["mean"] == pytest.approx(0.98)
    assert agg["deq"]["test_accuracy"]["std"] == pytest.approx(0.01)
    assert agg["paired_difference"]["per_seed"] == pytest.approx([0.01, 0.0, 0.02])
    assert agg["memory_ratio"] == pytest.approx(0.25)
    md = seeds.seeds_markdown(table, "test machine")
    assert "98.00% +- 1.00" in md and "+1.00 +- 1.00 points over 3 seeds" in md
