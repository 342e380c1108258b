"""The reference implementation's training loop (SPEC section 7), with EMA, atomic checkpoints and exact restarts.

Exact restart without saving any RNG state: every random draw of step k (flips, times, noise, dropout) comes
from generators seeded by (seed, k) alone, and the data order of epoch e from (seed, e). A run stopped after a
checkpoint and restarted therefore ends with bitwise the same weights as one that never stopped.
"""

from __future__ import annotations

import math
import os
import sys
import time

import torch
from tqdm.auto import tqdm

from ..atomic import atomic_path
from ..data import TensorImages, load_dataset
from ..errors import UserError
from ..models import build_model, save_state_dict
from ..schedule import Schedule
from ..seeds import derived_seed

STATE_FILE = "train_state.pt"
EMA_FILE = "ema.ckpt"
SAVE_EVERY = 5000  # the reference's checkpoint interval
STREAM_INIT, STREAM_ORDER, STREAM_DRAWS, STREAM_DROPOUT = range(4)  # independent random streams


def make_optimizer(params, section: dict) -> torch.optim.Optimizer:
    """The reference's optimizer from the Optim section: Adam(lr, weight_decay, (beta1, 0.999), amsgrad, eps)."""
    kind = section.get("optimizer", "adam")
    if "lr" not in section:
        raise UserError("config Optim section lacks lr (the learning rate, e.g. lr: 0.0002)")
    if kind == "adam":
        return torch.optim.Adam(params, lr=section["lr"], weight_decay=section.get("weight_decay", 0.0),
                                betas=(section.get("beta1", 0.9), 0.999), amsgrad=section.get("amsgrad", False),
                                eps=section.get("eps", 1e-8))
    if kind == "sgd":
        return torch.optim.SGD(params, lr=section["lr"], momentum=0.9)
    raise UserError(f"unknown Optim.optimizer {kind!r}: expected adam or sgd")


def diffusion_loss(model: torch.nn.Module, x0: torch.Tensor, ac: torch.Tensor, gen: torch.Generator,
                   loss_type: str) -> torch.Tensor:
    """The noise-prediction loss of a batch x0 (n, C, H, W) in [-1, 1], summed over C, H, W, mean over n.

    Antithetic times (t and N - 1 - t in the same batch) lower the variance of the batch mean, as the reference does.
    """
    n, num_steps = x0.shape[0], ac.shape[0]
    t = torch.randint(0, num_steps, (n // 2 + 1,), generator=gen, device=x0.device)
    t = torch.cat([t, num_steps - 1 - t])[:n]
    eps = torch.randn(x0.shape, generator=gen, device=x0.device)
    a = ac[t].view(n, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1.0 - a).sqrt() * eps  # training reads ac[t], sampling ac[t + 1] (SPEC section 1)
    # a learned-sigma network (iDDPM) outputs 2C channels: the first C are eps
    error = model(x_t, t.float())[:, : x0.shape[1]] - eps
    if loss_type == "linear":
        return error.abs().sum(dim=(1, 2, 3)).mean(dim=0)
    if loss_type == "square":
        return error.square().sum(dim=(1, 2, 3)).mean(dim=0)
    raise UserError(f"unknown Train.loss_type {loss_type!r}: expected linear or square")


def random_flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Each image of (n, C, H, W) mirrored left-right with probability 1/2."""
    flip = torch.rand(x.shape[0], generator=gen, device=x.device) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)


def ema_update(ema: dict[str, torch.Tensor], model: torch.nn.Module, rate: float) -> None:
    """ema = rate * ema + (1 - rate) * w for the parameters; buffers are copied as they are."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in model.state_dict().items():
            if name in params:
                ema[name].mul_(rate).add_(value, alpha=1.0 - rate)
            else:
                ema[name].copy_(value)


def atomic_torch_save(obj, path: str) -> None:
    """torch.save that never leaves half a file under `path` (see atomic_path)."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def check_train_path(train_path: str, restart: bool) -> str:
    """The path of train_state.pt, after refusing to overwrite an earlier run or to resume a missing one."""
    os.makedirs(train_path, exist_ok=True)
    state_path = os.path.join(train_path, STATE_FILE)
    if restart and not os.path.isfile(state_path):
        raise UserError(f"--restart needs {state_path}, which does not exist: drop --restart to start a new run")
    if not restart and any(os.path.exists(os.path.join(train_path, f)) for f in (STATE_FILE, EMA_FILE)):
        raise UserError(f"train_path {train_path} has a checkpoint; pass --restart to resume or choose an "
                        f"empty folder")
    return state_path


def load_train_state(path: str, device: torch.device) -> dict:
    """train_state.pt, read with weights_only=True: tensors, dicts, lists and numbers only, never code."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure means the file is not a checkpoint of this runner
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise UserError(f"cannot read {path} ({reason}): it was not written by --runner train") from None


def resume(state_path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, seed: int,
           per_epoch: int) -> tuple[dict[str, torch.Tensor], int]:
    """Load model and optimizer from train_state.pt; returns its (ema, step)."""
    state = load_train_state(state_path, next(model.parameters()).device)
    if state["seed"] != seed or divmod(state["step"], per_epoch) != (state["epoch"], state["batch"]):
        raise UserError(f"{state_path} was written with another seed, dataset size or Dataset.batch_size: "
                        f"restore them to resume exactly, or start a new run in an empty folder")
    try:
        model.load_state_dict(state["model"])
    except RuntimeError:
        raise UserError(f"{state_path} holds a model of another shape: restart with the config it was "
                        f"trained with") from None
    optimizer.load_state_dict(state["optimizer"])
    return state["ema"], state["step"]


def epoch_loader(dataset, batch_size: int, num_workers: int, seed: int, epoch: int,
                 first_batch: int) -> torch.utils.data.DataLoader:
    """Batches of epoch `epoch` from batch `first_batch` on, in an order that depends on (seed, epoch) only."""
    gen = torch.Generator().manual_seed(derived_seed(seed, STREAM_ORDER, epoch))
    order = torch.randperm(len(dataset), generator=gen)[first_batch * batch_size:]
    # in-memory tensors need no worker processes; image files are decoded in up to Dataset.num_workers of them
    workers = 0 if isinstance(dataset, TensorImages) else min(num_workers, os.cpu_count() or 1)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers, sampler=order.tolist())


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, ac: torch.Tensor,
               gen: torch.Generator, *, loss_type: str, grad_clip: float | None, flip: bool) -> torch.Tensor:
    """One optimizer step on a batch x (n, C, H, W) in [0, 1]; returns the loss before the step."""
    x0 = x * 2.0 - 1.0
    if flip:
        x0 = random_flip(x0, gen)
    loss = diffusion_loss(model, x0, ac, gen, loss_type)
    optimizer.zero_grad()
    loss.backward()
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return loss.detach()


