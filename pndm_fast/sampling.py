"""The one public sampling entry point: sample(model, noise, schedule, method, sample_step, backend, ...)."""

from __future__ import annotations

import functools
import weakref

import torch

from . import reference
from .engine import GraphRunner, PlanRunner
from .errors import UserError
from .plans import PLAN_BUILDERS, Plan, build_plan
from .profiling import nvtx_enabled
from .schedule import Schedule

METHODS = tuple(PLAN_BUILDERS)
BACKENDS = ("auto", "reference", "torch", "fused", "graph")
"""reference: the paper's formulas op by op. torch: plans with plain-torch combinations. fused: plans with the
fused op (Triton on CUDA, C++ on CPU). graph: fused, with the whole loop in one CUDA graph (CUDA only)."""

# Runners own buffers (and graphs) for one model; they die with it.
_RUNNERS: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()
_COMPILED: "weakref.WeakKeyDictionary[torch.nn.Module, torch.nn.Module]" = weakref.WeakKeyDictionary()


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "graph" if device.type == "cuda" else "fused"
    if backend == "graph" and device.type != "cuda":
        raise UserError(f"backend 'graph' captures CUDA graphs and needs a CUDA device, not {device.type}; "
                        "use --backend fused (or auto)")
    return backend


@functools.lru_cache(maxsize=64)
def cached_plan(schedule: Schedule, method: str, sample_step: int) -> Plan:
    return build_plan(schedule, method, sample_step)


def model_dtype_of(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def compiled(model: torch.nn.Module) -> torch.nn.Module:
    """The UNet under torch.compile, prepared once per model.

    Models that name their `compile_regions` (both UNets here) get each such block compiled in place: regional
    compilation compiles a repeated block once, and keeps inductor from fusing across blocks, which on the CPU
    made a whole-model compile drift to 2.5x the float32 reference's error over a golden sampling run (the
    blocks compiled one by one stay within it). Other models are compiled whole. Inductor's own CUDA graphs
    stay off: the graph backend captures the whole loop itself, and nesting the two would capture twice.
    """
    if model not in _COMPILED:
        options = {"dynamic": False, "options": {"triton.cudagraphs": False}}
        regions = getattr(model, "compile_regions", None)
        if regions is None:
            _COMPILED[model] = torch.compile(model, **options)
        else:
            # One block class meets many shapes (channels and resolution per level, the batch size), each a
            # compiled variant; past dynamo's recompile limit (8) the rest would silently run eagerly.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 128)
            for block in model.modules():
                if isinstance(block, regions):
                    block.compile(**options)
            _COMPILED[model] = model
    return _COMPILED[model]


def sample(model: torch.nn.Module, noise: torch.Tensor, schedule: Schedule, method: str = "F-PNDM",
           sample_step: int = 50, backend: str = "reference", return_trajectory: bool = False, *,
           compile: bool = False, nvtx: bool | None = None, channels_last: bool = False,
           impl: str = "auto") -> torch.Tensor:
    """Sample from `noise` (B, C, H, W) with `method` in `sample_step` steps.

    Returns the final x in noise's dtype, or with return_trajectory a (steps + 1, B, C, H, W) tensor whose
    entry 0 is the noise. The model runs in its own parameters' dtype; the fast backends keep the sampler state
    in float32 (float64 when the noise is float64). `compile=True` compiles the model's blocks in place, once
    (see `compiled`). `impl` picks the fused op's implementation ("auto", "triton", "cpp" or "torch").
    Runs without autograd: sampling never needs gradients, and a captured graph must not record them.
    """
    if method not in PLAN_BUILDERS:
        raise UserError(f"unknown method {method!r}: expected one of {', '.join(PLAN_BUILDERS)}")
    if noise.dim() != 4:
        raise UserError(f"noise must be (batch, channels, height, width), got shape {tuple(noise.shape)}")
    backend = resolve_backend(backend, noise.device)
    net = compiled(model) if compile else model
    with torch.no_grad():
        if backend == "reference":
            return reference.sample_reference(reference_eps_model(net, noise.shape[1]), noise, schedule, method,
                                              sample_step, return_trajectory)
        runner = plan_runner(model, net, noise, schedule, method, sample_step, backend, return_trajectory,
                             nvtx_enabled(nvtx), channels_last, impl)
        runner.run(noise)
        out = runner.trajectory if return_trajectory else runner.x
        return out.to(noise.dtype, copy=True)


def reference_eps_model(model: torch.nn.Module, channels: int):
    """eps = m(x, t) with t as the reference passes it: a float32 tensor of shape (batch,), all equal."""
    def eps(x: torch.Tensor, t: float) -> torch.Tensor:
        return model(x, torch.full((x.shape[0],), t, dtype=torch.float32, device=x.device))[:, :channels]

    return eps


def plan_runner(model, net, noise, schedule, method, sample_step, backend, trajectory, nvtx, channels_last, impl):
    """The runner for this model, shape, dtype and plan, built on first use and kept with the model."""
    plan = cached_plan(schedule, method, sample_step)
    state_dtype = torch.float64 if noise.dtype == torch.float64 else torch.float32
    key = (plan, tuple(noise.shape), noise.device, state_dtype, backend, trajectory, nvtx, channels_last, impl,
           net is model)
    runners = _RUNNERS.setdefault(model, {})
    if key not in runners:
        runner = PlanRunner(plan, net, noise.shape, noise.device, model_dtype_of(model), state_dtype,
                            impl="torch" if backend == "torch" else impl, nvtx=nvtx,
                            channels_last=channels_last, trajectory=trajectory)
        runners[key] = GraphRunner(runner) if backend == "graph" else runner
    return runners[key]
