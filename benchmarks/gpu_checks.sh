#!/usr/bin/env bash
# Every measurement that needs a CUDA card, in one run of at most 10 minutes on an H100/H200, recorded into
# benchmarks/RESULTS.md (section "## GPU checks", by benchmarks/record_gpu.py):
#   1. the GPU tests (Triton kernel, fused and graph backends, guidance in the graph, AOT compile), failures named
#   2. the whole suite with the GPU present, last, each result logged as it finishes (the GPU tests left out)
#   3. the fused op against the copy roofline and torch.compile of the same combination, eager and inside a CUDA
#      graph (bench_kernels)
#   4. per sampling step on the digits and cifar10 UNets at batch 1, 16, 256: the graph backend with each
#      combination kernel, bf16, guidance, each against calls x one graphed forward; diffusers' compiled loop as
#      the peer (bench_stack)
#   5. the kernel's launch configurations against the copy roofline (tune_lincomb)
#   6. inpainting's blend inside the fused pass against its own passes, eager and graphed (bench_blend)
# Each stage gets at most its own limit and what is left of SECONDS, so a short lease still records the stages
# before it. After every stage the logs and JSON rows so far are packed into OUT/results.tgz.
#
#     bash benchmarks/gpu_checks.sh [OUT] [SECONDS] [WHEELS]     (defaults: /tmp/gpu, 570, none)
#
# PACK names the packed results instead of OUT/results.tgz (a folder that outlives a run cut short, say).
# Installs the checkout in place with the machine's own torch and triton (no downloads); WHEELS, a folder of
# wheels (diffusers and what it needs beyond the machine's packages), is installed into a private site folder
# first. The tests read the golden data from tests/data/golden (PNDM_GOLDEN names another copy).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/gpu}
END=$((SECONDS + ${2:-570}))
WHEELS=${3:-}
PACK=${PACK:-$OUT/results.tgz}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [[ -n $WHEELS ]]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$WHEELS"/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

left() { echo $((END - SECONDS > 5 ? END - SECONDS : 5)); }
stage() {  # stage NAME MAX_SECONDS COMMAND...: runs COMMAND for at most MAX_SECONDS and what is left, logged
    local name=$1 max=$2; shift 2
    local limit; limit=$(left); ((limit > max)) && limit=$max
    echo "=== $name (limit ${limit}s)"
    local start=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    echo "=== $name: exit $? in $((SECONDS - start))s"
    tail -n 20 "$OUT/$name.log"
    tar -czf "$PACK" -C "$OUT" --exclude "$(basename "$PACK")" .
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', \
torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
} 2>&1 | tee "$OUT/machine.txt"

GPU_TESTS="tests/test_cuda.py tests/test_cuda_engine.py tests/test_graph.py tests/test_ops_triton.py tests/test_aot_compile.py"
parallel=$(python3 -c "import xdist" 2>/dev/null && echo "-n 14 --dist load")
gpu_parallel=$(python3 -c "import xdist" 2>/dev/null && echo "-n 12 --dist load")
stage install 90 python3 -m pip install --no-deps --no-build-isolation -e .
stage gpu_tests 100 python3 -m pytest -v -p no:cacheprovider -rfE $gpu_parallel $GPU_TESTS
stage kernels 60 python3 benchmarks/bench_kernels.py --quick --device cuda --out "$OUT/kernels"
stage stack 240 python3 benchmarks/bench_stack.py --quick --device cuda --out "$OUT/stack"
stage tune 45 python3 benchmarks/tune_lincomb.py --quick --device cuda --out "$OUT/tune"
stage blend 30 python3 benchmarks/bench_blend.py --quick --device cuda --out "$OUT/blend" --doc none
# The whole suite with the GPU present, last (it needs the host's cores, not the card): test names as they finish,
# so a cut-short stage still says what failed.
timeout_flag=$(python3 -c "import pytest_timeout" 2>/dev/null && echo "--timeout 150")
ignored=$(for f in $GPU_TESTS; do echo "--ignore $f"; done)
OMP_NUM_THREADS=1 stage full_suite 240 python3 -m pytest -v -p no:cacheprovider --tb=short -rfE $parallel \
    $timeout_flag $ignored
python3 benchmarks/record_gpu.py "$OUT" --results "$OUT/RESULTS.md"
grep -hE "^(FAILED|ERROR)|(FAILED|ERROR) tests/" "$OUT/gpu_tests.log" "$OUT/full_suite.log" | sort -u | head -60
tar -czf "$PACK" -C "$OUT" --exclude "$(basename "$PACK")" .
