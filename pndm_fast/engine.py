"""Executors that run any lowered plan: fused eager, and the whole loop captured in one CUDA graph.

State buffers are allocated once per (plan, shape, dtypes) before the loop, so a step allocates nothing of its own
beyond the network's outputs, and a CUDA graph sees stable addresses. The network's outputs are not copied: each
forward puts its tensors straight into the operand lists of the launches that read them, and each launch lets go
of them once it has run (so a run holds at most the history it needs). The loop never reads a tensor's value on
the host: no .item(), no .cpu(), no branch on data.
"""

from __future__ import annotations

from typing import Callable

import torch

from .adapters import Caller
from .lowering import Forward, Launch, Program
from .ops import bind
from .profiling import nvtx_range


class PlanRunner:
    """Walks a lowered program over buffers it owns. `x` is the state: copy the noise in, walk, read x out."""

    def __init__(self, program: Program, caller: Caller, shape: torch.Size, device: torch.device,
                 model_dtype: torch.dtype, state_dtype: torch.dtype = torch.float32, *, fused_op: str = "auto",
                 nvtx: bool = False, channels_last: bool = False, trajectory: bool = False):
        self.nvtx, self.caller = nvtx, caller
        fmt = torch.channels_last if channels_last else torch.contiguous_format

        def buffer(dtype):
            return torch.empty(shape, dtype=dtype, device=device, memory_format=fmt)

        self.buffers = {name: buffer(state_dtype) for name in program.state}
        self.x = self.buffers["x"]
        self.trajectory = (torch.empty((len(program.steps) + 1, *shape), dtype=state_dtype, device=device)
                           if trajectory else None)
        # A stand-in for every slot while launches are checked once, here: the model's dtype and the run's layout.
        stand_in = buffer(model_dtype)
        # Which (operand list, index) pairs read the value each forward writes into a slot: resolved by walking the
        # program in order, since a slot name is reused (a history ring) and each read sees its latest forward.
        consumers: dict[str, list] = {}
        self.program = []
        for step in program.steps:
            calls = []
            for op in step:
                if isinstance(op, Forward):
                    targets = [[] for _ in op.outputs]
                    for name, target in zip(op.outputs, targets):
                        consumers[name] = target
                    calls.append(_forward(caller, self.buffers[op.src], op, targets, nvtx))
                else:
                    calls.append(self._launch(op, consumers, stand_in, fused_op))
            self.program.append(calls)

    def run(self, noise: torch.Tensor) -> None:
        """Sample from `noise`; the result is left in `x` (and `trajectory`, when kept)."""
        self.x.copy_(noise)
        self.walk()

    def walk(self) -> None:
        """Run the whole program from the noise already in `x`."""
        if self.trajectory is not None:
            self.trajectory[0].copy_(self.x)
        for i, step in enumerate(self.program):
            with nvtx_range(f"step {i}", self.nvtx):
                for call in step:
                    call()
            if self.trajectory is not None:
                self.trajectory[i + 1].copy_(self.x)

    def _launch(self, op: Launch, consumers: dict, stand_in: torch.Tensor, fused_op: str) -> Callable[[], None]:
        b = self.buffers
        operands = [b[n] if n in b else stand_in for n in op.operands]
        slots = [j for j, n in enumerate(op.operands) if n not in b]
        call = bind(b[op.out], b[op.base], operands, op.weights, keep_x=op.keep,
                    out2=b[op.out2] if op.out2 else None, weights2=op.weights2 or None, keep_x2=op.keep2, impl=fused_op,
                    operands_change=bool(slots))
        for j in slots:
            consumers[op.operands[j]].append((operands, j))
        if not slots:
            return call
        # Closures over lists and tensors, never over self: a runner must be freed as soon as its cache drops it,
        # and a bound method in its own program would make a cycle that only the garbage collector breaks, later.

        def run() -> None:
            call()
            for j in slots:  # let go of the network's output: the next forward brings a new one
                operands[j] = stand_in

        return run


def _forward(caller: Caller, src: torch.Tensor, op: Forward, targets: list[list], nvtx: bool) -> Callable[[], None]:
    label = f"model t={op.t:g}"
    t = op.t

    def run() -> None:
        with nvtx_range(label, nvtx):
            outputs = caller(src, t)
        for out, target in zip(outputs, targets):
            for operands, j in target:
                operands[j] = out

    return run


class GraphRunner:
    """One CUDA graph holding the whole sampling loop, every model call and every combination.

    Capture warms up on a side stream first (cuDNN/cuBLAS choose algorithms and torch.compile compiles there,
    outside the graph); replay copies the noise into the static `x` and relaunches everything in one call. The
    network's outputs live in the graph's private memory pool, at the addresses the capture gave them.
    """

    def __init__(self, runner: PlanRunner):
        # Holding the runner holds every buffer the graph reads or writes: freed, the allocator would hand
        # their memory to other tensors while the graph still writes there on each replay.
        self.runner = runner
        self.x, self.trajectory, self.caller = runner.x, runner.trajectory, runner.caller
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
