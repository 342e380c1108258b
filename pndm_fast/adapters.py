"""Model adapters: how to call a network and how to read what it returns (docs/design.md, "Model adapters").

`Denoiser(net, prediction, cond, uncond, guidance, **model_kwargs)` wraps any network called as
`net(x, t, **kwargs)` with x (B, C, H, W) and t (B,) float times. It says:
- what the network predicts: "eps" (the noise), "x0" (the data), "v" (alpha eps - sigma x0), "flow" (a rectified
  flow's velocity eps - x0) or "edm" (EDM's raw network under its preconditioning); the sampler reads eps =
  linear in (x, output) with the level the model is asked about at t (`Schedule.alpha(t)`), folded into the fused
  combination that consumes it;
- what the network reads: its family's own state (the schedule's; a flow model (1 - s) x0 + s eps) and its own
  time input (`TIME_INPUTS`: the schedule's time, 1000 times it, sigma, EDM's c_noise), one mapping here;
- classifier-free guidance: eps = eps_u + w (eps_c - eps_u), the conditional inputs `cond` and unconditional
  `uncond` run as one batched forward where they concatenate (tensors of one shape), two forwards otherwise; the
  weights (1 - w, w) are folded into the consuming combination too, so guidance adds no pass over memory;
- learned sigma: an output of 2C channels is read as its first C (a network that can skip the other half says so
  with `eps_only_supported`, and is asked for eps only).
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable

import torch

from .errors import UserError
from .levels import PREDICTION_FAMILIES, PREDICTIONS, Level, eps_weights, network_input_scale
from .plans import Expr, var

DIFFUSERS_PREDICTIONS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v", "flow_prediction": "flow"}

TIME_INPUTS: dict[str, Callable] = {
    "t": lambda schedule, t: t,                                  # the schedule's own time (integer t, s, sigma)
    "1000t": lambda schedule, t: 1000.0 * t,                      # SD3's timestep, 1000 s
    "sigma": lambda schedule, t: Level.of(schedule.alpha(t)).rho,  # EDM's (and k-diffusion's) sigma
    "c_noise": lambda schedule, t: math.log(Level.of(schedule.alpha(t)).rho) / 4,  # EDM's raw network
}
"""The time a network is given for a call at the schedule's time t: each a function (schedule, t) -> float."""


