"""Launch configurations of the Triton lincomb kernel on a GPU: fraction of the copy roofline per (BLOCK, warps).

For each size, every candidate (BLOCK, num_warps) runs the F-PNDM update (x in place, 4 fp32 eps: 5 reads and
1 write) through the direct launcher (kernels.lincomb.bind with `config`), buffers rotated through twice the L2,
timed with CUDA events; the copy roofline is y.copy_(x) measured in the same run (benchmarks/common.py). The
best row per size says what kernels/lincomb.py's LAUNCH_CONFIGS should hold; kernels/aot.py then compiles it
for sm_80/sm_90 and tests/test_aot_compile.py checks its PTX.

    python benchmarks/tune_lincomb.py [--quick] [--out DIR]      (CUDA only; prints a skip line elsewhere)
"""

from __future__ import annotations

import itertools
import sys

import torch

import common

NAME = "tune"
SIZES_MB = {"full": [0.75, 3, 12, 48, 64, 256], "quick": [3, 12, 64], "smoke": [0.75]}
CANDIDATES = [(512, 4), (1024, 4), (2048, 4), (2048, 8), (4096, 4), (4096, 8), (8192, 8), (8192, 16)]
WEIGHTS = [-1e-3, 55 / 24, -59 / 24, 37 / 24, -9 / 24]


def run(args):
    device, mode = torch.device(args.device), common.mode(args)
    if device.type != "cuda":
        return [], [], ["skipped: the Triton kernel's launch configurations are tuned on a CUDA device"]
    from pndm_fast.kernels.lincomb import bind, launch_config

    reps = {"full": 15, "quick": 7, "smoke": 1}[mode]
    rows = []
    for mb in SIZES_MB[mode]:
        numel = int(mb * 2**20 / 4)
        shape = (numel,)
        copy = common.copy_timing(shape, device, reps)
        copy_gbps = 2 * numel * 4 / copy.seconds / 1e9
        floor_s = 6 * numel * 4 / (copy_gbps * 1e9)
        sets = common.rotation(lambda: [torch.randn(shape, device=device) for _ in range(5)], 5 * numel * 4, device)
        best = None
        for config in CANDIDATES:
            launches = itertools.cycle([bind(s[0], s[0], s[1:], WEIGHTS, config=config) for s in sets]).__next__
            timing = common.measure(lambda: launches()(), device, reps, warmup=3, batch=True)
            row = {"bench": NAME, "tensor_mb": mb, "block": config[0], "num_warps": config[1],
                   "us": timing.seconds * 1e6, "us_spread": timing.spread * 1e6, "copy_gbps": copy_gbps,
                   "of_roofline": floor_s / timing.seconds, "current": config == launch_config(numel)}
            rows.append(row)
            best = row if best is None or row["us"] < best["us"] else best
        best["best"] = True
    notes = ["of roofline = 6 tensors at the copy bandwidth measured in the same run / time. current: what "
             "launch_config picks today; best: the fastest candidate at that size (within +- may be noise)."]
    return rows, [], notes


COLUMNS = [
    common.Column("MB", "tensor_mb", "{:.3g}"), common.Column("BLOCK", "block"), common.Column("warps", "num_warps"),
    common.Column("us", "us", "{:.1f}"), common.Column("+-", "us_spread", "{:.1f}"),
    common.Column("of roofline", "of_roofline", "{:.0%}"),
    common.Column("", lambda r: " ".join(n for n in ("current", "best") if r.get(n))),
]


def main(argv: list[str] | None = None) -> tuple[str, list[dict]]:
    return common.main("tune_lincomb.py", __doc__, NAME, run, COLUMNS, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
