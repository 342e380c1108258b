"""NVTX ranges: off by default and free then; on, they leave the numbers alone."""

import torch

from pndm_fast import Schedule
from pndm_fast.profiling import nvtx_enabled, nvtx_range
from pndm_fast.sampling import sample


def test_disabled_ranges_are_one_shared_no_op():
    assert nvtx_range("a", False) is nvtx_range("b", False)


def test_switch_follows_the_flag_then_the_environment(monkeypatch):
    monkeypatch.delenv("PNDM_FAST_NVTX", raising=False)
    assert not nvtx_enabled() and nvtx_enabled(True)
    monkeypatch.setenv("PNDM_FAST_NVTX", "1")
    assert nvtx_enabled() and not nvtx_enabled(False)


def test_sampling_with_ranges_on_gives_the_same_result():
    schedule = Schedule.from_config({"type": "linear", "diffusion_step": 1000})
    model = _TimeAware(torch.nn.Conv2d(3, 3, 1))
    noise = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        plain = sample(model, noise, schedule, "F-PNDM", 8, "fused", nvtx=False)
        marked = sample(model, noise, schedule, "F-PNDM", 8, "fused", nvtx=True)
    torch.testing.assert_close(plain, marked, rtol=0, atol=0)


class _TimeAware(torch.nn.Module):
    def __init__(self, conv):
        super().__init__()
        self.conv = conv

    def forward(self, x, t):
        return self.conv(x) * (t.view(-1, 1, 1, 1) / 1000)
