"""torch.compile of the UNets, prepared once per model: `compiled(model)`.

Regional compilation: models that name their `compile_regions` (both UNets here) get each such block compiled
in place. A repeated block compiles once, and inductor cannot fuse across blocks, which on the CPU made a
whole-model compile drift to 2.5x the float32 reference's error over a golden sampling run (the blocks compiled
one by one stay within it). Other models are compiled whole.

On CUDA, inductor's own CUDA graphs stay off: the graph backend captures the whole loop itself, and nesting the
two would capture twice.

On the CPU, inductor's freezing is on: under no_grad (sampling) the weights become constants of the compiled
graph, folded and prepacked once for oneDNN's convolutions; its worst measured pair stayed faster than eager,
which compiling without it did not (`python benchmarks/bench_compile.py --quick`, benchmarks/RESULTS.md).
Freezing assumes the weights do not change after the first compiled call: compile after loading a checkpoint.
"""

from __future__ import annotations

import weakref

import torch

# Models compiled in place, so that a second call (and the runner cache's key) knows; weak, so that a compiled
# model still dies with its last user reference.
_COMPILED: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()

# One block class meets many shapes (channels and resolution per level, the batch size), each a compiled
# variant; past dynamo's default recompile limit (8) the rest would silently run eagerly.
RECOMPILE_LIMIT = 128


def compile_options(device_type: str) -> dict:
    """The keyword arguments of nn.Module.compile for a model on `device_type`."""
    if device_type == "cpu":
        return {"dynamic": False, "options": {"freezing": True}}
    return {"dynamic": False, "options": {"triton.cudagraphs": False}}


def compiled(model: torch.nn.Module) -> torch.nn.Module:
    """The model under torch.compile, compiled in place once (no wrapper holds the model from a cache keyed by
    it); returns the model itself."""
    if model not in _COMPILED:
        options = compile_options(_device_type(model))
        regions = getattr(model, "compile_regions", None)
        if regions is None:
            model.compile(**options)
        else:
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
            for block in model.modules():
                if isinstance(block, regions):
                    block.compile(**options)
        _COMPILED.add(model)
    return model


def _device_type(model: torch.nn.Module) -> str:
    for tensor in model.parameters():
        return tensor.device.type
    return "cpu"
