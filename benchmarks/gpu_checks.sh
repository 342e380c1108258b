#!/usr/bin/env bash
# Every measurement that needs a CUDA card, in one run of at most 10 minutes on an H100/H200, recorded into
# benchmarks/RESULTS.md (section "## GPU checks", by benchmarks/record_gpu.py):
#   1. host time per eager launch of the fused op against a bare torch.add, and memcpys per call (bench_launch)
#   2. the kernel's launch configurations against the copy roofline from 0.75 MB up (tune_lincomb)
#   3./4. ddim-cifar10 at batch 1, 16, 256: graph+compile in fp32, channels_last, bf16 + channels_last, each
#      against calls x one CUDA-graphed forward of the same compiled UNet (bench_e2e's graph bound)
#   5. the GPU tests, then the whole suite, failures named
# Each stage gets at most its own limit and what is left of SECONDS, so a short lease still records the stages
# before it; the suite runs last.
#
#     bash benchmarks/gpu_checks.sh [OUT] [SECONDS]      (defaults: /tmp/gpu, 570)
#
# Installs the checkout in place with the machine's own torch and triton (no downloads). The tests read the golden
# data from tests/data/golden (PNDM_GOLDEN names another copy). Logs and JSON rows go to OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/gpu}
END=$((SECONDS + ${2:-570}))
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
    tail -n 20 "$OUT/$name.log"
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', \
triton.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_capability())"

stage install 60 python3 -m pip install --no-deps --no-build-isolation -e .
stage gpu_tests 90 python3 -m pytest -q -p no:cacheprovider -m "not slow" tests/test_cuda.py tests/test_graph.py
stage launch 40 python3 benchmarks/bench_launch.py --quick --device cuda --out "$OUT/launch"
stage tune 60 python3 benchmarks/tune_lincomb.py --quick --device cuda --out "$OUT/tune"
stage e2e 200 python3 benchmarks/bench_e2e.py --quick --device cuda --models ddim-cifar10 \
    --variants graph+compile,graph+compile+cl,graph+compile+bf16+cl --out "$OUT/e2e"
# The whole suite with the GPU present: test names as they finish, so a cut-short stage still says what failed.
parallel=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8 --dist loadfile")
stage full_suite 600 python3 -m pytest -v -p no:cacheprovider --tb=line -rfE $parallel
python3 benchmarks/record_gpu.py "$OUT"
grep -E "^(FAILED|ERROR)|(FAILED|ERROR) tests/" "$OUT/full_suite.log" | sort -u | head -60
tar -czf "$OUT/results.tgz" -C "$OUT" --exclude results.tgz .
