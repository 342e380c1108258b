"""`--runner sample`: per-index noise, batches, NaN checks, atomic PNG writes, a grid, a summary line."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from importlib import resources

import numpy as np
import torch
from tqdm import tqdm

from ..errors import UserError
from ..images import image_grid, to_uint8, write_png_atomic
from ..models import build_model, load_checkpoint
from ..sampling import sample
from ..schedule import Schedule
from ..seeds import derived_seed

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class SampleOptions:
    method: str = "F-PNDM"
    sample_step: int = 50
    image_path: str = "temp/results"
    model_path: str | None = None
    total_num: int | None = None
    batch_size: int | None = None
    seed: int = 0
    device: str = "cpu"
    backend: str = "auto"
    compile: bool = False
    dtype: str = "fp32"
    nvtx: bool | None = None
    grid: str | None = None
    progress: bool = True


def image_name(index: int) -> str:
    return f"{index:06d}.png"


def noise_for(indices: range, shape: tuple[int, int, int], seed: int) -> torch.Tensor:
    """Noise for sample `indices`, (len, C, H, W) float32 on the CPU. Image i's noise depends only on (seed, i),
    never on the batch it falls in, so any batch size (or split across processes) writes the same images."""
    out = torch.empty((len(indices), *shape))
    for row, index in enumerate(indices):
        gen = torch.Generator().manual_seed(derived_seed(seed, index))
        out[row] = torch.randn(shape, generator=gen)
    return out


def resolve_model_path(model_path: str | None, config: dict) -> str:
    """--model_path, else the config's Sample.model_path; a bare name there means a file shipped in the package."""
    path = model_path or (config.get("Sample") or {}).get("model_path")
    if path is None:
        raise UserError("no checkpoint: pass --model_path CKPT (the paper's published checkpoints are linked from "
                        "https://github.com/luping-liu/PNDM), or train one with --runner train")
    if model_path is None and os.path.basename(path) == path:
        return str(resources.files("pndm_fast") / "weights" / path)
    return path


def load_model(config: dict, model_path: str | None, device: str, dtype: str) -> torch.nn.Module:
    model = build_model(config)
    load_checkpoint(model, resolve_model_path(model_path, config))
    return model.to(device=device, dtype=DTYPES[dtype]).eval().requires_grad_(False)


def image_shape(config: dict) -> tuple[int, int, int]:
    model, dataset = config["Model"], config.get("Dataset") or {}
    size = model.get("image_size") or dataset.get("image_size")
    channels = model.get("in_channels") or dataset.get("channels", 3)
    if not size:
        raise UserError("config gives no image size: set Model.image_size or Dataset.image_size")
    return int(channels), int(size), int(size)


def check_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device {device!r}: expected cpu or cuda[:N]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    return dev


def run_sample(config: dict, opts: SampleOptions) -> int:
    """Write images 0 .. total_num - 1 to opts.image_path; returns the number written."""
    device = check_device(opts.device)
    section = config.get("Sample") or {}
    total = opts.total_num if opts.total_num is not None else int(section.get("total_num", 64))
    batch = opts.batch_size if opts.batch_size is not None else int(section.get("batch_size", 64))
    if total < 1 or batch < 1:
        raise UserError(f"--total_num and --batch_size must be at least 1, got {total} and {batch}")
    schedule = Schedule.from_config(config["Schedule"])
    schedule.time_steps(opts.sample_step)  # refuse an impossible step count before loading anything
    model = load_model(config, opts.model_path, opts.device, opts.dtype)
    # NHWC lets cuDNN use its tensor-core convolutions without transposing every activation; on the CPU the
    # default layout is as fast, so it stays.
    channels_last = device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    shape = image_shape(config)
    os.makedirs(opts.image_path, exist_ok=True)

    start, tiles = time.perf_counter(), []
    with tqdm(total=total, unit="img", disable=not opts.progress, desc=f"{opts.method} {opts.sample_step}") as bar:
        for first in range(0, total, batch):
            indices = range(first, min(first + batch, total))
            noise = noise_for(indices, shape, opts.seed).to(device)
            with torch.inference_mode():
                x = sample(model, noise, schedule, opts.method, opts.sample_step, backend=opts.backend,
                           compile=opts.compile, nvtx=opts.nvtx, channels_last=channels_last)
            if not torch.isfinite(x).all():
                raise UserError(f"the samples {indices.start}..{indices.stop - 1} hold NaN or Inf, nothing of them "
                                "was written; check that the checkpoint matches the config, or use --dtype fp32")
            pixels = to_uint8(x)
            for index, image in zip(indices, pixels):
                write_png_atomic(image, os.path.join(opts.image_path, image_name(index)))
            if opts.grid and len(tiles) < 256:
                tiles.extend(pixels[: 256 - len(tiles)])
            bar.update(len(indices))
    seconds = time.perf_counter() - start
    if opts.grid:
        os.makedirs(os.path.dirname(os.path.abspath(opts.grid)), exist_ok=True)
        write_png_atomic(image_grid(np.stack(tiles)), opts.grid)
    print(f"wrote {total} images to {opts.image_path} in {seconds:.2f} s ({total / seconds:.2f} images/s)")
    return total
