"""A tuning profile: per budget of model calls, the method and the call times that the tuner validated best for one
model, schedule and guidance scale; saved as JSON, and refused in one line for anything else.

The model's identity is the sha256 of its weights (every tensor of its state dict, by name, in its own dtype), so
a profile follows the weights, not the file they came from; a network without tensors is named by its class.
"""

from __future__ import annotations

import hashlib
import json
import math
import weakref
from dataclasses import dataclass, field

import torch

from ..adapters import as_denoiser
from ..atomic import atomic_file
from ..errors import UserError
from ..grids import MODEL, PAPER, TimeGrid
from ..methods import method_record
from ..schedule import Schedule

FORMAT = "pndm_fast tuning profile 1"
_HASHES: "weakref.WeakKeyDictionary[torch.nn.Module, str]" = weakref.WeakKeyDictionary()


def weights_sha256(model) -> str:
    """sha256 of a network's weights (cached per module: weights changed in place afterwards are not seen)."""
    module = as_denoiser(model).module
    if module is None:
        net = as_denoiser(model).net
        return f"no weights: {type(net).__module__}.{type(net).__qualname__}"
    if module not in _HASHES:
        digest = hashlib.sha256()
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(name.encode())
            digest.update(str(tensor.dtype).encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        _HASHES[module] = digest.hexdigest()
    return _HASHES[module]


def schedule_sha256(schedule: Schedule) -> str:
    return hashlib.sha256(schedule.fingerprint()).hexdigest()


@dataclass
class Profile:
    """What `tune` found; `budgets` maps a budget to {"method", "times", "error", ...}."""

    model: str
    schedule: str
    guidance: float
    budgets: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)  # the teacher, the noises, the costs: for the reader

    @classmethod
    def for_run(cls, model, schedule: Schedule, **info) -> "Profile":
        return cls(weights_sha256(model), schedule_sha256(schedule), as_denoiser(model).guidance, {}, dict(info))

    def check(self, model, schedule: Schedule) -> None:
        """UserError, one line, unless this profile was made for this model, schedule and guidance scale."""
        if weights_sha256(model) != self.model:
            raise UserError("the profile was tuned for another model (its weights differ); tune this one with "
                            "pndm-fast --runner tune, or sample without the profile")
        if schedule_sha256(schedule) != self.schedule:
            raise UserError("the profile was tuned on another noise schedule; tune again on this one")
        guidance = as_denoiser(model).guidance
        if not math.isclose(guidance, self.guidance, rel_tol=0, abs_tol=1e-12):
            raise UserError(f"the profile was tuned at guidance {self.guidance:g}, not {guidance:g}; tune at this "
                            "scale, or sample at the profile's")

    def choice(self, schedule: Schedule, budget: int) -> tuple[str, TimeGrid]:
        """(method, grid) for `budget`: the entry of the largest tuned budget at or below it."""
        below = [b for b in sorted(self.budgets) if b <= budget]
        if not below:
            raise UserError(f"the profile has budgets {', '.join(map(str, sorted(self.budgets)))}: none at or "
                            f"below {budget} model calls")
        entry = self.budgets[below[-1]]
        times = tuple(float(t) for t in entry["times"])
        decreasing = all(b < a for a, b in zip(times, times[1:]))
        if not (decreasing and schedule.t_data <= times[-1] and times[0] <= schedule.t_high):
            raise UserError(f"the profile's times for {below[-1]} model calls are not decreasing times of this "
                            "schedule")
        convention = entry.get("convention", MODEL)
        return method_record(entry["method"]).name, TimeGrid(schedule, times, convention, entry.get("grid", "tuned"))

    def to_json(self) -> dict:
        return {"format": FORMAT, "model_sha256": self.model, "schedule_sha256": self.schedule,
                "guidance": self.guidance, "info": self.info,
                "budgets": {str(b): entry for b, entry in sorted(self.budgets.items())}}

    def save(self, path: str) -> None:
        """Written whole or not at all (a temporary file renamed)."""
        with atomic_file(path) as f:
            f.write((json.dumps(self.to_json(), indent=1, sort_keys=True) + "\n").encode())

    @classmethod
    def load(cls, path) -> "Profile":
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise UserError(f"profile {path} does not exist") from None
        except (OSError, ValueError) as err:
            raise UserError(f"profile {path} is not readable JSON ({type(err).__name__})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise UserError(f"{path} is not a pndm_fast tuning profile (no \"format\": \"{FORMAT}\")")
        try:
            budgets = {int(b): entry for b, entry in data["budgets"].items()}
            for entry in budgets.values():
                method_record(entry["method"])
                if not all(isinstance(t, (int, float)) for t in entry["times"]) or entry.get(
                        "convention", MODEL) not in (MODEL, PAPER):
                    raise ValueError
            return cls(str(data["model_sha256"]), str(data["schedule_sha256"]), float(data["guidance"]), budgets,
                       dict(data.get("info") or {}))
        except (KeyError, TypeError, ValueError, AttributeError):
            raise UserError(f"profile {path} is damaged: expected model_sha256, schedule_sha256, guidance and "
                            "budgets of a method and its times") from None


def bundled_profiles() -> list[Profile]:
    """The profiles shipped in pndm_fast/profiles/ (made by the tune command each one's "info" names)."""
    from importlib import resources

    folder = resources.files("pndm_fast") / "profiles"
    if not folder.is_dir():
        return []
    return [Profile.load(path) for path in sorted(folder.iterdir(), key=lambda p: p.name)
            if path.name.endswith(".json")]


def bundled_profile(model, schedule: Schedule) -> Profile | None:
    """The bundled profile for this model, schedule and guidance scale, if there is one."""
    identity = (weights_sha256(model), schedule_sha256(schedule))
    guidance = as_denoiser(model).guidance
    return next((p for p in bundled_profiles() if (p.model, p.schedule) == identity
                 and math.isclose(p.guidance, guidance)), None)


def bundled_profile_named(config: str, guidance: float) -> Profile | None:
    """The bundled profile made for a bundled config's own weights at this guidance scale, if there is one."""
    name = config.replace("_", "-")
    return next((p for p in bundled_profiles() if p.info.get("config") == name
                 and math.isclose(p.guidance, guidance)), None)
