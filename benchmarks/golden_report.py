"""Largest per-step deviation of every backend from the reference implementation's golden trajectories.

    python benchmarks/golden_report.py [--golden tests/data/golden]

Prints a markdown table: for each golden run, the relative L2 distance (max over steps) of pndm_fast's reference
backend to the golden trajectory of the same dtype, and of the float32 backends to the float64 golden trajectory
next to the golden float32 run's own distance to it (the bound the tests apply is 2x that + 1e-7).
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import numpy as np
import torch

from pndm_fast import Schedule, build_model, load_checkpoint, sample
from pndm_fast.ops import available_impls

DTYPES = {"f32": torch.float32, "f64": torch.float64}


def max_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    diff = (a.double() - b.double()).flatten(1).norm(dim=1) / b.double().flatten(1).norm(dim=1)
    return diff.max().item()


def load(golden: Path, name: str):
    meta = json.loads((golden / f"{name}_seed1.json").read_text())
    model = build_model({"Model": meta["Model"], "Dataset": {"image_size": 16}})
    load_checkpoint(model, str(golden / meta["checkpoint"]))
    return model.eval(), meta


def trajectory(golden: Path, run: dict, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    data = np.load(golden / run["file"])
    return torch.from_numpy(data["noise"]).to(dtype), torch.from_numpy(data["trajectory"]).to(dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--golden", default=str(Path(__file__).resolve().parents[1] / "tests" / "data" / "golden"))
    golden = Path(parser.parse_args().golden)
    impls = [i for i in available_impls("cpu") if i != "torch"] + ["torch"]
    print("| run | reference vs golden (same dtype) | golden f32 vs f64 | "
          + " | ".join(f"fused ({i}) vs f64" for i in impls) + " |")
    print("|---|---|---|" + "---|" * len(impls))
    for name in ("ddim_small_linear", "iddpm_small_cosine"):
        model, meta = load(golden, name)
        schedule = Schedule.from_config(meta["Schedule"])
        runs = {(r["method"], r["sample_speed"], r["dtype"]): r for r in meta["runs"]}
        for (method, steps, dtype), run in runs.items():
            noise, expected = trajectory(golden, run, DTYPES[dtype])
            with torch.no_grad():
                ours = sample(copy.deepcopy(model).to(DTYPES[dtype]), noise, schedule, method, steps, "reference",
                              return_trajectory=True)
                row = [f"{max_distance(ours, expected):.2e}"]
                f64 = runs.get((method, steps, "f64"))
                if dtype == "f32" and f64:
                    truth = trajectory(golden, f64, torch.float64)[1]
                    row.append(f"{max_distance(expected, truth):.2e}")
                    for impl in impls:
                        fused = sample(model, noise, schedule, method, steps, impl, True)  # torch, cpp: backends
                        row.append(f"{max_distance(fused, truth):.2e}")
                else:
                    row += ["-"] * (1 + len(impls))
            print(f"| {run['file'][:-4]} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
