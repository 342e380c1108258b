"""Executors that run any plan: fused eager, and the whole loop captured in one CUDA graph.

Buffers are allocated once per (plan, shape, dtypes) before the loop, so a step allocates nothing of its own and
a CUDA graph sees stable addresses. Time tensors are precomputed too. The loop never reads a tensor's value on
the host: no .item(), no .cpu(), no branch on data.
"""

from __future__ import annotations

from typing import Callable

import torch

from .ops import bind
from .plans import STATE, Combine, ModelCall, Plan
from .profiling import nvtx_range


class PlanRunner:
    """Walks a plan over buffers it owns. `x` is the state: copy the noise in, walk, read x out."""

    def __init__(self, plan: Plan, model: Callable, shape: torch.Size, device: torch.device,
                 model_dtype: torch.dtype, state_dtype: torch.dtype = torch.float32, *, impl: str = "auto",
                 nvtx: bool = False, channels_last: bool = False, trajectory: bool = False):
        self.model, self.impl, self.nvtx = model, impl, nvtx
        self.eps_channels = shape[1]
        fmt = torch.channels_last if channels_last else torch.contiguous_format

        def buffer(dtype, size=shape):
            return torch.empty(size, dtype=dtype, device=device, memory_format=fmt)

        self.buffers = {name: buffer(state_dtype if kind == STATE else model_dtype) for name, kind in plan.buffers}
        self.x = self.buffers["x"]
        # The model reads its own dtype; a bf16 model gets a bf16 copy of the float32 state, made in place.
        self.model_input = buffer(model_dtype) if model_dtype != state_dtype else None
        call_times = {e.t for step in plan.steps for e in step if isinstance(e, ModelCall)}
        self.times = {t: torch.full((shape[0],), t, dtype=torch.float32, device=device) for t in call_times}
        self.trajectory = (torch.empty((len(plan.steps) + 1, *shape), dtype=state_dtype, device=device)
                           if trajectory else None)
        # The plan as calls with their arguments bound: each combination is checked once, here, and launched
        # inside the loop with no Python-side checks.
        # Closures over the buffers, never over self: a runner must be freed as soon as its cache drops it, and a
        # bound method in its own program would make a cycle that only the garbage collector breaks, later.
        self.program = [[self._model_call(e) if isinstance(e, ModelCall) else self._bind(e) for e in step]
                        for step in plan.steps]

    def run(self, noise: torch.Tensor) -> None:
        """Sample from `noise`; the result is left in `x` (and `trajectory`, when kept)."""
        self.x.copy_(noise)
        self.walk()

    def walk(self) -> None:
        """Run the whole plan from the noise already in `x`."""
        if self.trajectory is not None:
            self.trajectory[0].copy_(self.x)
        for i, step in enumerate(self.program):
            with nvtx_range(f"step {i}", self.nvtx):
                for call in step:
                    call()
            if self.trajectory is not None:
                self.trajectory[i + 1].copy_(self.x)

    def _model_call(self, call: ModelCall) -> Callable[[], None]:
        model, model_input, nvtx, channels = self.model, self.model_input, self.nvtx, self.eps_channels
        src, dst, t = self.buffers[call.src], self.buffers[call.dst], self.times[call.t]
        label = f"model t={call.t:g}"

        def run() -> None:
            x = src if model_input is None else model_input.copy_(src)
            with nvtx_range(label, nvtx):
                eps = model(x, t)
            # A learned-sigma model returns 2C channels; the sampler uses the first C (the eps).
            dst.copy_(eps[:, :channels])

        return run

    def _bind(self, c: Combine):
        b = self.buffers
        return bind(b[c.out], self.x, [b[n] for n in c.operands], c.weights, keep_x=c.keep_x,
                    out2=b[c.out2] if c.out2 else None, weights2=c.weights2 or None, keep_x2=c.keep_x2,
                    impl=self.impl)


class GraphRunner:
    """One CUDA graph holding the whole sampling loop, every model call and every combination.

    Capture warms up on a side stream first (cuDNN/cuBLAS choose algorithms and torch.compile compiles there,
    outside the graph); replay copies the noise into the static `x` and relaunches everything in one call.
    """

    def __init__(self, runner: PlanRunner):
        # Holding the runner holds every buffer the graph reads or writes: freed, the allocator would hand
        # their memory to other tensors while the graph still writes there on each replay.
        self.runner = runner
        self.x, self.trajectory = runner.x, runner.trajectory
        side = warmup_stream(runner.x.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            runner.x.normal_()
            runner.walk()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            runner.walk()

    def run(self, noise: torch.Tensor) -> None:
        """Sample from `noise` by replaying the graph; the result is left in `x` (and `trajectory`)."""
        self.x.copy_(noise)
        self.graph.replay()


_WARMUP_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def warmup_stream(device: torch.device) -> torch.cuda.Stream:
    """One side stream per device for every capture's warm-up. cuBLAS keeps a workspace (32 MiB on Hopper) for
    each stream it ever ran on, for the life of the process: a fresh stream per capture leaked one per graph."""
    if device not in _WARMUP_STREAMS:
        _WARMUP_STREAMS[device] = torch.cuda.Stream(device)
    return _WARMUP_STREAMS[device]
