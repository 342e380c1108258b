"""The reference backend against the paper's implementation's own trajectories, every step."""

import copy

import pytest
import torch
from conftest import CallCounter, golden_model, golden_run_params, golden_trajectory, relative_l2

from pndm_fast import METHODS, Schedule, make_grid
from pndm_fast.sampling import reference_eps_model

DTYPES = {"f32": torch.float32, "f64": torch.float64}


def tolerance(run: dict) -> float:
    if run["dtype"] == "f64":
        return 1e-9
    # FON's derivative T(x) - x cancels most of x, so float32 loses about a digit more there
    return 5e-5 if run["method"] == "FON" else 1e-5


@pytest.mark.parametrize("name,run", golden_run_params())
def test_reference_matches_golden_trajectory(name, run):
    model, meta = golden_model(name)
    dtype = DTYPES[run["dtype"]]
    noise, golden = golden_trajectory(run, dtype)
    model = copy.deepcopy(model).to(dtype)
    schedule = Schedule.from_config(meta["Schedule"])
    grid = make_grid(schedule, "uniform", run["sample_speed"])
    assert [int(t) for t in reversed(grid.times[:-1])] == run["seq"] and grid.times[-1] == -1
    with torch.no_grad(), CallCounter(model) as counter:
        trajectory = torch.stack(METHODS[run["method"]].run_reference(reference_eps_model(model, noise.shape[1]),
                                                                      noise, grid))
    assert trajectory.shape == golden.shape and trajectory.dtype == dtype
    worst = max(relative_l2(trajectory[i], golden[i]) for i in range(len(golden)))
    assert worst <= tolerance(run), f"largest per-step relative L2 {worst:.3e}"
    assert counter.calls == run["model_calls"]
