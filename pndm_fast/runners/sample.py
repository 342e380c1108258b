"""`--runner sample`: per-index noise, batches, NaN checks, atomic PNG writes, a grid, a summary line; resumable
(a rerun of the same command writes only the missing images) and split over torchrun's processes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import stat
import sys
import time
from dataclasses import dataclass
from importlib import resources

import numpy as np
import torch
from tqdm import tqdm

from .. import distributed
from ..atomic import atomic_file, remove_stale_temps
from ..errors import UserError
from ..images import image_grid, load_picture, png_text, read_png, to_uint8, write_png_atomic
from ..lock import folder_lock
from ..grids import TimeGrid
from ..models import build_model, load_checkpoint
from ..models.diffusers_folder import schedule_from_folder
from ..methods import method_record
from ..sampling import resolve_run, sample
from ..tuning.profile import Profile, bundled_profile_named
from ..continuous import schedule_from_config
from ..schedule import Schedule
from ..noise import noise_for  # noqa: F401  (the runners' and studies' starting noise, imported from here)
from .conditioning import (Source, check_classes, denoiser_for, folder_weights, is_folder_model, labels_for,
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
    image_grid: str | None = None  # --image_grid: one PNG of the first images side by side
    profile: object = None  # the tuning profile the method and grid came from: checked against the model
    init_image: str | None = None  # --init_image, --strength, --mask: img2img and inpainting
    strength: float | None = None
    mask: str | None = None
    progress: bool = True


def image_name(index: int) -> str:
    return f"{index:06d}.png"


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
    return schedule_from_config(config["Schedule"])


def open_source(config: dict, model_path: str | None, device, dtype: str) -> Source:
    """The network of a run: a diffusers model folder (loaded through diffusers), or a checkpoint of the config's
    model; `dtype` is --dtype's name."""
    if is_folder_model(model_path):
        return open_diffusers_folder(model_path, config, device, DTYPES[dtype])
    return Source(load_model(config, model_path, device, dtype), config["Model"].get("prediction", "eps"),
                  schedule_from_config(config["Schedule"]),
                  image_shape(config), resolve_model_path(model_path, config),
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
IMAGE_GRID_KEY = "pndm-fast-grid"  # the tEXt key of an image grid: only a file carrying it is ever replaced
IMAGE_NAME = re.compile(r"^\d{6}\.png$")
# Settings that decide an image's pixels. batch_size and total_num are among them on the CPU, where the UNet
# rounds differently by batch composition (one grey level at most); the checkpoint is identified by a hash of its
# bytes (a retrained ema.ckpt has the same path and size); device, backend and the checkpoint's path are recorded,
# not compared. Each image also records its own index, compared separately (a copied-over image is rewritten).
COMPARED = ("config", "checkpoint_sha256", "method", "sample_step", "timesteps", "class", "guidance", "seed", "dtype",
            "total_num", "batch_size", "edit")
def hash_cache_path() -> str:
    """Where checkpoint hashes are cached: $XDG_CACHE_HOME/pndm_fast (default ~/.cache/pndm_fast)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "pndm_fast", "checkpoint-sha256.json")


def _stat_key(path: str) -> list:
    """What changes whenever the file's bytes may have: ctime too, which no one can set back (mtime can be)."""
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def checkpoint_sha256(path: str) -> tuple[str, list]:
    """(sha256 of the checkpoint's bytes, the stat key it belongs to). Cached (hash_cache_path) by real path and
    stat key, so a resume does not read a multi-gigabyte checkpoint a second time (about 2 s per GB); a retrained
    checkpoint, replaced or rewritten in place, has a new stat key and is hashed again. A cache that cannot be
    read or written is only slower."""
    real = os.path.realpath(path)
    key = _stat_key(real)
    cache_path = hash_cache_path()
    try:
        with open(cache_path) as f:
            cache = json.load(f)
        cached = cache.get(real) if isinstance(cache, dict) else None
    except (OSError, ValueError):
        cache, cached = {}, None
    if isinstance(cached, dict) and cached.get("stat") == key and isinstance(cached.get("sha256"), str):
        return cached["sha256"], key
    digest = hashlib.sha256()
    with open(real, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if _stat_key(real) != key:
        raise UserError(f"checkpoint {path} changed while it was being read; rerun once it is complete")
    cache = {k: v for k, v in (cache if isinstance(cache, dict) else {}).items() if k != real}
    cache[real] = {"stat": key, "sha256": digest.hexdigest()}
    with contextlib.suppress(OSError, UserError):  # a read-only or full home: no cache, the run goes on
        with atomic_file(cache_path, fsync=False) as f:
            f.write(json.dumps(cache, sort_keys=True).encode())
    return digest.hexdigest(), key


def grid_label(opts: SampleOptions) -> str:
    """The time grid as recorded in each image: its name (with its end when given), its list of call times, or
    for a grid resolved from a budget or parameters, its name and every time, the end included."""
    if isinstance(opts.timesteps, str):
        return opts.timesteps + (f":{opts.end}" if opts.end else "")
    if isinstance(opts.timesteps, TimeGrid):
        return f"{opts.timesteps.name}:" + ",".join(f"{t:g}" for t in opts.timesteps.times)
    return ",".join(f"{t:g}" for t in opts.timesteps)


def resolve_grid_flags(config: dict, args, config_name: str = "") -> None:
    """--method auto (with --profile, or the bundled model's own), --model_calls and the grid's parameters (--t_max,
    --t_min, --rho, --steps_offset), resolved once on the schedule the run samples on into args' method and
    TimeGrid (said on stderr); a profile used is left in args.profile, to be checked against the model."""
    parameters = {key: value for key, value in (("t_max", args.t_max), ("t_min", args.t_min), ("rho", args.rho),
                                                ("offset", args.steps_offset)) if value is not None}
    if args.method != "auto" and args.model_calls is None and not parameters:
        return
    if args.method == "auto" and args.model_calls is None:
        raise UserError("--method auto fits its method and grid to a budget: give --model_calls N")
    if args.model_calls is not None and args.sample_step is not None:
        raise UserError("give --sample_step (steps) or --model_calls (a budget of model calls), not both")
    schedule = source_schedule(config, args.model_path)
    profile = None
    if args.method == "auto":
        profile = (Profile.load(args.profile) if getattr(args, "profile", None) else
                   bundled_profile_named(config_name, getattr(args, "guidance", 1.0)) if args.model_path is None
                   else None)
    if profile is not None:
        if args.timesteps != "uniform" or args.timesteps_end or parameters:
            raise UserError("method auto chooses its own time grid (here its profile's): drop the grid options (or name a method)")
        method, grid = profile.choice(schedule, args.model_calls)
        record = method_record(method)
    else:
        record, grid, _ = resolve_run(schedule, args.method, args.sample_step, args.timesteps, args.timesteps_end,
                                      args.model_calls, **parameters)
    args.profile = profile
    if args.model_calls is not None:
        tuned = " (tuned profile)" if profile is not None else ""
        print(f"pndm-fast: {args.model_calls} model calls{tuned}: {record.name} on the {grid}", file=sys.stderr)
    args.method, args.timesteps, args.sample_step, args.timesteps_end = record.name, grid, None, None


def run_settings(config: dict, opts: SampleOptions, checkpoint: str, checkpoint_hash: str, total: int,
                 batch: int, edit: str | None = None) -> dict:
    """What made an image, as written into each PNG (with its own "index" added): a hash of the model and
    schedule config, the checkpoint's content hash (and real path, for the reader), and the sampling options."""
    shape_config = {key: config.get(key) for key in ("Schedule", "Model")}
    shape_config["shape"] = image_shape(config)
    digest = hashlib.sha256(json.dumps(shape_config, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return {"config": digest, "checkpoint_sha256": checkpoint_hash, "checkpoint": os.path.realpath(checkpoint),
            "method": opts.method, "sample_step": opts.sample_step, "timesteps": grid_label(opts),
            "class": opts.classes, "guidance": opts.guidance, "seed": opts.seed, "dtype": opts.dtype,
            "total_num": total, "batch_size": batch, "device": torch.device(opts.device).type,
            "backend": opts.backend, "edit": edit}


class EditInputs:
    """--init_image, --strength and --mask, each file read once: sample()'s keywords for a batch of n images, and
    `label`, the settings as recorded in every PNG (the pictures by content hash, so a changed file is noticed)."""

    def __init__(self, opts: SampleOptions, shape: tuple[int, int, int], device: torch.device):
        self.kwargs, self.label = {}, None
        if not opts.init_image:
            return
        image, image_hash = _picture(opts.init_image, shape, "--init_image", device)
        self.kwargs = {"init_image": image, "strength": opts.strength}
        self.label = f"init {image_hash} strength {opts.strength if opts.strength is not None else 1:g}"
        if opts.mask:
            self.kwargs["mask"], mask_hash = _picture(opts.mask, shape, "--mask", device, mask=True)
            self.label += f" mask {mask_hash}"

    def batch(self, n: int) -> dict:
        return {k: v.expand(n, *v.shape[1:]) if isinstance(v, torch.Tensor) else v for k, v in self.kwargs.items()}


def _picture(path: str, shape, what: str, device, mask: bool = False) -> tuple[torch.Tensor, str]:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist") from None
    except OSError as err:
        raise UserError(f"{what} {path} is not a picture Pillow can read ({type(err).__name__})") from None
    picture = load_picture(data, shape, f"{what} {path}", mask).to(device)
    return picture, hashlib.sha256(data).hexdigest()[:16]


ADVICE = "rerun with the settings it was made with, or write to a new --image_path (or delete the folder's images)"


def recorded_settings(text: dict[str, str]) -> dict | None:
    try:
        found = json.loads(text[SETTINGS_KEY])
    except (KeyError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def settings_mismatch(path: str, found: dict, settings: dict) -> str | None:
    """None when `found` (an image's record) has this run's `settings`, else a one-line reason to refuse the run."""
    for key in COMPARED:
        if found.get(key) != settings[key]:
            shown = {"checkpoint_sha256": "a checkpoint of other content (sha256"}.get(key)
            if shown:
                return (f"{path} was made with {shown} {str(found.get(key))[:12]}..., this run's "
                        f"{settings[key][:12]}...: {settings['checkpoint']}): {ADVICE}")
            return f"{path} was made with {key} {found.get(key)!r}, this run asks for {settings[key]!r}: {ADVICE}"
    return None


def blank(data: bytes) -> bool:
    """Empty or all zero bytes: what a power loss can leave of a file that was never fsynced; nothing to lose."""
    return not data.strip(b"\0")


def check_existing(path: str, index: int, shape: tuple[int, int, int], settings: dict) -> str | None:
    """What to do with `path`, image `index` of this run: "keep" (whole, made by this run's settings for this
    index), "rewrite" (absent, blank, or this run's own image damaged or under the wrong index), or a one-line
    reason to refuse the run (anything else: another run's image, another program's file, a link, a folder)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "rewrite"
    if not stat.S_ISREG(st.st_mode):
        what = "a link" if stat.S_ISLNK(st.st_mode) else "a folder" if stat.S_ISDIR(st.st_mode) else "not a file"
        return f"{path} is {what}, not an image this run wrote; move it away or write to a new --image_path"
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        return f"{path} could not be read ({err.strerror}); check its permissions or write to a new --image_path"
    if blank(data):
        return "rewrite"
    read = read_png(path, shape)
    text = read[1] if read is not None else png_text(data)
    found = recorded_settings(text)
    if found is None and read is None and SETTINGS_KEY in text:
        return "rewrite"  # this program's image, cut short inside its settings record
    if found is None:
        what = "a whole image" if read is not None else "not a whole image of this run's size and mode"
        return (f"{path} exists ({what}) but records no pndm-fast sampling settings, so it may be another "
                f"program's or another config's and is not overwritten: {ADVICE}")
    mismatch = settings_mismatch(path, found, settings)
    if mismatch:
        return mismatch
    return "keep" if read is not None and found.get("index") == index else "rewrite"


def scan_batches(folder: str, batches: list[int], batch: int, total: int, shape: tuple[int, int, int],
                 settings: dict) -> tuple[dict[int, list[int]], dict]:
    """Check the images of `batches` already in `folder`; returns {batch: the indices to (re)write} for the
    batches that lack any, and counts {"found", "damaged", "mismatch" (the first reason to refuse, or None)}."""
    todo, stats = {}, {"found": 0, "damaged": 0, "mismatch": None}
    for k in batches:
        missing = []
        for index in range(k * batch, min((k + 1) * batch, total)):
            path = os.path.join(folder, image_name(index))
            verdict = check_existing(path, index, shape, settings)
            if verdict == "keep":
                stats["found"] += 1
                continue
            if verdict != "rewrite":
                stats["mismatch"] = stats["mismatch"] or verdict
                continue
            missing.append(index)
            stats["damaged"] += os.path.lexists(path)  # present under its final name, but not a whole image
        if missing:
            todo[k] = missing
    return todo, stats


def check_image_grid(grid: str, folder: str, checkpoint: str) -> None:
    """Refuse an --image_grid that would replace anything but an earlier grid: the checkpoint, an image of the run (or a
    name one will take), or any file not carrying IMAGE_GRID_KEY."""
    real = os.path.realpath(grid)
    if os.path.exists(checkpoint) and os.path.exists(real) and os.path.samefile(real, checkpoint):
        raise UserError(f"--image_grid {grid} is the checkpoint --model_path names; choose another grid name")
    if os.path.dirname(real) == os.path.realpath(folder) and IMAGE_NAME.match(os.path.basename(real)):
        raise UserError(f"--image_grid {grid} is named like an image of the run in {folder}; choose another grid name")
    if os.path.lexists(grid):
        ours = False
        if os.path.isfile(grid) and not os.path.islink(grid):
            with open(grid, "rb") as f:
                ours = IMAGE_GRID_KEY in png_text(f.read(1 << 16))
        if not ours:
            raise UserError(f"--image_grid {grid} exists and is not a grid pndm-fast wrote, so it is not overwritten: "
                            "remove it or choose another grid name")


def out_of_memory(err: BaseException) -> bool:
    text = str(err)
    return isinstance(err, getattr(torch, "OutOfMemoryError", ())) or isinstance(err, RuntimeError) and any(
        s in text for s in ("out of memory", "not enough memory", "can't allocate memory", "Cannot allocate memory"))


def gather(value) -> list:
    """`value` from every rank, in rank order (just [value] in a single process)."""
    if not distributed.is_initialized():
        return [value]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, value)
    return out


def read_image_grid_tiles(folder: str, total: int, shape: tuple[int, int, int]) -> np.ndarray:
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
    depends on the batch composition, and only its missing images are written. Anything else in the folder under
    an image's name (another run's or program's file, a link, a folder) is refused, never overwritten. Under
    torchrun, batch k (indices [k * batch_size, (k + 1) * batch_size)) goes to rank k % world_size, so each image
    is made in the same batch as in a single process. Rank 0 holds the folder's lock (pndm_fast.lock) for the
    whole run, so a second run into the same folder is refused.
    """
    if not opts.image_path:
        raise UserError("--image_path is empty: give the folder the images are written to, e.g. --image_path out")
    device = check_device(opts.device)
    section = config.get("Sample") or {}
    total = opts.total_num if opts.total_num is not None else int(section.get("total_num", 64))
    batch = opts.batch_size if opts.batch_size is not None else int(section.get("batch_size", 64))
    if total < 1 or batch < 1:
        raise UserError(f"--total_num and --batch_size must be at least 1, got {total} and {batch}")
    schedule = source_schedule(config, opts.model_path)
    resolve_run(schedule, opts.method, opts.sample_step, opts.timesteps, opts.end)  # refused before any loading
    checkpoint = (folder_weights(opts.model_path) if is_folder_model(opts.model_path)
                  else resolve_model_path(opts.model_path, config))
    folder = opts.image_path
    if opts.image_grid:
        check_image_grid(opts.image_grid, folder, checkpoint)
    joined_here = not distributed.is_initialized()
    world = distributed.init(device.type)
    device = torch.device(distributed.device_for(opts.device, world))
    with contextlib.ExitStack() as stack:
        if joined_here:
            stack.callback(distributed.shutdown)
        return _sample_locked(config, opts, schedule, world, device, checkpoint, total, batch, stack)


def _sample_locked(config: dict, opts: SampleOptions, schedule: Schedule, world, device: torch.device,
                   checkpoint: str, total: int, batch: int, stack: contextlib.ExitStack) -> int:
    source = open_source(config, opts.model_path, device, opts.dtype)
    check_classes(source, opts.classes, opts.guidance)
    if opts.profile is not None:
        labels = labels_for(range(1), opts.classes, source.num_classes, 1)
        opts.profile.check(denoiser_for(source, labels, opts.guidance), source.schedule)
    if opts.classes == "all" and opts.total_num is None:
        total = source.num_classes**2  # a square grid, one row per class
    model, schedule = source.net, source.schedule
    editing = EditInputs(opts, source.shape, device)
    folder = opts.image_path
    os.makedirs(folder, exist_ok=True)
    checkpoint_hash = None
    if world.is_main:
        stack.enter_context(folder_lock(folder, "sampling run"))
        # under the lock no other run writes here: every temporary file is a leftover of a killed one
        remove_stale_temps(folder)
        stat_loaded = _stat_key(os.path.realpath(checkpoint))
        checkpoint_hash, stat_hashed = checkpoint_sha256(checkpoint)
        if stat_hashed != stat_loaded:
            raise UserError(f"checkpoint {checkpoint} changed while it was being loaded; rerun once it is complete")
    checkpoint_hash = gather(checkpoint_hash)[0]  # rank 0's: one read of the checkpoint, and every rank waits
    settings = run_settings(config, opts, checkpoint, checkpoint_hash, total, batch, editing.label)
    # NHWC lets cuDNN use its tensor-core convolutions without transposing every activation; on the CPU the
    # default layout is as fast, so it stays.
    channels_last = device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    shape = source.shape

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

    start, written, made = time.perf_counter(), 0, 0
    mine = sum(len(range(k * batch, min((k + 1) * batch, total))) for k in todo)
    with tqdm(total=mine, unit="img", disable=not (opts.progress and world.is_main),
              desc=f"{opts.method} {opts.sample_step}") as bar:
        for k, missing in todo.items():
            indices = range(k * batch, min((k + 1) * batch, total))
            try:
                noise = noise_for(indices, shape, opts.seed).to(device)
                with torch.inference_mode():
                    labels = labels_for(indices, opts.classes, source.num_classes, total)
                    x = sample(denoiser_for(source, labels, opts.guidance), noise, schedule, opts.method,
                               opts.sample_step, backend=opts.backend, timesteps=opts.timesteps, end=opts.end,
                               compile=opts.compile, nvtx=opts.nvtx, channels_last=channels_last,
                               seed=opts.seed, indices=list(indices), **editing.batch(len(indices)))
            except (RuntimeError, MemoryError) as err:
                if not (isinstance(err, MemoryError) or out_of_memory(err)):
                    raise
                raise UserError(f"out of memory sampling a batch of {len(indices)} images on {device}: lower "
                                "--batch_size (with a new --image_path if this folder holds images of this run: "
                                "the batch decides the rounding); the images already written are whole") from None
            if not torch.isfinite(x).all():
                raise UserError(f"the samples {indices.start}..{indices.stop - 1} hold NaN or Inf, nothing of them "
                                "was written; check that the checkpoint matches the config, or use --dtype fp32")
            pixels = to_uint8(x)
            for index in missing:
                # No fsync per image (3 ms each, minutes over 50k images): a file that a power loss cuts short
                # is found by the next run of the same command, which writes it again.
                text = {SETTINGS_KEY: json.dumps({**settings, "index": index}, sort_keys=True)}
                write_png_atomic(pixels[index - indices.start], os.path.join(folder, image_name(index)), text=text,
                                 fsync=False)
            written += len(missing)
            made += len(indices)
            bar.update(len(indices))
    written = sum(gather(written))  # also waits for every rank, so every image is on disk below
    made = sum(gather(made))
    seconds = time.perf_counter() - start
    if world.is_main:
        if opts.image_grid:
            check_image_grid(opts.image_grid, folder, checkpoint)  # again: a file may have appeared meanwhile
            record = json.dumps({"image_path": os.path.abspath(folder), "total_num": total})
            write_png_atomic(image_grid(read_image_grid_tiles(folder, total, shape)), opts.image_grid,
                             text={IMAGE_GRID_KEY: record})
        # The rate of the work done: every image sampled (a resumed batch is sampled whole, even when only some of
        # its images were missing), not only those written.
        print(f"wrote {written} images to {folder} in {seconds:.2f} s ({made / seconds:.2f} images/s sampled)")
    return written
