"""pndm_fast: PNDM sampling (Liu et al., ICLR 2022), reproduced number for number and made fast."""

from importlib import import_module

from .config import load_config
from .errors import UserError

# Imported on first use (PEP 562): they bring in torch, about 2 s, and the command line (pndm-fast, whose entry
# point imports this package first) must be able to answer a Ctrl-C during that time with one line.
_LAZY = {"build_model": ".models", "load_checkpoint": ".models", "lincomb": ".ops", "build_plan": ".methods",
         "METHODS": ".methods", "sample": ".sampling", "set_cache_limit": ".sampling", "Schedule": ".schedule",
         "Denoiser": ".adapters", "make_grid": ".grids", "pretrained": ".pretrained",
         "pretrained_names": ".pretrained"}

__all__ = ["load_config", "build_model", "load_checkpoint", "Schedule", "sample", "build_plan", "lincomb",
           "UserError", "set_cache_limit", "Denoiser", "make_grid", "METHODS", "pretrained", "pretrained_names"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