class Denoiser:
    """A network and how to read it. `cond`/`uncond` are dicts of keyword arguments for the network (e.g.
    cond={"y": labels}, uncond={"y": None}); `guidance` w = 1 uses cond alone, w = 0 uncond alone."""

    def __init__(self, net: Callable, prediction: str | None = None, cond: dict | None = None,
                 uncond: dict | None = None, guidance: float = 1.0, time_input: str | None = None,
                 guidance_rescale: float = 0.0, **model_kwargs: Any):
        if not callable(net):
            raise UserError(f"Denoiser needs a callable network net(x, t, **kwargs), got {type(net).__name__}")
        # a network built from a config says how it reads (`sampling_reading`); eps at the schedule's time otherwise
        declared = getattr(net, "sampling_reading", None) or {}
        prediction = declared.get("prediction", "eps") if prediction is None else prediction
        if time_input is None:
            time_input = declared.get("time_input", "c_noise" if prediction == "edm" else "t")
        if prediction not in PREDICTIONS:
            raise UserError(f"unknown prediction {prediction!r}: expected one of {', '.join(PREDICTIONS)}")
        for name, value in (("cond", cond), ("uncond", uncond)):
            if value is not None and not isinstance(value, dict):
                raise UserError(f"Denoiser {name} must be a dict of keyword arguments for the network, got "
                                f"{type(value).__name__}")
        if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance) \
                or guidance < 0:
            raise UserError(f"guidance must be a finite number >= 0 (1 is no guidance), got {guidance!r}")
        if guidance != 1.0 and uncond is None:
            raise UserError(f"guidance {guidance:g} needs the unconditional inputs: pass uncond={{...}} (e.g. "
                            "uncond={'y': None}); guidance 1 uses cond alone")
        if time_input not in TIME_INPUTS:
            raise UserError(f"unknown time_input {time_input!r}: expected one of {', '.join(TIME_INPUTS)}")
        if isinstance(guidance_rescale, bool) or not isinstance(guidance_rescale, (int, float)) or \
                not 0.0 <= guidance_rescale <= 1.0:
            raise UserError(f"guidance_rescale must be a number in [0, 1] (0: none), got {guidance_rescale!r}")
        self.net, self.prediction, self.time_input = net, prediction, time_input
        # diffusers' guidance_rescale (Lin et al. 2023): a ratio of standard deviations per image, not linear in the
        # outputs, so the runner mixes the branches itself and folds only what follows
        self.guidance_rescale = float(guidance_rescale) if guidance != 1.0 else 0.0
        self.cond, self.uncond, self.guidance = dict(cond or {}), dict(uncond or {}), float(guidance)
        self.model_kwargs = model_kwargs

    @classmethod
    def from_diffusers(cls, unet: torch.nn.Module, prediction: str = "epsilon", **kwargs: Any) -> "Denoiser":
        """Adapt a diffusers UNet2DModel, UNet2DConditionModel or transformer (DiT's Transformer2DModel,
        SD3Transformer2DModel): it returns an output object, read here as its `.sample`. `prediction` takes
        diffusers' names (epsilon, sample, v_prediction, flow_prediction) or ours; kwargs go to Denoiser
        (cond={"encoder_hidden_states": ...}, guidance, time_input, ...)."""
        prediction = DIFFUSERS_PREDICTIONS.get(prediction, prediction)
        return cls(DiffusersNet(unet), prediction, **kwargs)

    @property
    def module(self) -> torch.nn.Module | None:
        """The torch module behind the network (for its device, dtype and input checks), if there is one."""
        net = self.net.unet if isinstance(self.net, DiffusersNet) else self.net
        if not isinstance(net, torch.nn.Module):
            net = getattr(net, "module", None)  # a wrapper that names its module (the tuner's GatheredNet)
        return net if isinstance(net, torch.nn.Module) else None

    def check_schedule(self, schedule) -> None:
        """Refuse a prediction that is not defined on the schedule's family (a flow model under a VP schedule)."""
        families = PREDICTION_FAMILIES.get(self.prediction)
        if families is not None and schedule.family not in families:
            raise UserError(f"a {self.prediction!r} prediction belongs to a {' or '.join(families)} schedule, not "
                            f"the {schedule.description} one ({schedule.family}): give the model's own schedule")

    def network_time(self, schedule, t: float) -> float:
        """The time input the network is given for a call at the schedule's time t."""
        return float(TIME_INPUTS[self.time_input](schedule, t))

    def input_scale(self, schedule, t: float) -> float:
        """The factor the network's input is the solver's (variance-preserving) state times at time t."""
        return network_input_scale(schedule.family, self.prediction, schedule.alpha(t))

    @property
    def branches(self) -> int:
        """Network outputs per model call: 2 with guidance (conditional, unconditional), else 1."""
        return 1 if self.guidance == 1.0 else 2

    @property
    def outputs(self) -> int:
        """Outputs a runner's model call hands over: the branches, or their rescaled mix (guidance_rescale)."""
        return 1 if self.guidance_rescale else self.branches

    def eps_expression(self, src: str, outputs: tuple[str, ...], level: float) -> Expr:
        """eps as a linear expression of the model's input buffer `src` and its output slots (conditional first),
        for a call at model level `level` (alpha-bar at the call's time)."""
        w = self.guidance
        if w == 1.0 or self.guidance_rescale:  # one output: the network's, or the rescaled mix of both
            mixed = var(outputs[0])
        elif w == 0.0:
            mixed = var(outputs[1])
        else:
            # eps_u + w (eps_c - eps_u), with the unconditional output's weight first: it is the one near 1 at w ~ 1.
            mixed = (1.0 - w) * var(outputs[1]) + w * var(outputs[0])
        if self.prediction == "eps":
            return mixed
        on_x, on_output = eps_weights(self.prediction, level)
        return on_x * var(src) + on_output * mixed

    def caller(self, shape: torch.Size, model_dtype: torch.dtype, state_dtype: torch.dtype, device: torch.device,
               times, schedule, memory_format=torch.contiguous_format) -> "Caller":
        """The runner-side caller for inputs of `shape` and the model calls' `times` on `schedule`."""
        return Caller(self, shape, model_dtype, state_dtype, device, times, schedule, memory_format)

    def __repr__(self) -> str:
        extra = f", guidance={self.guidance:g}" if self.guidance != 1.0 else ""
        extra += f", time_input={self.time_input!r}" if self.time_input != "t" else ""
        return f"Denoiser({type(self.net).__name__}, prediction={self.prediction!r}{extra})"


