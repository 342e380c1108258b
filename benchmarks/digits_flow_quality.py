"""The rectified-flow digits model against the eps one: the same UNet, data and noise, sampled at the same numbers of
model calls, scored as benchmarks/digits_quality.py scores (the share the shipped classifier is confident of, FD
against the real digits, speckle).

    python benchmarks/digits_flow_quality.py [--num 500] [--calls 5 10 20] [--methods DDIM UniPC-bh2 ...]

Each model runs on its own schedule's default grid (the eps model the paper's, the flow model its uniform flow
grid) with `model_calls=N`, as `pndm-fast --config digits[-flow] --method M --model_calls N` makes them. Writes
its table into docs/families.md (its own marked section).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import common  # noqa: E402
from benchmarks.digits_quality import Scorer  # noqa: E402
from pndm_fast.images import to_uint8  # noqa: E402
from pndm_fast.pretrained import image_shape, pretrained  # noqa: E402
from pndm_fast.runners.sample import noise_for  # noqa: E402
from pndm_fast.sampling import sample  # noqa: E402

MODELS = ("digits", "digits-flow")
METHODS = ("DDIM", "DPM-Solver++2M", "UniPC-bh2", "F-PNDM")
DOC = REPO / "docs" / "families.md"


def digits(name: str, method: str, calls: int, num: int, seed: int, batch: int = 500) -> np.ndarray:
    """`num` digits (uint8) of bundled model `name` from image i's noise of `seed`, in `calls` model calls."""
    model, schedule = pretrained(name)
    parts = []
    for first in range(0, num, batch):
        noise = noise_for(range(first, min(first + batch, num)), image_shape(model), seed)
        with torch.inference_mode():
            out = sample(model, noise, schedule, method, model_calls=calls, backend="fused")
        parts.append(to_uint8(out)[..., 0])
    return np.concatenate(parts)


def main(argv: list[str] | None = None, log=print) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num", type=int, default=500, help="digits per cell")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calls", type=int, nargs="+", default=[5, 10, 20])
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--doc", type=Path, default=DOC, help="the page its section goes to; 'none' for none")
    args = p.parse_args(argv)
    scorer = Scorer()
    lines = [f"Real digits: {scorer.real['confident']:.1%} confident.", "",
             "| model calls | method | " + " | ".join(f"{m}: confident, FD" for m in MODELS) + " |",
             "|---|---|" + "---|" * len(MODELS)]
    rows = []
    for calls in args.calls:
        for method in args.methods:
            start, cells = time.perf_counter(), []
            for name in MODELS:
                score = scorer.score(digits(name, method, calls, args.num, args.seed))
                rows.append({"model": name, "method": method, "calls": calls, **score})
                cells.append(f"{score['confident']:.1%}, {score['fd']:.3g}")
            lines.append(f"| {calls} | {method} | " + " | ".join(cells) + " |")
            log(f"{lines[-1]}  ({time.perf_counter() - start:.0f} s)")
    if args.doc is not None and str(args.doc) != "none":
        command = " ".join(["python benchmarks/digits_flow_quality.py", *(argv or [])])
        common.write_marked_section(args.doc, "benchmarks/digits_flow_quality.py", "\n".join([
            "## The flow digits model against the eps one", "",
            f"`{command}`: {args.num} digits per cell from the same noise, each model on its own schedule's "
            "default grid with the model calls given. **confident**: the share the shipped classifier gives one "
            "class a probability of at least 0.9; **FD** against all real digits.", "", *lines]))
        log(f"wrote {args.doc}")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
