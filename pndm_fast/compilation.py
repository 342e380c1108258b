"""torch.compile of a sampling network, prepared once per model."""

from __future__ import annotations

import weakref

import torch

_COMPILED: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()


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
        # In place (nn.Module.compile), so that no compiled wrapper holds the model from a cache keyed by it.
        if regions is None:
            model.compile(**options)
        else:
            # One block class meets many shapes (channels and resolution per level, the batch size), each a
            # compiled variant; past dynamo's recompile limit (8) the rest would silently run eagerly.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 128)
            for block in model.modules():
                if isinstance(block, regions):
                    block.compile(**options)
        _COMPILED.add(model)
    return model