class DiffusersNet(torch.nn.Module):
    """A diffusers UNet or transformer called as net(x, t, **kwargs) -> tensor (its output's .sample): the time
    goes in as the second argument of a UNet, as `timestep=` of a transformer (DiT, SD3, Flux)."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet
        second = list(inspect.signature(unet.forward).parameters)[1:2]
        self.time_positional = second == ["timestep"]

    def forward(self, x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if self.time_positional:
            return self.unet(x, t, return_dict=False, **kwargs)[0]
        return self.unet(x, timestep=t, return_dict=False, **kwargs)[0]


def _concatenable(cond: dict, uncond: dict, batch: int) -> bool:
    """Whether one forward of batch 2B can serve both branches: the same keys, each pair tensors of one shape
    with the batch first, one dtype and device, or the same non-tensor value."""
    if cond.keys() != uncond.keys():
        return False
    for key, c in cond.items():
        u = uncond[key]
        if isinstance(c, torch.Tensor) and isinstance(u, torch.Tensor):
            if c.shape != u.shape or c.dtype != u.dtype or c.device != u.device or c.dim() == 0 \
                    or c.shape[0] != batch:
                return False
        elif isinstance(c, torch.Tensor) or isinstance(u, torch.Tensor) or c is not u and c != u:
            return False
    return True


class Caller:
    """Runs the network for one runner: static inputs (the model-dtype copy of x, the batched 2B input and the
    conditioning tensors, so that a CUDA graph reads them at fixed addresses) and time tensors; returns the
    eps-shaped outputs, checked (a wrong shape, dtype or device is one line, never a broadcast), conditional first.

    The network itself is handed over by `load` for each run and dropped by `release`: a cached runner must not
    keep its network alive.
    """

    def __init__(self, denoiser: Denoiser, shape: torch.Size, model_dtype: torch.dtype, state_dtype: torch.dtype,
                 device: torch.device, times, schedule, memory_format):
        self.shape, self.device, self.format = tuple(shape), device, memory_format
        self.batch, self.channels = shape[0], shape[1]
        self.model_dtype, self.state_dtype = model_dtype, state_dtype
        guided = denoiser.branches == 2
        self.batched = guided and _concatenable(denoiser.cond, denoiser.uncond, self.batch)
        self.guidance, self.rescale = denoiser.guidance, denoiser.guidance_rescale
        rows = 2 * self.batch if self.batched else self.batch
        # a float64 network reads its time in float64 (a continuous time rounded to float32 would move it ~1e-7)
        time_dtype = torch.float64 if model_dtype == torch.float64 else torch.float32
        self.times = {t: torch.full((rows,), denoiser.network_time(schedule, t), dtype=time_dtype, device=device)
                      for t in times}
        # A family whose network reads a multiple of the solver's state (flow, EDM): the factor of each call.
        scales = {t: denoiser.input_scale(schedule, t) for t in times}
        self.scales = scales if any(c != 1.0 for c in scales.values()) else None
        # The network reads its own dtype, a batched guided call reads x twice, and a scaled input is a copy: one
        # static buffer for any of them.
        needs_input = self.batched or model_dtype != state_dtype or self.scales is not None
        self.input = (torch.empty((rows, *shape[1:]), dtype=model_dtype, device=device, memory_format=memory_format)
                      if needs_input else None)
        if self.batched:
            branches = [{key: _static(torch.cat([c, denoiser.uncond[key]])) if isinstance(c, torch.Tensor) else c
                         for key, c in denoiser.cond.items()}]
        elif guided:
            branches = [_statics(denoiser.cond), _statics(denoiser.uncond)]
        else:
            branches = [_statics(denoiser.cond)]
        extra = _statics(denoiser.model_kwargs)
        if getattr(denoiser.module, "eps_only_supported", False):
            extra["eps_only"] = True
        self.branch_kwargs = [{**extra, **branch} for branch in branches]
        self.net = None

    def load(self, denoiser: Denoiser) -> None:
        """Hand over the network and copy this call's conditioning values into the static inputs."""
        self.net = denoiser.net
        sources = ([{key: (c, denoiser.uncond[key]) for key, c in denoiser.cond.items()}] if self.batched else
                   [denoiser.cond, denoiser.uncond][:len(self.branch_kwargs)])
        for kwargs, source in zip(self.branch_kwargs, sources):
            for key, value in {**denoiser.model_kwargs, **source}.items():
                static = kwargs.get(key)
                if not isinstance(static, torch.Tensor):
                    continue
                if isinstance(value, tuple):
                    static[:self.batch].copy_(value[0])
                    static[self.batch:].copy_(value[1])
                else:
                    static.copy_(value)

    def release(self) -> None:
        self.net = None

    def __call__(self, src: torch.Tensor, t: float) -> tuple[torch.Tensor, ...]:
        times = self.times[t]
        if self.batched:
            b = self.batch
            self._fill(self.input[:b], src, t)
            self.input[b:].copy_(self.input[:b])
            out = self._checked(self.net(self.input, times, **self.branch_kwargs[0]), 2 * b)
            return self._mixed(out[:b], out[b:])
        x = src if self.input is None else self._fill(self.input, src, t)
        return self._mixed(*(self._checked(self.net(x, times, **kwargs), self.batch) for kwargs in self.branch_kwargs))

    def _mixed(self, *outputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not self.rescale:
            return outputs
        cond, uncond = (out.to(self.state_dtype) for out in outputs)
        return (rescaled_guidance(uncond + self.guidance * (cond - uncond), cond, self.rescale),)

    def _fill(self, dst: torch.Tensor, src: torch.Tensor, t: float) -> torch.Tensor:
        """dst = the network's input at t: the state, times the family's factor where there is one."""
        return dst.copy_(src) if self.scales is None else torch.mul(src, self.scales[t], out=dst)

    def _checked(self, out, rows: int) -> torch.Tensor:
        if not isinstance(out, torch.Tensor):
            raise UserError(f"the model returned a {type(out).__name__}, not a tensor: expected eps of shape "
                            f"{(rows, *self.shape[1:])}; wrap a network that returns a tuple or an output object "
                            "in pndm_fast.Denoiser (e.g. Denoiser.from_diffusers)")
        c = self.channels
        expected = (rows, *self.shape[1:])
        if out.shape != expected:
            learned = (rows, 2 * c, *self.shape[2:])
            if out.shape != learned:
                raise UserError(f"the model returned shape {tuple(out.shape)} for input {expected}: expected "
                                f"{expected} (or {learned} with a learned sigma); nothing is broadcast")
            out = out[:, :c]  # learned sigma: the eps half; dense when the batch is 1, else copied below
        if out.device != self.device or out.dtype not in OUTPUT_DTYPES:
            raise UserError(f"the model returned a {out.dtype} tensor on {out.device}: expected float32, bfloat16, "
                            f"float16 or float64 on {self.device}")
        if out.dtype == torch.float64 and self.state_dtype != torch.float64:
            out = out.to(self.model_dtype)  # the fused kernel reads float32, bfloat16 or float16 operands
        if not out.is_contiguous(memory_format=self.format):
            out = out.contiguous(memory_format=self.format)
        return out


def rescaled_guidance(guided: torch.Tensor, cond: torch.Tensor, rescale: float) -> torch.Tensor:
    """diffusers' guidance_rescale (Lin et al. 2023, eq. 15-16): the guided output scaled per image to the
    conditional output's standard deviation, blended with the unscaled one by `rescale`."""
    dims = tuple(range(1, guided.dim()))
    ratio = cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True)
    return rescale * (guided * ratio) + (1 - rescale) * guided


def _static(value: torch.Tensor) -> torch.Tensor:
    return value.detach().clone()


def _statics(kwargs: dict) -> dict:
    """Keyword arguments with every tensor replaced by a static copy (refilled by Caller.load)."""
    return {key: _static(v) if isinstance(v, torch.Tensor) else v for key, v in kwargs.items()}


OUTPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def as_denoiser(model) -> Denoiser:
    """A Denoiser as given, or a plain model(x, t) read as an unconditional eps predictor (a network built from a
    config reads as its config says: a flow model as its velocity at time 1000 s)."""
    return model if isinstance(model, Denoiser) else Denoiser(model)


__all__ = ["Denoiser", "PREDICTIONS", "as_denoiser"]
