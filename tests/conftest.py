"""Shared test helpers: the golden data (tests/data/golden, see docs/golden-data.md), thread counts, image
folders, and a closing line that says which tests were skipped for want of a GPU."""

import contextlib
import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# The golden data ships with the repository; PNDM_GOLDEN points the tests at another copy (e.g. regenerated).
GOLDEN = Path(os.environ.get("PNDM_GOLDEN", REPO / "tests" / "data" / "golden"))


def golden_path(name: str) -> Path:
    """A file of the reference implementation's outputs. It is part of the repository, so a missing file is a
    broken checkout: the test fails (it is not skipped) and says where the file was looked for."""
    path = GOLDEN / name
    if not path.exists():
        pytest.fail(f"golden data {path} is missing: it ships in tests/data/golden (docs/golden-data.md says how "
                    "to regenerate it); PNDM_GOLDEN, when set, must name a complete copy", pytrace=False)
    return path


def golden_json(name: str) -> dict:
    return json.loads(golden_path(name).read_text())


GOLDEN_MODELS = ("ddim_small_linear", "iddpm_small_cosine")


def golden_run_params() -> list:
    """One pytest param per run listed in golden/*_seed1.json (collection fails when a listing is missing)."""
    params = []
    for name in GOLDEN_MODELS:
        path = GOLDEN / f"{name}_seed1.json"
        if not path.exists():
            raise FileNotFoundError(f"golden data {path} is missing: it ships in tests/data/golden "
                                    "(docs/golden-data.md)")
        for run in json.loads(path.read_text())["runs"]:
            params.append(pytest.param(name, run, id=run["file"][: -len(".npz")]))
    return params


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


@contextlib.contextmanager
def torch_threads(count: int):
    """torch's intra-op thread count set to `count` inside the block, restored after it.

    The tests' models are tiny: a second OpenMP thread saves nothing there, and on a busy 2-core machine the
    threads' barrier waits made calls 10 to 30x slower. The thread count also changes how convolutions sum, so
    tests that compare pixels or weights bit for bit run every side with the same count."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    """One torch thread for this test (see torch_threads)."""
    with torch_threads(1):
        yield


def read_images(folder) -> dict:
    """{file name: pixels} of the PNG images in `folder`, sorted by name."""
    import numpy as np
    from PIL import Image

    return {name: np.asarray(Image.open(os.path.join(folder, name)))
            for name in sorted(os.listdir(folder)) if name.endswith(".png")}


def _needs_gpu(reason: str) -> bool:
    return "CUDA" in reason or "GPU" in reason


def pytest_terminal_summary(terminalreporter):
    """Say in one line which skips were for want of a GPU, and list any other skip with its reason: on a
    machine without CUDA the GPU tests are the only ones that should skip."""
    skipped = terminalreporter.stats.get("skipped", [])
    reasons = [str(report.longrepr[2]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
               for report in skipped]
    gpu = sum(_needs_gpu(reason) for reason in reasons)
    if gpu:
        terminalreporter.write_line(f"{gpu} tests skipped because they need a CUDA device (no GPU here); "
                                    "benchmarks/gpu_checks.sh runs them on a GPU machine")
    others = sorted({reason for reason in reasons if not _needs_gpu(reason)})
    for reason in others:
        terminalreporter.write_line(f"skipped, not for want of a GPU: {reason}")


def in_threads(work, count: int, repeats: int = 3) -> dict:
    """{i: work(i)} with `count` threads started together (a barrier), each calling work(i) `repeats` times and
    keeping the last result: concurrent calls under contention. An exception in any thread is raised here."""
    import threading

    results, errors = {}, []
    barrier = threading.Barrier(count)

    def run(i):
        try:
            barrier.wait()
            for _ in range(repeats):
                results[i] = work(i)
        except Exception as e:  # surfaced below, in the test's own thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results
