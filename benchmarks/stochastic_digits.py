"""The stochastic samplers on the digits UNet: the share of digits the shipped classifier is confident of and their
Frechet distance to the real digits, per budget of model calls, beside the ODE solvers (docs/stochastic.md).

    python benchmarks/stochastic_digits.py [--num 500] [--calls 10 20 50]

Each method runs on the logsnr grid fitted to the budget (`model_calls=N`) from the same starting noise, its fresh
noise from (seed 0, image, step); scored as benchmarks/digits_quality.py scores. Writes its table into
docs/stochastic.md (its own marked section).
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

METHODS = ("DPM-Solver++2M", "UniPC-bh2", "DDIM", "DDIM:eta=1", "Euler-a", "DPM-Solver++2S-a", "DPM-Solver++2M-SDE")
DOC = REPO / "docs" / "stochastic.md"


def digits(method: str, calls: int, num: int, seed: int = 0) -> np.ndarray:
    model, schedule = pretrained("digits")
    noise = noise_for(range(num), image_shape(model), seed)
    with torch.inference_mode():
        out = sample(model, noise, schedule, method, model_calls=calls, timesteps="logsnr", backend="fused",
                     seed=seed)
    return to_uint8(out)[..., 0]


def main(argv: list[str] | None = None, log=print) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num", type=int, default=500)
    p.add_argument("--calls", type=int, nargs="+", default=[10, 20, 50])
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--doc", type=Path, default=DOC, help="the page its section goes to; 'none' for none")
    args = p.parse_args(argv)
    scorer = Scorer()
    lines = [f"Real digits: {scorer.real['confident']:.1%} confident.", "",
             "| method | " + " | ".join(f"{n} calls: confident, FD" for n in args.calls) + " |",
             "|---|" + "---|" * len(args.calls)]
    rows = []
    for method in args.methods:
        start, cells = time.perf_counter(), []
        for calls in args.calls:
            score = scorer.score(digits(method, calls, args.num))
            rows.append({"method": method, "calls": calls, **score})
            cells.append(f"{score['confident']:.1%}, {score['fd']:.3g}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
        log(f"{lines[-1]}  ({time.perf_counter() - start:.0f} s)")
    if str(args.doc) != "none":
        command = " ".join(["python benchmarks/stochastic_digits.py", *(argv or [])])
        common.write_marked_section(args.doc, "benchmarks/stochastic_digits.py", "\n".join([
            "## On the digits UNet", "",
            f"`{command}`: {args.num} digits per cell from the same starting noise, each method on the logsnr grid "
            "fitted to the model calls given. **confident**: the share the shipped classifier gives one class a "
            "probability of at least 0.9; **FD** against all real digits.", "", *lines]))
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
