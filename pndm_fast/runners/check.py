"""`--runner check`: the users' own cross-check of every fast backend against the float64 reference.

Verdict rule, the same the test suite applies to the golden runs: a backend passes when its largest per-step
relative L2 distance to the float64 reference is at most twice the float32 reference's own distance + 1e-7.
"""

from __future__ import annotations

import copy

import torch

from ..kernels_info import fused_op_notice
from ..methods import method_record
from ..ops import available_impls
from ..sampling import sample
from ..continuous import schedule_from_config
from .sample import check_device, image_shape, load_model, noise_for


def relative_distance(trajectory: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Per step: ||a - b|| / ||b|| over each (B, C, H, W) entry, in float64."""
    diff = (trajectory.double() - truth).flatten(1).norm(dim=1)
    return diff / truth.flatten(1).norm(dim=1).clamp_min(1e-300)


def fast_backends(device: torch.device) -> list[str]:
    """The backends that can run on this machine: the plain-torch plan, each fused op, and the CUDA graph."""
    return ["torch"] + [impl for impl in available_impls(device) if impl != "torch"] + (
        ["graph"] if device.type == "cuda" else [])


def passes(distance: float, baseline: float) -> bool:
    return distance <= 2 * baseline + 1e-7


def run_check(config: dict, model_path: str | None, device_name: str, method: str, sample_step: int,
              seed: int = 0, batch: int = 2, timesteps="uniform", end: str | None = None) -> int:
    """Print per-step deviations and a verdict per backend; 0 when every backend passes, else 1."""
    device = check_device(device_name)
    schedule = schedule_from_config(config["Schedule"])
    model = load_model(config, model_path, device_name, "fp32")
    model64 = copy.deepcopy(model).double()
    noise = noise_for(range(batch), image_shape(config), seed).to(device)
    grid = dict(timesteps=timesteps, end=end)
    with torch.inference_mode():
        truth = sample(model64, noise.double(), schedule, method, sample_step, "reference", True, **grid)
        runs = {"reference f32": sample(model, noise, schedule, method, sample_step, "reference", True, **grid)}
        for backend in fast_backends(device):
            runs[backend] = sample(model, noise, schedule, method, sample_step, backend, True, **grid)
    distances = {name: relative_distance(traj, truth) for name, traj in runs.items()}
    names = list(distances)
    print(fused_op_notice(device))
    print(f"{method}, {len(truth) - 1} steps, batch {batch}: relative L2 distance to the float64 reference")
    print("step  " + "  ".join(f"{n:>16}" for n in names))
    for step in range(1, len(truth)):
        print(f"{step:4d}  " + "  ".join(f"{distances[n][step].item():16.3e}" for n in names))
    # A method whose reference computes in float64 whatever the noise (the multistep solvers') has no float32
    # reference; its float32 yardstick is then the plain-torch twin of the plan.
    yardstick = "torch" if method_record(method).reference_float64 else "reference f32"
    baseline = distances[yardstick].max().item()
    failed = 0
    for name in [n for n in names[1:] if n != yardstick]:
        worst = distances[name].max().item()
        ok = passes(worst, baseline)
        failed += not ok
        print(f"{'PASS' if ok else 'FAIL'}  {name}: max {worst:.3e} (bound {2 * baseline + 1e-7:.3e})")
    return 1 if failed else 0
