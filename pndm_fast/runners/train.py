"""The paper's code's training loop (docs/design.md, "Training"), with EMA, atomic checkpoints and exact restarts.

Exact restart without saving any RNG state: every random draw of step k (flips, times, noise, dropout) comes
from generators seeded by (seed, k) alone, and the data order of epoch e from (seed, e). A run stopped after a
checkpoint and restarted therefore ends with bitwise the same weights as one that never stopped.

Under torchrun (K processes, DistributedDataParallel: gloo on CPU, NCCL on CUDA) every rank makes the same draws
for the whole batch of Dataset.batch_size rows and keeps its own K-th of the rows (images, flips, times, noise),
and the loss is the mean over the whole batch, so DDP's gradient average is the single-process gradient up to
the order of the float sums. Weights, optimizer state and EMA then stay identical on every rank; rank 0 alone
writes the checkpoints and shows the progress bar. Dropout masks are drawn per rank, from (seed, step, rank),
so a model with dropout > 0 trains on other masks than a single process does (same distribution).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import threading
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from .. import distributed
from ..atomic import atomic_file, remove_stale_temps
from ..data import TensorImages, load_dataset
from ..errors import UserError
from ..lock import folder_lock
from ..models import build_model, save_state_dict
from ..models.checkpoint import torch_load
from ..seeds import derived_seed

STATE_FILE = "train_state.pt"
EMA_FILE = "ema.ckpt"
SAVE_EVERY = 5000  # the reference's checkpoint interval
STREAM_INIT, STREAM_ORDER, STREAM_DRAWS, STREAM_DROPOUT = range(4)  # independent random streams
ALONE = distributed.World(0, 1, 0)  # a single process: the whole batch is its share


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


def learning_rate(section: dict, step: int, limit: int) -> float:
    """Optim.lr at `step` (0-based) of a run of `limit` steps: constant, or a cosine from lr down to 0 at `limit`.
    A function of the step alone, so that --restart continues with the same rates."""
    lr = float(section["lr"])
    if section.get("lr_schedule", "constant") == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * min(step, limit) / limit))
    return lr


def shard(n: int, w: distributed.World) -> slice:
    """The rows of a batch of n that rank w.rank trains on: K equal parts when K divides n (every full batch;
    train checks Dataset.batch_size), else sizes differing by one (an epoch's short last batch; a rank may get
    none when n < K, and then contributes zero gradient)."""
    size, extra = divmod(n, w.size)
    start = w.rank * size + min(w.rank, extra)
    return slice(start, start + size + (w.rank < extra))


class TableNoising:
    """The paper's noising: antithetic integer times t and N - 1 - t, x_t = sqrt(ac[t]) x0 + sqrt(1 - ac[t]) eps;
    the network is asked for eps at time t."""

    def __init__(self, ac: torch.Tensor):
        self.ac = ac

    def __call__(self, x0: torch.Tensor, gen: torch.Generator, n: int, rows: slice):
        num_steps = self.ac.shape[0]
        t = torch.randint(0, num_steps, (n // 2 + 1,), generator=gen, device=x0.device)
        t = torch.cat([t, num_steps - 1 - t])[:n][rows]
        eps = torch.randn((n, *x0.shape[1:]), generator=gen, device=x0.device)[rows]
        a = self.ac[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1.0 - a).sqrt() * eps  # training reads ac[t], sampling ac[t + 1] (docs/design.md, "Time and noise level")
        return x_t, t.float(), eps


class FlowNoising:
    """Rectified-flow noising: antithetic s and 1 - s, s uniform in [0, 1), x_s = (1 - s) x0 + s eps; the network
    is asked for the velocity eps - x0 at time `time_scale` s (1000 s, as SD3's network reads it)."""

    def __init__(self, time_scale: float):
        self.time_scale = time_scale

    def __call__(self, x0: torch.Tensor, gen: torch.Generator, n: int, rows: slice):
        u = torch.rand((n // 2 + 1,), generator=gen, device=x0.device)
        s = torch.cat([u, 1.0 - u])[:n][rows]
        eps = torch.randn((n, *x0.shape[1:]), generator=gen, device=x0.device)[rows]
        s4 = s.view(-1, 1, 1, 1)
        return (1.0 - s4) * x0 + s4 * eps, self.time_scale * s, eps - x0


def noising_for(config: dict, device: torch.device):
    """How training noises the data under the config's schedule: the paper's table, or a rectified flow."""
    from ..continuous import schedule_from_config

    schedule = schedule_from_config(config["Schedule"])
    if schedule.family == "flow":
        return FlowNoising(1000.0 if config["Model"].get("time_input") == "1000t" else 1.0)
    if not schedule.discrete:
        raise UserError(f"training runs on a discrete table or a rectified flow, not the {schedule.description} "
                        "schedule")
    return TableNoising(schedule.alphas_cumprod.to(device))


def row_losses(model: torch.nn.Module, x0: torch.Tensor, noising, gen: torch.Generator, loss_type: str,
               batch: int | None = None, rows: slice | None = None,
               labels: torch.Tensor | None = None) -> torch.Tensor:
    """The prediction loss of each image of x0 (m, C, H, W) in [-1, 1], summed over C, H, W: shape (m,).

    x0 holds the rows `rows` of a batch of `batch` images (default: all of them). `noising` (TableNoising,
    FlowNoising) draws times and noise for the whole batch and cuts them to those rows, so a batch split over
    processes sees the draws one process would; it gives the network's input, time and target. labels (m,), for a
    class-conditional model, are passed to it as y. Antithetic times lower the variance of the batch mean, as the
    reference does.
    """
    n = x0.shape[0] if batch is None else batch
    rows = slice(0, n) if rows is None else rows
    x_t, t, target = noising(x0, gen, n, rows)
    # a learned-sigma network (iDDPM) outputs 2C channels: the first C are eps
    out = model(x_t, t) if labels is None else model(x_t, t, labels)
    error = out[:, : x0.shape[1]] - target
    if loss_type == "linear":
        return error.abs().sum(dim=(1, 2, 3))
    if loss_type == "square":
        return error.square().sum(dim=(1, 2, 3))
    raise UserError(f"unknown Train.loss_type {loss_type!r}: expected linear or square")


def drop_labels(labels: torch.Tensor, gen: torch.Generator, rate: float, null_label: int, batch: int | None = None,
                rows: slice | None = None) -> torch.Tensor:
    """labels (m,) with each replaced by null_label with probability `rate`, so that one network also learns the
    unconditional model that classifier-free guidance needs; the coins are tossed for the whole batch of
    `batch` (see row_losses)."""
    n = labels.shape[0] if batch is None else batch
    drop = torch.rand(n, generator=gen, device=labels.device)[slice(0, n) if rows is None else rows] < rate
    return torch.where(drop, torch.full_like(labels, null_label), labels)


def random_flip(x: torch.Tensor, gen: torch.Generator, batch: int | None = None,
                rows: slice | None = None) -> torch.Tensor:
    """Each image of (m, C, H, W) mirrored left-right with probability 1/2; x holds the rows `rows` of a batch
    of `batch` images (default: all), and the coins are tossed for the whole batch (see row_losses)."""
    n = x.shape[0] if batch is None else batch
    flip = torch.rand(n, generator=gen, device=x.device)[slice(0, n) if rows is None else rows] < 0.5
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
    """torch.save that never leaves half a file under `path` (see atomic_file)."""
    with atomic_file(path) as file:
        torch.save(obj, file)


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped training after a step, once that step was saved; the message says where."""


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
    state = torch_load(path, map_location=device, what="training state")
    needed = ("model", "optimizer", "ema", "step", "epoch", "batch", "seed")
    missing = [key for key in needed if not isinstance(state, dict) or key not in state]
    if missing:
        raise UserError(f"training state {path} lacks {', '.join(missing)}: it was not written by --runner train; "
                        f"start a new run in an empty folder")
    # a file edited by hand (or by anything but this runner) must fail here, in one line, not deep in torch
    wrong = [key for key in ("step", "epoch", "batch", "seed")
             if not isinstance(state[key], int) or isinstance(state[key], bool) or state[key] < 0]
    wrong += [key for key in ("model", "ema") if not isinstance(state[key], dict)
              or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state[key].items())]
    wrong += [] if isinstance(state["optimizer"], dict) else ["optimizer"]
    if wrong:
        raise UserError(f"training state {path} holds a wrong type in {', '.join(wrong)}: it was altered after "
                        "--runner train wrote it; restore it, or start a new run in an empty folder")
    return state


def resume(state_path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, seed: int,
           per_epoch: int) -> tuple[dict[str, torch.Tensor], int]:
    """Load model and optimizer from train_state.pt; returns its (ema, step)."""
    state = load_train_state(state_path, next(model.parameters()).device)
    if state["seed"] != seed or divmod(state["step"], per_epoch) != (state["epoch"], state["batch"]):
        raise UserError(f"{state_path} was written with another seed, dataset size or Dataset.batch_size: "
                        f"restore them to resume exactly, or start a new run in an empty folder")
    expected = model.state_dict()
    ema = state["ema"]
    try:
        model.load_state_dict(state["model"])
        if ema.keys() != expected.keys() or any(ema[k].shape != v.shape for k, v in expected.items()):
            raise RuntimeError("the EMA weights do not match the model")
    except RuntimeError:
        raise UserError(f"{state_path} holds a model of another shape: restart with the config it was "
                        f"trained with") from None
    try:
        optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError, TypeError, RuntimeError, IndexError):
        raise UserError(f"{state_path} holds an optimizer state of another optimizer or model: restart with the "
                        "Optim section it was trained with, or start a new run in an empty folder") from None
    return ema, state["step"]


def epoch_loader(dataset, batch_size: int, num_workers: int, seed: int, epoch: int, first_batch: int,
                 w: distributed.World = ALONE) -> torch.utils.data.DataLoader:
    """Batches of epoch `epoch` from batch `first_batch` on, in an order that depends on (seed, epoch) only;
    of each batch, only the rows shard(n, w) of this rank (so each image is read by one process only)."""
    gen = torch.Generator().manual_seed(derived_seed(seed, STREAM_ORDER, epoch))
    order = torch.randperm(len(dataset), generator=gen).tolist()
    batches = [order[i: i + batch_size] for i in range(first_batch * batch_size, len(order), batch_size)]
    # in-memory tensors need no worker processes; image files are decoded in up to Dataset.num_workers of them
    workers = 0 if isinstance(dataset, TensorImages) else min(num_workers, os.cpu_count() or 1)
    return torch.utils.data.DataLoader(dataset, num_workers=workers,
                                       batch_sampler=[b[shard(len(b), w)] for b in batches])


def stop_requested(requests: list[int], w: distributed.World, device: torch.device) -> bool:
    """Whether any process got SIGINT or SIGTERM: under torchrun every rank must stop after the same step (they
    save together), so the ranks agree on it with one all-reduce of a flag per step."""
    if w.size == 1:
        return bool(requests)
    flag = torch.tensor([float(bool(requests))], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, noising,
               gen: torch.Generator, *, loss_type: str, grad_clip: float | None, flip: bool,
               batch: int | None = None, w: distributed.World = ALONE, labels: torch.Tensor | None = None,
               label_dropout: float = 0.0, null_label: int = 0) -> torch.Tensor:
    """One optimizer step on a batch (n = `batch`, C, H, W) in [0, 1] of which x holds this rank's rows
    shard(n, w) (all n in a single process); returns the loss of the whole batch before the step. labels, for
    a class-conditional model, are this rank's rows' classes; a share label_dropout of them become null_label."""
    n = x.shape[0] if batch is None else batch
    rows = shard(n, w)
    x0 = x * 2.0 - 1.0
    if labels is not None:  # drawn first, and only here: an unconditional run makes the draws it always made
        labels = drop_labels(labels, gen, label_dropout, null_label, n, rows)
    if flip:
        x0 = random_flip(x0, gen, n, rows)
    losses = row_losses(model, x0, noising, gen, loss_type, n, rows, labels)
    if w.size == 1:
        loss = losses.mean(dim=0)
    else:
        # DDP averages the K ranks' gradients: (1/K) sum_r (K/n) sum_{rows of r} = (1/n) sum over the batch,
        # the gradient of the batch mean, whatever the size of each rank's share
        total = losses.sum()
        loss = total * (w.size / n)
    optimizer.zero_grad()
    loss.backward()
    if grad_clip is not None:
        # after DDP's all-reduce every rank holds the same gradient, hence the same norm and the same step
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    if w.size == 1:
        return loss.detach()
    total = total.detach().clone()
    dist.all_reduce(total)  # the batch's loss for the log: the sum over all ranks' rows, over n
    return total / n


@contextlib.contextmanager
def stop_signals():
    """Turn the first SIGINT or SIGTERM into a request to stop after the current step (a list that the loop reads:
    non-empty once one came); a second one interrupts at once (every write is atomic, so nothing is corrupted).
    Only the main thread can set signal handlers; elsewhere the signals keep their behaviour."""
    requests: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield requests
        return

    def handler(signum, frame):
        if requests:
            raise KeyboardInterrupt
        requests.append(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requests
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def train(config: dict, train_path: str, *, restart: bool = False, device: str = "cpu",
          data_path: str | None = None, max_steps: int | None = None, seed: int = 0,
          progress: bool = True) -> dict:
    """Train config's model on config's dataset, checkpointing into train_path (see _train); the main process holds
    train_path's lock (pndm_fast.lock) for the whole run, so a second training into the same folder is refused.

    SIGINT (Ctrl-C) or SIGTERM stops the run after the current step: it is saved (atomically, as every save is)
    and TrainingInterrupted, a KeyboardInterrupt, says where; --restart then continues bit for bit. A non-finite
    loss or weight stops the run with a UserError before anything is saved, so the last good checkpoint stays.
    """
    with contextlib.ExitStack() as held:
        if distributed.world().is_main and train_path:
            os.makedirs(train_path, exist_ok=True)
            held.enter_context(folder_lock(train_path, "training run"))
            # under the lock no other run writes here: temporary files are full-size checkpoints that runs killed
            # mid-save left behind
            remove_stale_temps(train_path)
        return _train(config, train_path, restart=restart, device=device, data_path=data_path,
                      max_steps=max_steps, seed=seed, progress=progress)


def _train(config: dict, train_path: str, *, restart: bool = False, device: str = "cpu",
           data_path: str | None = None, max_steps: int | None = None, seed: int = 0,
           progress: bool = True) -> dict:
    """Train config's model on config's dataset, checkpointing into train_path; returns a summary.

    Runs Train.epoch epochs of Dataset.batch_size, or stops after max_steps (or Train.max_steps) steps in all,
    counting the steps of earlier runs when restarting. Saves train_state.pt (everything needed to resume)
    and ema.ckpt (the EMA weights, the model that sampling loads) every Train.save_every steps and at the end.
    Under torchrun, Dataset.batch_size is the batch of all processes together (see the module's docstring);
    train_path must then be one folder that every process sees. Returns {"step", "epoch" (epochs done,
    fractional), "loss" (the last), "losses" (this run's, each the mean over the whole batch), "seconds",
    "ema_path", "world_size"}.
    """
    missing = [name for name in ("Schedule", "Dataset", "Model", "Optim") if not isinstance(config.get(name), dict)]
    if missing:
        raise UserError(f"a training config needs the sections Schedule, Dataset, Model, Optim (and Train); "
                        f"this one lacks {', '.join(missing)}: start from pndm_fast/configs/digits.yml")
    section, data_section = config.get("Train") or {}, config["Dataset"]
    batch_size, num_workers = int(data_section.get("batch_size", 64)), int(data_section.get("num_workers", 0))
    w = distributed.world()
    if batch_size % w.size:
        # checked before joining the process group, so every rank stops here without waiting for the others
        raise UserError(f"Dataset.batch_size {batch_size} (the batch of all processes together) is not divisible "
                        f"by the {w.size} processes: use a multiple of {w.size} or another --nproc_per_node")
    state_path = check_train_path(train_path, restart)
    num_classes = int(config["Model"].get("num_classes") or 0)
    dataset = load_dataset(config, data_path, labels=num_classes > 0)
    label_dropout = float(section.get("label_dropout", 0.1))  # classifier-free guidance's usual 10%
    if num_classes and not 0.0 <= label_dropout < 1.0:
        raise UserError(f"Train.label_dropout is {label_dropout}: expected a number in [0, 1), the share of "
                        f"labels replaced by the null class (e.g. 0.1)")
    if num_classes and int(dataset.labels.max()) >= num_classes:
        raise UserError(f"Model.num_classes is {num_classes} but the dataset has labels up to "
                        f"{int(dataset.labels.max())}: set Model.num_classes to {int(dataset.labels.max()) + 1}")
    per_epoch = math.ceil(len(dataset) / batch_size)  # the last batch of an epoch may be short, as in the reference
    limit = min([int(section.get("epoch", 1)) * per_epoch]
                + [int(m) for m in (max_steps, section.get("max_steps")) if m is not None])
    save_every = int(section.get("save_every", SAVE_EVERY))
    ema_rate = float(section.get("ema_rate", 0.9999)) if section.get("ema", True) else 0.0
    options = {"loss_type": section.get("loss_type", "linear"), "grad_clip": config["Optim"].get("grad_clip"),
               "flip": bool(data_section.get("random_flip", False))}
    device = torch.device(distributed.device_for(device, w))

    # the seeds for the initial weights and each step's dropout must not leak into the caller's global RNG
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), contextlib.ExitStack() as stack:
        if w.size > 1 and not distributed.is_initialized():
            stack.callback(distributed.shutdown)  # a process group that the caller joined is the caller's to leave
        distributed.init(device.type)
        noising = noising_for(config, device)
        distributed.barrier()  # every rank has passed the checks above before rank 0 may write into train_path
        torch.manual_seed(derived_seed(seed, STREAM_INIT, 0))
        model = build_model(config).to(device)
        optimizer = make_optimizer(model.parameters(), config["Optim"])
        ema, step = {k: v.detach().clone() for k, v in model.state_dict().items()}, 0
        if restart:
            ema, step = resume(state_path, model, optimizer, seed, per_epoch)
        # every rank starts from the same weights (same seed, or the same file); DDP also broadcasts rank 0's
        net = model if w.size == 1 else DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

        def save() -> None:
            nonlocal saved_step
            # the weights after the last step are what is saved: a step that made them NaN or Inf (a finite loss
            # computed before it) must not replace a good checkpoint
            if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
                raise UserError(diverged(f"the weights hold NaN or Inf after step {step}"))
            if w.is_main:
                epoch, batch = divmod(step, per_epoch)
                # train_state.pt first: a kill between the two files then leaves a folder that --restart resumes
                # (ema.ckpt one save behind, rewritten by the next save), never an ema.ckpt without its state.
                atomic_torch_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "ema": ema,
                                   "step": step, "epoch": epoch, "batch": batch, "seed": seed, "config": config},
                                  state_path)
                save_state_dict(ema, os.path.join(train_path, EMA_FILE))
            # no rank runs ahead or returns before both files are complete: a --restart reads one step's pair
            distributed.barrier()
            saved_step = step

        def diverged(what: str) -> str:
            kept = (f"{train_path} keeps its last checkpoint (step {saved_step})" if saved_step is not None
                    else f"{train_path} holds no checkpoint of this run")
            return (f"training diverged: {what}; stopped before saving anything, so {kept}; lower Optim.lr "
                    f"({config['Optim'].get('lr')}) or set Optim.grad_clip, then --restart or start afresh")

        saved_step = step if restart else None
        losses: list[float] = []
        stop = stack.enter_context(stop_signals())
        start = time.perf_counter()
        bar = tqdm(total=limit, initial=step, desc="train", file=sys.stderr, disable=not (progress and w.is_main),
                   dynamic_ncols=True)
        net.train()
        while step < limit:
            epoch, first_batch = divmod(step, per_epoch)
            for batch, x in enumerate(epoch_loader(dataset, batch_size, num_workers, seed, epoch, first_batch, w),
                                      first_batch):
                gen = torch.Generator(device).manual_seed(derived_seed(seed, STREAM_DRAWS, step))
                # one process draws (seed, step)'s dropout masks; K processes each draw their own, from the rank
                words = (seed, STREAM_DROPOUT, step) if w.size == 1 else (seed, STREAM_DROPOUT, step, w.rank)
                torch.manual_seed(derived_seed(*words))
                n = min(batch_size, len(dataset) - batch * batch_size)
                labels = None
                if num_classes:
                    x, labels = x[0], x[1].to(device)
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(config["Optim"], step, limit)
                loss = train_step(net, optimizer, x.to(device), noising, gen, batch=n, w=w, labels=labels,
                                  label_dropout=label_dropout, null_label=num_classes, **options)
                ema_update(ema, model, ema_rate)
                step += 1
                losses.append(loss.item())
                if not math.isfinite(losses[-1]):
                    raise UserError(diverged(f"the loss is {losses[-1]} at step {step}"))
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{losses[-1]:.3f}", refresh=False)
                if step % save_every == 0 or step == limit:
                    save()
                if stop_requested(stop, w, device):
                    if saved_step != step:
                        save()
                    bar.close()
                    raise TrainingInterrupted(
                        f"interrupted by {signal.Signals(stop[0]).name if stop else 'another process'} after "
                        f"step {step}, which is saved in {state_path} (and {EMA_FILE} beside it); continue with "
                        "the same command and --restart")
                if step == limit:
                    break
        bar.close()
        if not losses:
            save()  # a restart that finds the run complete still leaves both files in place
    return {"step": step, "epoch": step / per_epoch, "loss": losses[-1] if losses else None, "losses": losses,
            "seconds": time.perf_counter() - start, "ema_path": os.path.join(train_path, EMA_FILE),
            "world_size": w.size}