def train(config: dict, train_path: str, *, restart: bool = False, device: str = "cpu",
          data_path: str | None = None, max_steps: int | None = None, seed: int = 0,
          progress: bool = True) -> dict:
    """Train config's model on config's dataset, checkpointing into train_path; returns a summary.

    Runs Train.epoch epochs of Dataset.batch_size, or stops after max_steps (or Train.max_steps) steps in all,
    counting the steps of earlier runs when restarting. Saves train_state.pt (everything needed to resume)
    and ema.ckpt (the EMA weights, the model that sampling loads) every Train.save_every steps and at the end.
    Returns {"step", "epoch" (epochs done, fractional), "loss" (the last), "losses" (this run's), "seconds",
    "ema_path"}.
    """
    missing = [name for name in ("Schedule", "Dataset", "Model", "Optim") if not isinstance(config.get(name), dict)]
    if missing:
        raise UserError(f"a training config needs the sections Schedule, Dataset, Model, Optim (and Train); "
                        f"this one lacks {', '.join(missing)}: start from pndm_fast/configs/digits.yml")
    state_path = check_train_path(train_path, restart)
    device = torch.device(device)
    section, data_section = config.get("Train") or {}, config["Dataset"]
    dataset = load_dataset(config, data_path)
    batch_size, num_workers = int(data_section.get("batch_size", 64)), int(data_section.get("num_workers", 0))
    per_epoch = math.ceil(len(dataset) / batch_size)  # the last batch of an epoch may be short, as in the reference
    limit = min([int(section.get("epoch", 1)) * per_epoch]
                + [int(m) for m in (max_steps, section.get("max_steps")) if m is not None])
    save_every = int(section.get("save_every", SAVE_EVERY))
    ema_rate = float(section.get("ema_rate", 0.9999)) if section.get("ema", True) else 0.0
    options = {"loss_type": section.get("loss_type", "linear"), "grad_clip": config["Optim"].get("grad_clip"),
               "flip": bool(data_section.get("random_flip", False))}
    ac = Schedule.from_config(config["Schedule"]).alphas_cumprod.to(device)

    # the seeds for the initial weights and each step's dropout must not leak into the caller's global RNG
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(derived_seed(seed, STREAM_INIT, 0))
        model = build_model(config).to(device)
        optimizer = make_optimizer(model.parameters(), config["Optim"])
        ema, step = {k: v.detach().clone() for k, v in model.state_dict().items()}, 0
        if restart:
            ema, step = resume(state_path, model, optimizer, seed, per_epoch)

        def save() -> None:
            epoch, batch = divmod(step, per_epoch)
            save_state_dict(ema, os.path.join(train_path, EMA_FILE))
            atomic_torch_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "ema": ema,
                               "step": step, "epoch": epoch, "batch": batch, "seed": seed, "config": config},
                              state_path)

        losses: list[float] = []
        start = time.perf_counter()
        bar = tqdm(total=limit, initial=step, desc="train", file=sys.stderr, disable=not progress,
                   dynamic_ncols=True)
        model.train()
        while step < limit:
            epoch, first_batch = divmod(step, per_epoch)
            for x in epoch_loader(dataset, batch_size, num_workers, seed, epoch, first_batch):
                gen = torch.Generator(device).manual_seed(derived_seed(seed, STREAM_DRAWS, step))
                torch.manual_seed(derived_seed(seed, STREAM_DROPOUT, step))
                loss = train_step(model, optimizer, x.to(device), ac, gen, **options)
                ema_update(ema, model, ema_rate)
                step += 1
                losses.append(loss.item())
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{losses[-1]:.3f}", refresh=False)
                if step % save_every == 0 or step == limit:
                    save()
                if step == limit:
                    break
        bar.close()
        if not losses:
            save()  # a restart that finds the run complete still leaves both files in place
    return {"step": step, "epoch": step / per_epoch, "loss": losses[-1] if losses else None, "losses": losses,
            "seconds": time.perf_counter() - start, "ema_path": os.path.join(train_path, EMA_FILE)}
