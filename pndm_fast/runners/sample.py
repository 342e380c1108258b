"""`--runner sample`: per-index noise, batches, NaN checks, atomic PNG writes, a grid, a summary line; resumable
(a rerun of the same command writes only the missing images) and split over torchrun's processes."""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from importlib import resources

import numpy as np
import torch
from tqdm import tqdm

from .. import distributed
from ..atomic import remove_stale_temps
from ..errors import UserError
from ..images import image_grid, read_png, to_uint8, write_png_atomic
from ..models import build_model, load_checkpoint
from ..grids import make_grid
from ..models.diffusers_folder import schedule_from_folder
from ..methods import method_record
from ..sampling import sample
from ..schedule import Schedule
from ..seeds import derived_seed
from .conditioning import (Source, check_classes, denoiser_for, is_folder_model, labels_for,
                           open_diffusers_folder)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class SampleOptions:
    method: str = "F-PNDM"
    sample_step: int = 50
    timesteps: str | tuple = "uniform"
    end: str | None = None
    classes: str | None = None  # --class: a class number, "all", or None (unconditional)
    guidance: float = 1.0
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


def source_schedule(config: dict, model_path: str | None) -> Schedule:
    """The schedule a run samples on: a diffusers folder's scheduler config when it has one, else the config's."""
    if is_folder_model(model_path):
        found = schedule_from_folder(model_path)
        if found is not None:
            return Schedule(found[0], description=f"{model_path}'s scheduler config")
    return Schedule.from_config(config["Schedule"])


def open_source(config: dict, model_path: str | None, device, dtype: torch.dtype) -> Source:
    """The network of a run: a diffusers model folder (loaded through diffusers), or a checkpoint of the config's
    model."""
    if is_folder_model(model_path):
        return open_diffusers_folder(model_path, config, device, dtype)
    path = resolve_model_path(model_path, config)
    model = build_model(config)
    load_checkpoint(model, path)
    net = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return Source(net, "eps", Schedule.from_config(config["Schedule"]), image_shape(config), path,
                  int(config["Model"].get("num_classes") or 0))


def image_shape(config: dict) -> tuple[int, int, int]:
    model, dataset = config["Model"], config.get("Dataset") or {}
    size = model.get("image_size") or dataset.get("image_size")
    channels = model.get("in_channels") or dataset.get("channels", 3)
    if not size:
        raise UserError("config gives no image size: set Model.image_size or Dataset.image_size")
    return int(channels), int(size), int(size)


