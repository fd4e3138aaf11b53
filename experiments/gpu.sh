#!/usr/bin/env bash
# The GPU result set, in one command (about 6 minutes on one H200):
#   1. the core benchmark at the GPU setting (batch 128, 64 channels, precision "highest");
#   2. the derivatives benchmark (forward mode, forces, Hessian-vector products) there;
#   3. with BEFORE_TREE=<a source tree of an earlier commit>, that tree's core benchmark at the
#      same setting (peers skipped), for a before/after comparison of the training step;
#   4. with WITH_MNIST=1 and $DEQ_MNIST_DIR set, a short MNIST DEQ-vs-unrolled run.
# Everything lands in experiments/results/gpu/ (override with OUT_DIR) with a provenance.json.
#
# Needs: a CUDA build of JAX (pip install -U "jax[cuda12]") and the project with its extras
# (pip install -e ".[experiments,bench]"). In a source tree without .git, set DEQ_SOURCE_COMMIT
# (and BEFORE_COMMIT for BEFORE_TREE) to the commits the trees were exported from.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT_DIR:-experiments/results/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1

backend=$(python3 -c "import jax; print(jax.default_backend())")
if [ "$backend" != "gpu" ] && [ "${DEQ_ALLOW_CPU:-0}" != "1" ]; then
    echo "experiments/gpu.sh: JAX sees no GPU (backend '$backend'); install a CUDA build of JAX," \
         "or set DEQ_ALLOW_CPU=1 to dry-run this script on the CPU." >&2
    exit 1
fi
sizes=(--batch 128 --channels 64 --precision highest)
[ "$backend" = "gpu" ] || sizes=(--quick)   # a CPU dry run checks the script, not the figures

status=0
timeout "${CORE_TIMEOUT:-240}" python3 -m experiments.bench_core "${sizes[@]}" \
    --out "$out/bench_core" 2>&1 | tee "$out/bench_core.log" || status=1
timeout "${DERIV_TIMEOUT:-240}" python3 -m experiments.bench_derivatives "${sizes[@]}" \
    --out "$out/bench_derivatives" 2>&1 | tee "$out/bench_derivatives.log" || status=1
if [ -n "${BEFORE_TREE:-}" ]; then
    before_out=$(realpath -m "$out/bench_core_before")
    (cd "$BEFORE_TREE" && DEQ_SOURCE_COMMIT=${BEFORE_COMMIT:-unknown} PYTHONPATH="$PWD:${PYTHONPATH:-}" \
        timeout "${CORE_TIMEOUT:-240}" python3 -m experiments.bench_core "${sizes[@]}" \
        --no-peers --out "$before_out") 2>&1 | tee "$out/bench_core_before.log" || status=1
    # Part of this set: its JSON names the earlier commit; no provenance.json of its own, or
    # it would read as a result set of its own, stale by design.
    rm -f "$before_out/provenance.json"
fi
if [ "${WITH_MNIST:-0}" = "1" ] && [ -n "${DEQ_MNIST_DIR:-}" ] && [ -d "$DEQ_MNIST_DIR" ]; then
    python3 -m experiments.reproduce mnist --seeds 1 --out "$out/mnist" \
        --workdir "${WORKDIR:-runs/gpu}" --config.train.num_epochs=2 \
        2>&1 | tee "$out/mnist.log" || status=1
fi
python3 - "$out" <<'PY'
import json, sys
from pathlib import Path
from experiments.reproduce import provenance
Path(sys.argv[1], "provenance.json").write_text(
    json.dumps(provenance(["bash", "experiments/gpu.sh"]), indent=1) + "\n")
PY
echo "wrote $out"
exit "$status"
