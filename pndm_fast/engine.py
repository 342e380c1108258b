"""Executors that run any lowered plan: fused eager, and the whole loop captured in one CUDA graph.

State buffers are allocated once per (plan, shape, dtypes) before the loop, so a step allocates nothing of its own
beyond the network's outputs, and a CUDA graph sees stable addresses. The network's outputs are not copied: each
forward puts its tensors straight into the operand lists of the launches that read them, and each launch lets go
of them once it has run (so a run holds at most the history it needs). The loop never reads a tensor's value on
the host: no .item(), no .cpu(), no branch on data.
"""

from __future__ import annotations

import functools
import threading
from typing import Callable

import torch

from .adapters import Caller
from .lowering import Forward, Launch, Noise, Program
from .plans import Blend, Threshold
from .ops import bind
from .profiling import nvtx_range


class PlanRunner:
    """Walks a lowered program over buffers it owns. `x` is the state: copy the noise in, walk, read x out."""

    def __init__(self, program: Program, caller: Caller, shape: torch.Size, device: torch.device,
                 model_dtype: torch.dtype, state_dtype: torch.dtype = torch.float32, *, fused_op: str = "auto",
                 nvtx: bool = False, channels_last: bool = False, trajectory: bool = False):
        self.caller = caller
        fmt = torch.channels_last if channels_last else torch.contiguous_format

        def buffer(dtype):
            return torch.empty(shape, dtype=dtype, device=device, memory_format=fmt)

        self.buffers = {name: buffer(state_dtype) for name in program.state}
        self.x = self.buffers["x"]
        # The run's fresh noises (stochastic plans), all filled before the loop and bound below, in the run's layout.
        self.draws = [buffer(state_dtype) for _ in range(program.draws)]
        # An inpainting plan's inputs: the mask, (1 - mask) image and (1 - mask) noise, filled before the loop.
        self.mask_inputs = [buffer(state_dtype) for _ in range(3 if program.masked else 0)]
        self.trajectory = (torch.empty((len(program.steps) + 1, *shape), dtype=state_dtype, device=device)
                           if trajectory else None)
        # A stand-in for every slot while launches are checked once, here: the model's dtype and the run's layout.
        stand_in = buffer(model_dtype)
        # Which (operand list, index) pairs read the value each forward writes into a slot: resolved by walking the
        # program in order, since a slot name is reused (a history ring) and each read sees its latest forward.
        # While `watch["on"]`, each step's last forward leaves (its input, copied; t; its outputs) in watch["last"]:
        # what a per-step callback needs for the data prediction. Off, a forward pays one dict lookup. With
        # watch["into"] = (input, outputs), static tensors, it copies them there instead (a segmented graph's).
        self.watch = {"on": False, "last": None, "into": None}
        consumers: dict[str, list] = {}
        drawn: dict[str, torch.Tensor] = {}  # noise buffer -> the draw it holds now
        self.program = []
        for step in program.steps:
            calls = []
            last_forward = max((i for i, op in enumerate(step) if isinstance(op, Forward)), default=None)
            for index, op in enumerate(step):
                if isinstance(op, Noise):
                    drawn[op.dst] = self.draws[op.index]
                elif isinstance(op, Threshold):
                    calls.append(functools.partial(dynamic_threshold_, self.buffers[op.buf], op.ratio, op.max_value))
                elif isinstance(op, Blend):
                    calls.append(functools.partial(blend_, self.buffers[op.buf], *self.mask_inputs, op.image_weight,
                                                   op.noise_weight))
                elif isinstance(op, Forward):
                    targets = [[] for _ in op.outputs]
                    for name, target in zip(op.outputs, targets):
                        consumers[name] = target
                    watch = self.watch if index == last_forward else None
                    calls.append(_forward(caller, self.buffers[op.src], op, targets, nvtx, watch))
                else:
                    calls.append(self._launch(op, consumers, drawn, stand_in, fused_op))
            self.program.append(calls)
        # Each step as one call: what the eager walk runs, and what a segmented graph captures step by step.
        self.steps = [functools.partial(_run_step, calls, f"step {i}", nvtx) for i, calls in enumerate(self.program)]

    def run(self, noise: torch.Tensor, draws: torch.Tensor | None = None, mask_inputs=None) -> None:
        """Sample from `noise` (with the fresh `draws` a stochastic plan reads, the `mask_inputs` an inpainting plan
        reads); the result is left in `x` (and `trajectory`, when kept)."""
        load_inputs(self, noise, draws, mask_inputs)
        self.walk()

    def walk(self, after_step: Callable[[int], None] | None = None) -> None:
        """Run the whole program from the noise already in `x`; `after_step(i)` runs after step i (a callback),
        before the trajectory keeps the state."""
        walk_steps(self.steps, self.x, self.trajectory, after_step)

    def _launch(self, op: Launch, consumers: dict, drawn: dict, stand_in: torch.Tensor,
                fused_op: str) -> Callable[[], None]:
        b = self.buffers
        operands = [b[n] if n in b else drawn[n] if n in drawn else stand_in for n in op.operands]
        slots = [j for j, n in enumerate(op.operands) if n not in b and n not in drawn]
        call = bind(b[op.out], b[op.base], operands, op.weights, keep_x=op.keep,
                    out2=b[op.out2] if op.out2 else None, weights2=op.weights2 or None, keep_x2=op.keep2,
                    blend=self.mask_inputs if op.blend else None, blend_weights=op.blend, impl=fused_op,
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


def _run_step(calls: list[Callable[[], None]], label: str, nvtx: bool) -> None:
    with nvtx_range(label, nvtx):
        for call in calls:
            call()


def walk_steps(steps: list[Callable[[], None]], x: torch.Tensor, trajectory: torch.Tensor | None,
               after_step: Callable[[int], None] | None) -> None:
    """Run `steps` in order; after step i, `after_step(i)`, then the trajectory (when kept) takes the state x."""
    if trajectory is not None:
        trajectory[0].copy_(x)
    for i, step in enumerate(steps):
        step()
        if after_step is not None:
            after_step(i)
        if trajectory is not None:
            trajectory[i + 1].copy_(x)


def dynamic_threshold_(x: torch.Tensor, ratio: float, max_value: float) -> None:
    """x <- Imagen's dynamic thresholding of x, per image, in place (no value leaves the device)."""
    flat = x.reshape(x.shape[0], -1)
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp_(min=1.0, max=max_value)
    s = s.view(-1, *([1] * (x.dim() - 1)))
    x.copy_(torch.minimum(torch.maximum(x, -s), s) / s)


def blend_(x: torch.Tensor, mask: torch.Tensor, known_image: torch.Tensor, known_noise: torch.Tensor,
           image_weight: float, noise_weight: float) -> None:
    """x <- mask x + image_weight (1 - mask) image + noise_weight (1 - mask) noise, in place."""
    x.mul_(mask).add_(known_image, alpha=image_weight)
    if noise_weight:
        x.add_(known_noise, alpha=noise_weight)


def load_inputs(runner, noise: torch.Tensor, draws: torch.Tensor | None, mask_inputs=None) -> None:
    """Copy the noise (and a stochastic plan's draws, an inpainting plan's mask inputs) into the runner's static
    buffers."""
    given = 0 if draws is None else len(draws)
    if given != len(runner.draws):
        raise ValueError(f"the plan reads {len(runner.draws)} fresh noises, given {given}")
    if len(mask_inputs or ()) != len(runner.mask_inputs):
        raise ValueError(f"the plan reads {len(runner.mask_inputs)} mask inputs, given {len(mask_inputs or ())}")
    runner.x.copy_(noise)
    for buffer, z in zip(runner.draws, draws if given else ()):
        buffer.copy_(z)
    for buffer, value in zip(runner.mask_inputs, mask_inputs or ()):
        buffer.copy_(value)


def _forward(caller: Caller, src: torch.Tensor, op: Forward, targets: list[list], nvtx: bool,
             watch: dict | None) -> Callable[[], None]:
    """One forward; `watch`: the runner's, for the last forward of a step (None for the others)."""
    label = f"model t={op.t:g}"
    t = op.t

    def run() -> None:
        with nvtx_range(label, nvtx):
            outputs = caller(src, t)
        if watch is not None and watch["on"]:
            into = watch["into"]
            if into is None:
                watch["last"] = (src.clone(), t, outputs)
            else:
                into[0].copy_(src)
                for buffer, out in zip(into[1], outputs):
                    buffer.copy_(out)
                watch["last"] = (into[0], t, into[1])
        for out, target in zip(outputs, targets):
            for operands, j in target:
                operands[j] = out

    return run


class GraphRunner:
    """The whole sampling loop in CUDA graphs, every model call and every combination.

    Capture warms up on a side stream first (cuDNN/cuBLAS choose algorithms and torch.compile compiles there,
    outside the graph); replay copies the noise into the static `x` and relaunches everything in one call. The
    network's outputs live in the graph's private memory pool, at the addresses the capture gave them.
    `segmented`: one graph per plan step instead, sharing one pool and replayed in the order they were captured, so
    that the host can run a callback between two steps (`walk`); each step's last forward then also copies its
    input and outputs into one static set of tensors, which the callback's data prediction reads.
    """

    def __init__(self, runner: PlanRunner, segmented: bool = False):
        # Holding the runner holds every buffer the graph reads or writes: freed, the allocator would hand
        # their memory to other tensors while the graph still writes there on each replay.
        self.runner = runner
        self.x, self.draws, self.trajectory, self.caller = runner.x, runner.draws, runner.trajectory, runner.caller
        self.mask_inputs, self.watch = runner.mask_inputs, runner.watch
        self.segmented, self.graphs = segmented, []
        self.watched = []  # segmented: (input, t, outputs) of each step's last forward; the tensors are shared
        # One capture at a time in the process: a capture begins with a device-wide synchronize, which fails while
        # another thread's capture is open and leaves that thread's CUDA generator stuck in capture mode for the
        # rest of the process. thread_local: meanwhile other threads may go on launching, allocating and syncing.
        with _CAPTURE_LOCK:
            runner.watch["on"] = segmented  # read while capturing only: a replay runs no Python
            try:
                warm_up(runner)
                if segmented:
                    # One static set for every step, outside the graphs' pool: a callback reads step i's before
                    # step i + 1 replays.
                    src, _, outputs = runner.watch["last"]
                    runner.watch["into"] = (torch.empty_like(src), [torch.empty_like(out) for out in outputs])
                    self._capture_steps()
                else:
                    self.graphs.append(captured(runner.walk))
            finally:
                # `into` stays: it names what the step graphs copy into (and a stand-in for them, replaying the
                # Python, copies there too)
                runner.watch.update(on=False, last=None)

    def _capture_steps(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        for step in self.runner.steps:
            self.graphs.append(captured(step, pool))
            self.watched.append(self.runner.watch["last"])

    def run(self, noise: torch.Tensor, draws: torch.Tensor | None = None, mask_inputs=None) -> None:
        """Sample from `noise` (and `draws`, `mask_inputs`) by replaying the graph; the result is left in `x` (and
        `trajectory`)."""
        load_inputs(self, noise, draws, mask_inputs)
        self.walk()

    def walk(self, after_step: Callable[[int], None] | None = None) -> None:
        """Replay from the noise already in `x`; a segmented runner runs `after_step(i)` on the host after step i
        (with watch["last"] holding that step's last forward), before the trajectory keeps the state."""
        if not self.segmented:
            if after_step is not None:
                raise ValueError("a whole-loop graph has no place between its steps: capture it segmented")
            self.graphs[0].replay()
            return

        def watched_after(i: int) -> None:
            self.watch["last"] = self.watched[i]
            after_step(i)

        walk_steps([graph.replay for graph in self.graphs], self.x, self.trajectory,
                   None if after_step is None else watched_after)


def warm_up(runner: PlanRunner) -> None:
    """One walk of the program on a side stream, from random inputs: what capture needs first (cuDNN and cuBLAS
    choose their algorithms, torch.compile compiles), outside any graph."""
    side = warmup_stream(runner.x.device)
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        runner.x.normal_()
        for buffer in runner.draws + runner.mask_inputs:
            buffer.normal_()
        runner.walk()
    torch.cuda.current_stream().wait_stream(side)


def captured(fn: Callable[[], None], pool=None) -> torch.cuda.CUDAGraph:
    """What `fn` launches, captured in a new CUDA graph (in `pool`, a graph pool handle, when given)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        fn()
    return graph


_CAPTURE_LOCK = threading.RLock()  # re-entrant: a network may itself sample with a graph
_WARMUP_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def warmup_stream(device: torch.device) -> torch.cuda.Stream:
    """One side stream per device for every capture's warm-up. cuBLAS keeps a workspace (32 MiB on Hopper) for
    each stream it ever ran on, for the life of the process: a fresh stream per capture leaked one per graph."""
    if device not in _WARMUP_STREAMS:
        _WARMUP_STREAMS[device] = torch.cuda.Stream(device)
    return _WARMUP_STREAMS[device]