def check_device(device: str) -> torch.device:
    """`device` as a torch.device this machine has: cpu, cuda or cuda:N (one-line UserError otherwise)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(f"unknown device {device!r}: expected cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"--device {device!r} is not supported: expected cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"--device {device!r}: this machine has {torch.cuda.device_count()} CUDA devices, "
                        f"numbered from 0; pick one of them")
    return dev


SETTINGS_KEY = "pndm-fast"  # the PNG tEXt key under which every image records the settings that made it
# Settings that decide an image's pixels. batch_size and total_num are among them on the CPU, where the UNet
# rounds differently by batch composition (one grey level at most); device and backend are recorded, not compared.
COMPARED = ("config", "checkpoint", "checkpoint_bytes", "method", "sample_step", "timesteps", "class", "guidance",
            "seed", "dtype", "total_num", "batch_size")
# What images written before a setting existed were made with.
FORMER_DEFAULTS = {"timesteps": "uniform", "class": None, "guidance": 1.0}


def grid_label(opts: SampleOptions) -> str:
    """The grid as recorded in each image: its name (with its end when given) or its list of times."""
    name = opts.timesteps if isinstance(opts.timesteps, str) else ",".join(f"{t:g}" for t in opts.timesteps)
    return name + (f":{opts.end}" if opts.end else "")


def run_settings(config: dict, opts: SampleOptions, checkpoint: str, total: int, batch: int) -> dict:
    """What made an image, as written into each PNG: a hash of the model and schedule config, the checkpoint's
    real path and size, and the sampling options."""
    shape_config = {key: config.get(key) for key in ("Schedule", "Model")}
    shape_config["shape"] = image_shape(config)
    digest = hashlib.sha256(json.dumps(shape_config, sort_keys=True, default=str).encode()).hexdigest()[:16]
    real = os.path.realpath(checkpoint)
    return {"config": digest, "checkpoint": real, "checkpoint_bytes": os.path.getsize(real), "method": opts.method,
            "sample_step": opts.sample_step, "timesteps": grid_label(opts), "class": opts.classes,
            "guidance": opts.guidance, "seed": opts.seed, "dtype": opts.dtype, "total_num": total,
            "batch_size": batch, "device": torch.device(opts.device).type, "backend": opts.backend}


def settings_mismatch(path: str, text: dict[str, str], settings: dict) -> str | None:
    """None when the image at `path` was made with `settings`, else a one-line reason to refuse the run."""
    advice = ("rerun with the settings it was made with, or write to a new --image_path (or delete the folder's "
              "images)")
    try:
        found = json.loads(text[SETTINGS_KEY])
    except (KeyError, ValueError):
        return f"{path} exists but records no pndm-fast sampling settings, so resuming could mix runs: {advice}"
    for key in COMPARED:
        if found.get(key, FORMER_DEFAULTS.get(key)) != settings[key]:
            return (f"{path} was made with {key} {found.get(key)!r}, this run asks for {settings[key]!r}: "
                    f"{advice}")
    return None


def scan_batches(folder: str, batches: list[int], batch: int, total: int, shape: tuple[int, int, int],
                 settings: dict) -> tuple[dict[int, list[int]], dict]:
    """Check the images of `batches` already in `folder`; returns {batch: the indices to (re)write} for the
    batches that lack any, and counts {"found", "damaged", "mismatch" (the first reason or None)}."""
    todo, stats = {}, {"found": 0, "damaged": 0, "mismatch": None}
    for k in batches:
        missing = []
        for index in range(k * batch, min((k + 1) * batch, total)):
            path = os.path.join(folder, image_name(index))
            read = read_png(path, shape)
            if read is None:
                missing.append(index)
                stats["damaged"] += os.path.lexists(path)  # present under its final name, but not a whole image
                continue
            stats["found"] += 1
            if stats["mismatch"] is None:
                stats["mismatch"] = settings_mismatch(path, read[1], settings)
        if missing:
            todo[k] = missing
    return todo, stats


def gather(value) -> list:
    """`value` from every rank, in rank order (just [value] in a single process)."""
    if not distributed.is_initialized():
        return [value]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, value)
    return out


def read_grid_tiles(folder: str, total: int, shape: tuple[int, int, int]) -> np.ndarray:
    """The first images (up to 256), read back from the files: whichever rank or earlier run wrote them."""
    tiles = []
    for index in range(min(total, 256)):
        read = read_png(os.path.join(folder, image_name(index)), shape)
        if read is None:
            raise UserError(f"{image_name(index)} vanished from {folder} while the grid was being made; "
                            f"rerun the same command to rewrite it")
        tiles.append(read[0])
    return np.stack(tiles)


def run_sample(config: dict, opts: SampleOptions) -> int:
    """Write images 0 .. total_num - 1 to opts.image_path; returns the number written by this run (all ranks).

    Resumable: images already there, whole and made with the same settings (recorded in each PNG), are kept;
    a batch with any image missing or damaged is generated again whole, since on the CPU the UNet's rounding
    depends on the batch composition, and only its missing images are written. Under torchrun, batch k
    (indices [k * batch_size, (k + 1) * batch_size)) goes to rank k % world_size, so each image is made in the
    same batch as in a single process.
    """
    device = check_device(opts.device)
    section = config.get("Sample") or {}
    total = opts.total_num if opts.total_num is not None else int(section.get("total_num", 64))
    batch = opts.batch_size if opts.batch_size is not None else int(section.get("batch_size", 64))
    if total < 1 or batch < 1:
        raise UserError(f"--total_num and --batch_size must be at least 1, got {total} and {batch}")
    schedule = source_schedule(config, opts.model_path)
    method_record(opts.method)  # refuse an unknown method or an impossible grid before loading anything
    make_grid(schedule, opts.timesteps, opts.sample_step, opts.end)
    joined_here = not distributed.is_initialized()
    world = distributed.init(device.type)
    device = torch.device(distributed.device_for(opts.device, world))
    source = open_source(config, opts.model_path, device, DTYPES[opts.dtype])
    check_classes(source, opts.classes, opts.guidance)
    if opts.classes == "all" and opts.total_num is None:
        total = source.num_classes**2  # a square grid, one row per class
    model, schedule = source.net, source.schedule
    settings = run_settings(config, opts, source.weights_file, total, batch)
    text = {SETTINGS_KEY: json.dumps(settings, sort_keys=True)}
    # NHWC lets cuDNN use its tensor-core convolutions without transposing every activation; on the CPU the
    # default layout is as fast, so it stays.
    channels_last = device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    shape = source.shape
    folder = opts.image_path
    os.makedirs(folder, exist_ok=True)
    if world.is_main:  # before any rank writes, so no live writer of this run loses its temporary file
        remove_stale_temps(folder)
    distributed.barrier()

    num_batches = -(-total // batch)
    todo, stats = scan_batches(folder, list(range(world.rank, num_batches, world.size)), batch, total, shape,
                               settings)
    everyone = gather(stats)
    for other in everyone:
        if other["mismatch"]:
            raise UserError(other["mismatch"])
    found, damaged = sum(s["found"] for s in everyone), sum(s["damaged"] for s in everyone)
    skipped = num_batches - sum(gather(len(todo)))
    if world.is_main and (found or damaged):
        print(f"found {found} of {total} images in {folder} ({damaged} cut short or damaged, to be rewritten); "
              f"skipping {skipped} of {num_batches} batches whose images are all there")

    start, written = time.perf_counter(), 0
    mine = sum(len(range(k * batch, min((k + 1) * batch, total))) for k in todo)
    with tqdm(total=mine, unit="img", disable=not (opts.progress and world.is_main),
              desc=f"{opts.method} {opts.sample_step}") as bar:
        for k, missing in todo.items():
            indices = range(k * batch, min((k + 1) * batch, total))
            noise = noise_for(indices, shape, opts.seed).to(device)
            with torch.inference_mode():
                labels = labels_for(indices, opts.classes, source.num_classes, total)
                x = sample(denoiser_for(source, labels, opts.guidance), noise, schedule, opts.method,
                           opts.sample_step, backend=opts.backend,
                           timesteps=opts.timesteps, end=opts.end,
                           compile=opts.compile, nvtx=opts.nvtx, channels_last=channels_last)
            if not torch.isfinite(x).all():
                raise UserError(f"the samples {indices.start}..{indices.stop - 1} hold NaN or Inf, nothing of them "
                                "was written; check that the checkpoint matches the config, or use --dtype fp32")
            pixels = to_uint8(x)
            for index in missing:
                # No fsync per image (3 ms each, minutes over 50k images): a file that a power loss cuts short
                # is found by the next run of the same command, which writes it again.
                write_png_atomic(pixels[index - indices.start], os.path.join(folder, image_name(index)), text=text,
                                 fsync=False)
            written += len(missing)
            bar.update(len(indices))
    written = sum(gather(written))  # also waits for every rank, so every image is on disk below
    seconds = time.perf_counter() - start
    if world.is_main:
        if opts.grid:
            remove_stale_temps(os.path.dirname(os.path.abspath(opts.grid)), os.path.basename(opts.grid))
            write_png_atomic(image_grid(read_grid_tiles(folder, total, shape)), opts.grid)
        print(f"wrote {written} images to {folder} in {seconds:.2f} s ({written / seconds:.2f} images/s)")
    if joined_here:
        distributed.shutdown()
    return written
