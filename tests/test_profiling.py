"""NVTX ranges: off by default and free then; on, one per step and per model call, leaving the numbers alone."""

import contextlib
import sys
import types

import torch

from pndm_fast import Schedule, build_plan
from pndm_fast.profiling import nvtx_enabled, nvtx_range
from pndm_fast.sampling import sample


def test_disabled_ranges_are_one_shared_no_op():
    assert nvtx_range("a", False) is nvtx_range("b", False)


def test_switch_follows_the_flag_then_the_environment(monkeypatch):
    monkeypatch.delenv("PNDM_FAST_NVTX", raising=False)
    assert not nvtx_enabled() and nvtx_enabled(True)
    monkeypatch.setenv("PNDM_FAST_NVTX", "1")
    assert nvtx_enabled() and not nvtx_enabled(False)


class _Ranges:
    """Stands in for the profilers' range calls, the `nvtx` package's annotate and torch.cuda.nvtx's push/pop,
    and records each range opened (its name and how deep it sits) and each closed."""

    def __init__(self, monkeypatch):
        self.opened, self.closed, self.depth = [], 0, 0
        fake = types.ModuleType("nvtx")
        fake.annotate = self.annotate
        monkeypatch.setitem(sys.modules, "nvtx", fake)
        monkeypatch.setattr(torch.cuda.nvtx, "range_push", self.push)
        monkeypatch.setattr(torch.cuda.nvtx, "range_pop", self.pop)
        monkeypatch.setattr(torch.cuda.nvtx, "range", self.annotate)

    def push(self, name, *args, **kwargs):
        self.opened.append((name, self.depth))
        self.depth += 1

    def pop(self, *args, **kwargs):
        self.closed += 1
        self.depth -= 1

    @contextlib.contextmanager
    def annotate(self, name, *args, **kwargs):
        self.push(name)
        try:
            yield
        finally:
            self.pop()


def test_sampling_with_ranges_on_marks_every_step_and_model_call_and_gives_the_same_result(monkeypatch):
    """nvtx=True opens one range per step and, inside it, one per model call (and nvtx=False none), and leaves
    the numbers alone. Fails if nvtx=True is ignored (planted: sample() passing nvtx=False to the runner) or if
    the model calls go unmarked (planted: the engine's forward calling nvtx_range with False)."""
    monkeypatch.delenv("PNDM_FAST_NVTX", raising=False)
    schedule = Schedule.from_config({"type": "linear", "diffusion_step": 1000})
    plan = build_plan(schedule, "F-PNDM", 8)
    model = _TimeAware(torch.nn.Conv2d(3, 3, 1))
    noise = torch.randn(2, 3, 4, 4)
    ranges = _Ranges(monkeypatch)
    with torch.no_grad():
        plain = sample(model, noise, schedule, "F-PNDM", 8, "fused", nvtx=False)
        assert ranges.opened == [], "ranges opened with nvtx=False"
        marked = sample(model, noise, schedule, "F-PNDM", 8, "fused", nvtx=True)
    torch.testing.assert_close(plain, marked, rtol=0, atol=0)
    steps = [name for name, depth in ranges.opened if depth == 0]
    calls = [name for name, depth in ranges.opened if depth == 1]
    assert steps == [f"step {i}" for i in range(len(plan.steps))]
    assert len(calls) == plan.model_calls == 17 and all(name.startswith("model t=") for name in calls)
    assert ranges.closed == len(ranges.opened) and ranges.depth == 0


class _TimeAware(torch.nn.Module):
    def __init__(self, conv):
        super().__init__()
        self.conv = conv

    def forward(self, x, t):
        return self.conv(x) * (t.view(-1, 1, 1, 1) / 1000)
