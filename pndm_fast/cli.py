"""The paper's command line: pndm-fast --runner sample|train|check|convert|fid --config ... (python -m pndm_fast is
the same)."""

from __future__ import annotations

import argparse
import os
import sys

from .config import load_config
from .errors import UserError

MODELS = ("DDIM", "iDDPM")
RUNNERS = ("sample", "train", "check", "convert", "fid", "tune")


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr and exit code 2, like every other user mistake."""

    def error(self, message: str):
        self.exit(2, f"pndm-fast: error: {message} (see pndm-fast --help)\n")


def build_parser() -> argparse.ArgumentParser:
    # torch comes in with these (about 2 s): inside main's handlers, so a Ctrl-C meanwhile is one line too
    from .grids import ENDS, grid_names
    from .methods import METHODS
    from .sampling import BACKENDS

    p = OneLineParser(prog="pndm-fast", description="PNDM sampling (Liu et al., ICLR 2022), fast and exact.")
    p.add_argument("--runner", default="sample", choices=RUNNERS)
    p.add_argument("--config", help="a bundled config name (e.g. ddim-cifar10) or a YAML path (default: digits; "
                   "with --runner convert, the checkpoint is checked against it only when given)")
    p.add_argument("--model", choices=MODELS, help="the architecture; must agree with the config's Model.struc")
    p.add_argument("--method", default="F-PNDM", type=parse_method, metavar="METHOD",
                   help="; ".join(f"{m.name}: {m.description}" for m in METHODS.values()) + "; auto (with "
                   "--model_calls): the method and grid the accuracy study found best for the budget "
                   "(docs/accuracy.md). Options follow a colon: DEIS:order=4, "
                   "UniPC-bh2:order=2,lower_order_final=false")
    p.add_argument("--sample_step", type=int, help="number of sampling steps (the paper's sample_speed; default 50)")
    p.add_argument("--model_calls", type=int, help="instead of --sample_step: a budget of model calls, never "
                   "exceeded; the method's steps (with --method auto, the method and grid too) are fitted to it")
    p.add_argument("--timesteps", default="uniform", type=parse_timesteps, metavar="GRID",
                   help=f"time grid: {', '.join(grid_names())} (default uniform, the paper's), or times "
                        "separated by commas in either order, e.g. 0,50,200,500,999 (the model is called at each)")
    p.add_argument("--t_max", type=float, help="quadratic, logsnr, karras: the time of the first model call "
                   "(default N - 1, the noisiest)")
    p.add_argument("--t_min", type=float, help="quadratic, logsnr, karras: the time of the last model call (default 0)")
    p.add_argument("--rho", type=float, help="karras: the exponent of its sigma spacing (default 7)")
    p.add_argument("--steps_offset", type=int, help="leading: diffusers' steps_offset (default 0)")
    p.add_argument("--timesteps_end", choices=ENDS, help="where a non-uniform grid ends: zero (sigma = 0, the "
                   "default) or min (its smallest time's level, as the paper's grid ends on ac[0])")
    p.add_argument("--class", dest="classes", metavar="N|all", help="with a class-conditional model (e.g. "
                   "--config digits-cond): sample class N, or every class (a grid with one row per class)")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance weight w with --class: "
                   "eps_u + w (eps_c - eps_u); 1 (default) is the conditional model alone, 0 the unconditional")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--image_path", default="temp/results", help="folder the PNG images are written to")
    p.add_argument("--model_path", help="checkpoint: a plain state dict (.ckpt/.pt) or .safetensors")
    p.add_argument("--total_num", type=int, help="number of images (default: the config's Sample.total_num)")
    p.add_argument("--batch_size", type=int, help="images per batch (default: the config's Sample.batch_size)")
    p.add_argument("--seed", type=int, default=0, help="image i's noise depends only on (seed, i), and a "
                   "stochastic method's k-th fresh noise on (seed, i, k)")
    p.add_argument("--init_image", metavar="PICTURE", help="img2img: start every image from this picture (resized "
                   "to the model's size), noised to the level where --strength of the grid's steps remain")
    p.add_argument("--strength", type=float, help="with --init_image: the share of the grid's steps that run, in "
                   "(0, 1] (floor(steps x strength) steps, diffusers' convention; default 1)")
    p.add_argument("--mask", metavar="PICTURE", help="with --init_image: inpainting; white pixels are repainted, "
                   "black ones keep the picture (blended back at each step's level)")
    p.add_argument("--image_grid", "--grid", dest="image_grid", metavar="PNG",
                   help="also write one PNG of the first images (up to 256) side by side here")
    p.add_argument("--backend", default="auto", choices=BACKENDS, help="how the run executes: reference (the "
                   "methods' formulas op by op), torch (plain-torch combinations), fused (the fastest fused op here), "
                   "cpp or triton (that fused op), graph (one CUDA graph); auto: graph on CUDA, else fused")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"), help="the UNet's dtype")
    p.add_argument("--nvtx", action="store_true", default=None, help="NVTX ranges per step and model call")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    p.add_argument("--train_path", help="training folder: checkpoints and ema.ckpt (with --runner train)")
    p.add_argument("--restart", action="store_true", help="resume training from --train_path's checkpoint")
    p.add_argument("--data_path", help="training data folder (default: the config's Dataset.path)")
    p.add_argument("--max_steps", type=int, help="stop training after this many steps in all")
    p.add_argument("--out_path", "--out", dest="out_path", help="with --runner convert: the converted checkpoint "
                   "(.safetensors or .ckpt); with --runner tune: the profile (.json)")
    p.add_argument("--budgets", default="4,5,6,8,10", help="with --runner tune: the budgets of model calls to tune "
                   "for, separated by commas")
    p.add_argument("--noises", help="with --runner tune: SELECTION,VALIDATION noises (default 32,32)")
    p.add_argument("--profile", help="with --method auto: a profile of --runner tune to sample with (the bundled "
                   "models' own by default)")
    p.add_argument("--fid_stats", help="with --runner fid: the reference statistics (mu, sigma) as .npz")
    p.add_argument("--make_stats", action="store_true",
                   help="with --runner fid: write --fid_stats from the images in --image_path instead of scoring")
    return p


def parse_method(text: str) -> str:
    """A method as `pndm_fast.methods.method_record` reads it (or auto), spelled canonically."""
    from .methods import method_record

    if text == "auto":
        return text
    try:
        return method_record(text).name
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_timesteps(text: str):
    """A grid name, or comma-separated numbers (an explicit list of times)."""
    from .grids import grid_names

    if text in grid_names() or "," not in text and not text.replace(".", "", 1).isdigit():
        return text
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a grid ({', '.join(grid_names())}) nor a list of "
                                         "numbers separated by commas") from None


def training_summary(summary: dict, restart: bool) -> str:
    """One line on how training ended and where its checkpoints are."""
    where = (f"checkpoints in {os.path.dirname(summary['ema_path'])} ({os.path.basename(summary['ema_path'])}, "
             "the EMA weights sampling loads, and train_state.pt for --restart)")
    if not summary["losses"]:
        return f"training was already complete at step {summary['step']}; nothing to do; {where}"
    done = "resumed and trained" if restart else "trained"
    return (f"{done} to step {summary['step']} (loss {summary['loss']:.4g}) in {summary['seconds']:.0f} s; {where}")


def default_device(requested: str | None) -> str:
    if requested:
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_model_flag(args, config: dict) -> None:
    struc = config["Model"].get("struc")
    if args.model and args.model != struc:
        raise UserError(f"--model {args.model} disagrees with the config's Model.struc {struc}; "
                        f"drop --model or pass --model {struc}")


def validate_args(args) -> None:
    """Refuse flag values that argparse's types let through but no runner can use, before any config, model or
    data is loaded: one line each, naming the flag (the runners would otherwise fail deep inside torch or os)."""
    import os

    from .config import MAX_TOTAL_NUM
    from .runners.sample import check_device

    def check_folder(flag: str, path: str) -> None:
        """`path` is, or can be made, a folder to write into: refused when it or an ancestor is a file, or when
        the file system will not create it (permissions say too little: /proc takes no folder, even from root).
        A missing folder is created and removed again to find out, so a refused run leaves nothing behind."""
        if os.path.exists(path) and not os.path.isdir(path):
            raise UserError(f"{flag} {path} is a file: expected a folder (existing or to be created); choose "
                            "another path")
        existing = os.path.abspath(path)
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing):
            raise UserError(f"{flag} {path} cannot be created because {existing} is a file; choose another path")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise UserError(f"{flag} {path} is not writable (no permission in {existing}); choose another path")
        missing = []
        below = os.path.abspath(path)
        while below != existing:
            missing.append(below)
            below = os.path.dirname(below)
        made = []
        try:
            for folder in reversed(missing):
                try:
                    os.mkdir(folder)
                except FileExistsError:  # another process made it meanwhile (torchrun's ranks check at once)
                    if os.path.isdir(folder):
                        continue
                    raise
                made.append(folder)
        except OSError as err:
            raise UserError(f"{flag} {path} cannot be created in {existing} ({err.strerror}); choose a folder on a "
                            "writable disk") from None
        finally:
            for folder in reversed(made):
                try:
                    os.rmdir(folder)
                except OSError:  # another process wrote into it meanwhile: leave it
                    break

    def check_checkpoint(path: str) -> None:
        """A --model_path that is a folder or a text file is named as such (the loader could only say "not
        found" or quote an unpickling byte)."""
        from .models.diffusers_folder import is_diffusers_folder

        if os.path.isdir(path) and not is_diffusers_folder(path):
            raise UserError(f"--model_path {path} is a folder but not a diffusers model folder (config.json and "
                            "diffusion_pytorch_model.safetensors): expected a checkpoint file (.ckpt, .pt, .pth or "
                            ".safetensors) inside it")
        try:
            with open(path, "rb") as f:
                head = f.read(512)
        except OSError:
            return  # missing or unreadable: the loader says which, with where to get checkpoints
        # torch.save's zip and legacy pickle formats and safetensors' 8-byte header length all hold a NUL or a
        # byte that is not UTF-8 within their first bytes; a YAML, JSON or text file holds neither.
        try:
            text = head.decode("utf-8")
        except UnicodeDecodeError:
            return
        if head and "\0" not in text:
            raise UserError(f"--model_path {path} is a text file, not a checkpoint: expected a state dict saved by "
                            "torch.save (.ckpt, .pt, .pth) or a .safetensors file (a config goes to --config)")

    for name, value in sorted(vars(args).items()):
        if isinstance(value, str) and "\0" in value:
            raise UserError(f"--{name} holds a NUL character, which no path or name can contain; check the command")
    for name in ("total_num", "batch_size", "max_steps"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise UserError(f"--{name} must be at least 1, got {value}")
    if args.total_num is not None and args.total_num > MAX_TOTAL_NUM:
        raise UserError(f"--total_num must be at most {MAX_TOTAL_NUM} (images are named 000000.png to 999999.png), "
                        f"got {args.total_num}; split larger runs with --seed")
    if args.seed < 0:
        raise UserError(f"--seed must be 0 or more (image i's noise is seeded by (seed, i)), got {args.seed}")
    if (args.strength is not None or args.mask) and not args.init_image:
        raise UserError("--strength and --mask edit a picture: give --init_image PICTURE too")
    if args.strength is not None and not 0 < args.strength <= 1:
        raise UserError(f"--strength must be in (0, 1] (the share of the grid's steps that run), got {args.strength}")
    if args.device:
        check_device(args.device)
    if args.model_path:
        check_checkpoint(args.model_path)
    if args.runner == "sample":
        check_folder("--image_path", args.image_path)
        if args.image_grid:
            if os.path.isdir(args.image_grid):
                raise UserError(f"--image_grid {args.image_grid} is a folder: expected a PNG file name, e.g. grid.png")
            check_folder("--image_grid's folder", os.path.dirname(os.path.abspath(args.image_grid)))
    if args.runner == "train" and args.train_path:
        check_folder("--train_path", args.train_path)


def announce_sampling(args, device: str) -> None:
    """Before a sampling run, on the first process only: one line on which fused op runs (and how to get the
    faster one), and a word on anything that would otherwise look like a hang or a slow machine."""
    import torch

    from . import distributed
    from .kernels_info import fused_op_notice
    from .sampling import resolve_backend

    if not distributed.world().is_main:
        return
    kind = torch.device(device).type
    print(fused_op_notice(device, resolve_backend(args.backend, torch.device(device))))
    if args.dtype == "fp16" and kind == "cpu":
        # digits UNet, batch 16, one forward on 2 cores: fp32 0.40 s, bf16 0.45 s, fp16 3.5 s
        print("pndm-fast: warning: --dtype fp16 on the CPU runs the UNet about 8x slower than fp32 or bf16 (CPUs "
              "have no fast float16 convolutions); use --dtype fp32, the default, or bf16", file=sys.stderr)
    if args.compile:
        # benchmarks/RESULTS.md, end to end, "first s" of fused+compile: 33 s for the digits UNet on 2 CPU cores
        print("compiling the UNet with torch.compile: the first batch waits for it (about 30 s to a minute for the "
              "digits UNet on 2 CPU cores, longer for larger UNets); later batches of the same shape run compiled")


def run(args) -> int:
    validate_args(args)
    device = default_device(args.device)
    if args.runner == "convert":
        from .runners.convert import run_convert

        return run_convert(args.model_path, args.out_path, load_config(args.config) if args.config else None)
    if args.runner == "fid":
        from .runners.fid import run_fid

        return run_fid(args.image_path, args.fid_stats, make_stats=args.make_stats, device=device,
                       batch_size=args.batch_size or 50)
    config = load_config(args.config or "digits")
    check_model_flag(args, config)
    # resolved once here, on the schedule the run samples on, so that runs, settings and checks name what ran
    from .grids import TimeGrid
    from .runners.sample import resolve_grid_flags

    resolve_grid_flags(config, args, args.config or "digits")
    if args.sample_step is None and not isinstance(args.timesteps, TimeGrid):
        args.sample_step = 50
    if args.runner == "train":
        from .runners.train import train

        if not args.train_path:
            raise UserError("--runner train needs --train_path DIR (where checkpoints and ema.ckpt are written)")
        summary = train(config, args.train_path, restart=args.restart, device=device, data_path=args.data_path,
                        max_steps=args.max_steps, seed=args.seed, progress=not args.no_progress)
        print(training_summary(summary, args.restart))
        return 0
    if args.runner == "tune":
        from .runners.tune import run_tune

        return run_tune(config, args.model_path, device, args.out_path, args.budgets, args.noises, args.classes,
                        args.guidance, args.seed, args.dtype, progress=not args.no_progress,
                        config_name=(args.config or "digits").replace("_", "-"))
    if args.runner == "check":
        from .runners.check import run_check

        return run_check(config, args.model_path, device, args.method, args.sample_step, args.seed,
                         args.batch_size or 2, timesteps=args.timesteps, end=args.timesteps_end)
    from .runners.sample import SampleOptions, run_sample

    announce_sampling(args, device)
    run_sample(config, SampleOptions(
        method=args.method, sample_step=args.sample_step, timesteps=args.timesteps, end=args.timesteps_end,
        classes=args.classes, guidance=args.guidance,
        image_path=args.image_path, model_path=args.model_path,
        total_num=args.total_num, batch_size=args.batch_size, seed=args.seed, device=device,
        backend=args.backend, compile=args.compile, dtype=args.dtype, nvtx=args.nvtx, image_grid=args.image_grid,
        profile=args.profile, init_image=args.init_image, strength=args.strength, mask=args.mask,
        progress=not args.no_progress))
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return run(build_parser().parse_args(argv))
    except UserError as err:
        print(f"pndm-fast: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        # training says which step it saved; elsewhere every file is written atomically, so none is partial
        message = err.args[0] if err.args else "interrupted; every file already written is complete"
        print(f"pndm-fast: {message}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
