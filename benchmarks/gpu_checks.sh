#!/usr/bin/env bash
# What only a CUDA machine can show, in one pass that fits a short lease: the GPU tests (Triton kernel compiled
# for the card, golden runs through the fused and graph backends, torch.compile on CUDA), the TF32 effect on a
# golden run, the three benchmarks in --quick mode, then the whole test suite. Each stage gets what is left of
# SECONDS, the slowest last, so a lease that runs out still returns the stages before it.
#
#     bash benchmarks/gpu_checks.sh [OUT] [SECONDS]      (defaults: /tmp/gpu, 3600)
#
# Installs the checkout in place with the machine's own torch and triton (no downloads). The tests read the golden
# data from tests/data/golden (PNDM_GOLDEN names another copy). Logs and JSON rows go to OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/gpu}
END=$((SECONDS + ${2:-3600}))
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

left() { echo $((END - SECONDS > 5 ? END - SECONDS : 5)); }
stage() {  # stage NAME MAX_SECONDS COMMAND...: runs COMMAND for at most MAX_SECONDS and what is left, logged
    local name=$1 max=$2; shift 2
    local limit; limit=$(left); ((limit > max)) && limit=$max
    echo "=== $name (limit ${limit}s)"
    local start=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    echo "=== $name: exit $? in $((SECONDS - start))s"
    tail -n 25 "$OUT/$name.log"
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', \
triton.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_capability())"

stage install 300 python3 -m pip install --no-deps --no-build-isolation -e .
stage gpu_tests 300 python3 -m pytest -q -p no:cacheprovider -m "not slow" tests/test_cuda.py tests/test_graph.py \
    "tests/test_soak.py::test_evicted_graph_runners_are_freed_and_cuda_memory_stays_flat"
stage tf32 120 python3 - <<'EOF'
import copy, sys
sys.path.insert(0, "tests")
import torch
from conftest import golden_model, golden_trajectory, relative_l2
from pndm_fast import Schedule, sample
model, meta = golden_model("ddim_small_linear")
model = copy.deepcopy(model).cuda()
schedule = Schedule.from_config(meta["Schedule"])
for method in ("DDIM", "F-PNDM"):
    runs = {r["dtype"]: r for r in meta["runs"] if (r["method"], r["sample_speed"]) == (method, 50)}
    noise, _ = golden_trajectory(runs["f32"], torch.float32)
    truth = golden_trajectory(runs["f64"], torch.float64)[1][-1]
    for tf32 in (False, True):
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = tf32
        out = sample(model, noise.cuda(), schedule, method, 50, "fused").cpu()
        print(f"{method} 50 steps, TF32 {'on ' if tf32 else 'off'}: final x relative L2 to float64 "
              f"{relative_l2(out, truth):.2e}")
EOF
stage bench_kernels 150 python3 benchmarks/bench_kernels.py --quick --out "$OUT/kernels"
stage bench_sampler 120 python3 benchmarks/bench_sampler.py --quick --out "$OUT/sampler"
stage e2e_digits 200 python3 benchmarks/bench_e2e.py --quick --models digits --out "$OUT/e2e_digits"
stage e2e_cifar10 300 python3 benchmarks/bench_e2e.py --quick --models ddim-cifar10 --out "$OUT/e2e_cifar10"
stage compile_tests 300 python3 -m pytest -q -p no:cacheprovider -m slow tests/test_cuda.py
# The whole suite with a GPU present: test names as they finish, so a cut-short stage still says what failed.
parallel=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8 --dist loadfile")
stage full_suite 900 python3 -m pytest -v -p no:cacheprovider --tb=short -rfE $parallel
grep -E "^(FAILED|ERROR)|(FAILED|ERROR) tests/" "$OUT/full_suite.log" | sort -u | head -60
tar -czf "$OUT/results.tgz" -C "$OUT" --exclude results.tgz .
