#!/usr/bin/env bash
# The GPU result set, in one command (about 10 minutes on one H100/H200):
#   1. the core benchmark at the GPU setting (batch 128, 64 channels), with JAX's default
#      matmul precision and with "highest";
#   2. a short MNIST DEQ-vs-unrolled run (1 seed, 2 epochs), with the compute-accuracy curve
#      and the forward solvers on the trained cell.
# Everything lands in experiments/results/gpu/ (override with OUT_DIR) with a provenance.json.
#
# Needs: a CUDA build of JAX (pip install -U "jax[cuda12]"), the project with its extras
# (pip install -e ".[experiments,bench]"), and the MNIST IDX files in $DEQ_MNIST_DIR (the MNIST
# part is skipped, with a message, when they are absent).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT_DIR:-experiments/results/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1

backend=$(python -c "import jax; print(jax.default_backend())")
if [ "$backend" != "gpu" ] && [ "${DEQ_ALLOW_CPU:-0}" != "1" ]; then
    echo "experiments/gpu.sh: JAX sees no GPU (backend '$backend'); install a CUDA build of JAX," \
         "or set DEQ_ALLOW_CPU=1 to dry-run this script on the CPU." >&2
    exit 1
fi
sizes=(--batch 128 --channels 64)
[ "$backend" = "gpu" ] || sizes=(--quick)   # a CPU dry run checks the script, not the figures

for precision in default highest; do
    python -m experiments.bench_core "${sizes[@]}" \
        --precision "$precision" --out "$out/bench_core" 2>&1 | tee "$out/bench_core_$precision.log"
done

if [ -n "${DEQ_MNIST_DIR:-}" ] && [ -d "$DEQ_MNIST_DIR" ]; then
    epochs=2
    [ "$backend" = "gpu" ] || epochs=1
    python -m experiments.reproduce mnist --seeds 1 --out "$out/mnist" \
        --workdir "${WORKDIR:-runs/gpu}" --config.train.num_epochs=$epochs \
        2>&1 | tee "$out/mnist.log"
else
    echo "experiments/gpu.sh: DEQ_MNIST_DIR is not set to a folder with the MNIST IDX files;" \
         "skipping the MNIST run." | tee "$out/mnist.log"
fi
python - "$out" <<'PY'
import json, sys
from pathlib import Path
from experiments.reproduce import provenance
Path(sys.argv[1], "provenance.json").write_text(
    json.dumps(provenance(["bash", "experiments/gpu.sh"]), indent=1) + "\n")
PY
echo "wrote $out"
