"""The paper's command line: pndm-fast --runner sample|train|check --config ... (python -m pndm_fast is the same)."""

from __future__ import annotations

import argparse
import sys

from .config import load_config
from .errors import UserError
from .plans import PLAN_BUILDERS
from .sampling import BACKENDS

MODELS = ("DDIM", "iDDPM")


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr and exit code 2, like every other user mistake."""

    def error(self, message: str):
        self.exit(2, f"pndm-fast: error: {message} (see pndm-fast --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="pndm-fast", description="PNDM sampling (Liu et al., ICLR 2022), fast and exact.")
    p.add_argument("--runner", default="sample", choices=("sample", "train", "check"))
    p.add_argument("--config", default="digits", help="a bundled config name (e.g. ddim-cifar10) or a YAML path")
    p.add_argument("--model", choices=MODELS, help="the architecture; must agree with the config's Model.struc")
    p.add_argument("--method", default="F-PNDM", choices=tuple(PLAN_BUILDERS))
    p.add_argument("--sample_step", type=int, default=50, help="number of sampling steps (the paper's sample_speed)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--image_path", default="temp/results", help="folder the PNG images are written to")
    p.add_argument("--model_path", help="checkpoint: a plain state dict (.ckpt/.pt) or .safetensors")
    p.add_argument("--total_num", type=int, help="number of images (default: the config's Sample.total_num)")
    p.add_argument("--batch_size", type=int, help="images per batch (default: the config's Sample.batch_size)")
    p.add_argument("--seed", type=int, default=0, help="image i's noise depends only on (seed, i)")
    p.add_argument("--grid", help="also write a grid PNG of the first images (up to 256) here")
    p.add_argument("--backend", default="auto", choices=BACKENDS)
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"), help="the UNet's dtype")
    p.add_argument("--nvtx", action="store_true", default=None, help="NVTX ranges per step and model call")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    p.add_argument("--train_path", help="training folder: checkpoints and ema.ckpt (with --runner train)")
    p.add_argument("--restart", action="store_true", help="resume training from --train_path's checkpoint")
    p.add_argument("--data_path", help="training data folder (default: the config's Dataset.path)")
    p.add_argument("--max_steps", type=int, help="stop training after this many steps in all")
    return p


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


def run(args) -> int:
    config = load_config(args.config)
    check_model_flag(args, config)
    device = default_device(args.device)
    if args.runner == "train":
        from .runners.train import train

        if not args.train_path:
            raise UserError("--runner train needs --train_path DIR (where checkpoints and ema.ckpt are written)")
        train(config, args.train_path, restart=args.restart, device=device, data_path=args.data_path,
              max_steps=args.max_steps, seed=args.seed, progress=not args.no_progress)
        return 0
    if args.runner == "check":
        from .runners.check import run_check

        return run_check(config, args.model_path, device, args.method, args.sample_step, args.seed,
                         args.batch_size or 2)
    from .runners.sample import SampleOptions, run_sample

    run_sample(config, SampleOptions(
        method=args.method, sample_step=args.sample_step, image_path=args.image_path, model_path=args.model_path,
        total_num=args.total_num, batch_size=args.batch_size, seed=args.seed, device=device,
        backend=args.backend, compile=args.compile, dtype=args.dtype, nvtx=args.nvtx, grid=args.grid,
        progress=not args.no_progress))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except UserError as err:
        print(f"pndm-fast: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pndm-fast: interrupted; images already written are complete", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
