"""pndm_fast: PNDM sampling (Liu et al., ICLR 2022), reproduced number for number and made fast."""

# Imported on first use (PEP 562): they bring in torch, about 2 s, and the command line (pndm-fast, whose entry
# point imports this package first) must be able to answer a Ctrl-C during that time with one line.
_LAZY = {"load_config": ".config", "UserError": ".errors", "build_model": ".models", "load_checkpoint": ".models",
         "Schedule": ".schedule", "make_grid": ".grids", "TimeGrid": ".grids", "Plan": ".plans",
         "Method": ".methods", "METHODS": ".methods", "method_record": ".methods", "register_method": ".methods",
         "build_plan": ".methods", "Denoiser": ".adapters", "sample": ".sampling", "set_cache_limit": ".sampling",
         "pretrained": ".pretrained", "pretrained_names": ".pretrained", "tune": ".tuning", "Profile": ".tuning",
         "FlowSchedule": ".continuous", "EDMSchedule": ".continuous", "VPSchedule": ".continuous",
         "schedule_from_diffusers": ".diffusers_schedulers", "sample_pipeline": ".pipelines"}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        from importlib import import_module

        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return list(__all__)
