"""Shared fixtures: where the golden data lives, and skipping cleanly when it is absent."""

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
GOLDEN = Path(os.environ.get("PNDM_GOLDEN", REPO.parent / "shared" / "golden"))


def golden_path(name: str) -> Path:
    """A file of the reference implementation's outputs; the test is skipped when the folder is absent."""
    path = GOLDEN / name
    if not path.exists():
        pytest.skip(f"golden data {path} is absent (set PNDM_GOLDEN to the folder holding it)")
    return path


def golden_json(name: str) -> dict:
    return json.loads(golden_path(name).read_text())


GOLDEN_MODELS = ("ddim_small_linear", "iddpm_small_cosine")


def golden_run_params() -> list:
    """One pytest param per run listed in golden/*_seed1.json, or a single skipped param when absent."""
    params = []
    for name in GOLDEN_MODELS:
        path = GOLDEN / f"{name}_seed1.json"
        if path.exists():
            for run in json.loads(path.read_text())["runs"]:
                params.append(pytest.param(name, run, id=run["file"][: -len(".npz")]))
    return params or [pytest.param(None, None, marks=pytest.mark.skip(reason=f"golden data absent at {GOLDEN}"))]


_MODELS: dict = {}


def golden_model(name: str):
    """The golden checkpoint `name` loaded strictly into a float32 model (cached; callers copy before casting)."""
    if name not in _MODELS:
        from pndm_fast.models import build_model, load_checkpoint

        meta = golden_json(f"{name}_seed1.json")
        config = {"Model": meta["Model"], "Schedule": meta["Schedule"], "Dataset": {"image_size": 16}}
        model = build_model(config)
        load_checkpoint(model, str(golden_path(meta["checkpoint"])))
        _MODELS[name] = (model.eval().requires_grad_(False), meta)
    return _MODELS[name]


def golden_trajectory(run: dict, dtype):
    """(noise, trajectory) of a golden run as torch tensors in `dtype`."""
    import numpy as np
    import torch

    data = np.load(golden_path(run["file"]))
    return torch.from_numpy(data["noise"]).to(dtype), torch.from_numpy(data["trajectory"]).to(dtype)


class CallCounter:
    """Counts a model's forward calls with a hook (the golden runs record how many the reference made).

    A hook rather than a wrapper, so the model itself goes to sample() and torch.compile sees a real module.
    """

    def __init__(self, model):
        self.calls = 0
        self._hook = model.register_forward_pre_hook(self._count)

    def _count(self, module, args):
        self.calls += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._hook.remove()


def relative_l2(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()
