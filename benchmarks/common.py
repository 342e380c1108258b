"""What every benchmark shares, one implementation each: the machine and versions, timing (two medians and
their spread), the copy roofline, markdown tables, JSON rows and plots."""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"
REQUIRED_FIELDS = ("device", "torch", "triton", "torch_threads", "timestamp", "command")
"""Every JSON row carries these, so a row read on its own says where and how it was measured."""

# One timed batch of calls lasts at least this long: CUDA events resolve ~0.5 us and perf_counter's Python
# overhead is ~0.1 us, so a 12 KB kernel (~3 us on an H100) is timed over hundreds of back-to-back calls.
MIN_BATCH_S = {"cuda": 1e-3, "cpu": 2e-3}


def arg_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repetitions (minutes on a 2-core CPU)")
    parser.add_argument("--smoke", action="store_true", help="one tiny configuration, 1 repetition: checks the "
                        "script runs, the numbers mean nothing")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for <name>.json and <name>.png")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def mode(args) -> str:
    return "smoke" if args.smoke else "quick" if args.quick else "full"


def command_line(script: str, argv: list[str]) -> str:
    """The command that reproduces this run standalone, also when run_all.py called the script in-process."""
    return " ".join(["python", f"benchmarks/{script}", *argv])


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cores)"


def env_info(device: torch.device, command: str) -> dict:
    """The fields of REQUIRED_FIELDS, plus the 1-minute load average: other jobs on a shared CPU slow everything."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "torch_threads": torch.get_num_threads(),  # left at torch's default, recorded
        "load1": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Timing:
    """Two independent medians of seconds per call: `seconds` is their mean, `spread` their distance."""

    medians: tuple[float, float]

    @classmethod
    def of(cls, seconds: float, spread: float) -> "Timing":
        """The Timing a JSON row recorded as (seconds, spread), in any unit."""
        return cls((seconds - spread / 2, seconds + spread / 2))

    @property
    def seconds(self) -> float:
        return sum(self.medians) / 2

    @property
    def spread(self) -> float:
        return abs(self.medians[0] - self.medians[1])


def speedup(base: Timing, new: Timing) -> tuple[float, bool]:
    """(base / new, is_noise): a difference smaller than either configuration's own spread is noise."""
    noise = abs(base.seconds - new.seconds) < max(base.spread, new.spread)
    return base.seconds / new.seconds, noise


def speedup_text(ratio: float, noise: bool) -> str:
    return f"{ratio:.2f}x" + (" (noise)" if noise else "")


def _median_per_call(fn: Callable, device: torch.device, reps: int, inner: int) -> float:
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            # Events time the GPU stream from an empty queue (synchronized below) to the last call's end, so a
            # loop that keeps the GPU waiting on the host is charged for the wait.
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / inner)
        else:
            start_s = time.perf_counter()
            for _ in range(inner):
                fn()
            times.append((time.perf_counter() - start_s) / inner)
    return statistics.median(times)


def measure(fn: Callable, device: torch.device, reps: int, warmup: int = 1, batch: bool = False) -> Timing:
    """Seconds per call of fn(): after `warmup` calls, the median of `reps` timed batches, taken twice.

    With `batch`, each timed batch runs enough back-to-back calls to last MIN_BATCH_S (short kernels); otherwise
    one call per batch (whole sampling runs). CPU: time.perf_counter; CUDA: CUDA events.
    """
    start = time.perf_counter()
    for _ in range(warmup):
        fn()
    synchronize(device)
    per_call = (time.perf_counter() - start) / max(warmup, 1)
    inner = max(1, math.ceil(MIN_BATCH_S.get(device.type, 2e-3) / max(per_call, 1e-9))) if batch else 1
    first = _median_per_call(fn, device, reps, inner)
    return Timing((first, _median_per_call(fn, device, reps, inner)))


def graphed(forward: Callable[[], object], device: torch.device) -> Callable[[], None]:
    """`forward` captured in one CUDA graph (after warm-up calls on a side stream, which capture needs); returns
    its replay. Any forward works: a guided model call (one forward of twice the batch, and the mix) is bounded by
    passing that call instead."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(3):
            forward()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        forward()
    return graph.replay


def graphed_timing(step: Callable[[], object], device: torch.device, reps: int, calls: int) -> Timing:
    """Seconds per call of step() with `calls` calls replayed from one CUDA graph: the GPU's time alone, as a step
    costs inside the sampler's graph (no launch path, no host)."""
    def steps():
        for _ in range(calls):
            step()

    timing = measure(graphed(steps, device), device, reps, warmup=1, batch=True)
    return Timing(tuple(m / calls for m in timing.medians))


def timed_first_call(fn: Callable, device: torch.device) -> tuple[float, object]:
    """(seconds, result) of one call, synchronized: the first call, where compilation and graph capture happen."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def cache_bytes(device: torch.device) -> int:
    """The last-level cache (L2 of a GPU, L3 of a CPU): the data a benchmark rotates through must exceed it."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).L2_cache_size
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
        return int(text[:-1]) << {"K": 10, "M": 20}[text[-1]]
    except (OSError, ValueError, KeyError, IndexError):
        return 32 << 20


def rotation(make: Callable[[], tuple], set_bytes: int, device: torch.device) -> list[tuple]:
    """Enough copies of make() (set_bytes each) that cycling through them touches twice the last-level cache
    between two uses of one copy: a sampler step reads its eps from memory, and a cache-resident input would
    flatter small sizes (a 12 KB step would otherwise run from a 50 MB L2)."""
    return [make() for _ in range(max(1, math.ceil(2 * cache_bytes(device) / set_bytes)))]


def copy_step(shape: tuple, device: torch.device) -> Callable[[], None]:
    """One y.copy_(x) of float32 tensors of `shape` per call, rotating its buffers (see rotation)."""
    numel = math.prod(shape)
    # zeros, not empty: an untouched output's first write page-faults, and on a CPU that halves the copy rate
    pairs = itertools.cycle(rotation(lambda: (torch.randn(shape, device=device), torch.zeros(shape, device=device)),
                                     8 * numel, device)).__next__

    def copy():
        x, y = pairs()
        y.copy_(x)

    return copy


def copy_timing(shape: tuple, device: torch.device, reps: int) -> Timing:
    """y.copy_(x) of float32 tensors of `shape`: the bandwidth an elementwise pass can reach on this machine,
    measured like the kernels (rotated buffers, batched calls). Copy GB/s = 2 * bytes / time."""
    return measure(copy_step(shape, device), device, reps, warmup=3, batch=True)


@dataclass
class Column:
    header: str
    key: str | Callable[[dict], object]
    fmt: str = "{}"

    def cell(self, row: dict) -> str:
        value = self.key(row) if callable(self.key) else row.get(self.key)
        return "-" if value is None else self.fmt.format(value)


def markdown_table(rows: list[dict], columns: list[Column]) -> str:
    lines = ["| " + " | ".join(c.header for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(c.cell(row) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


@dataclass
class Panel:
    """One plot: a line per series label, (xs, ys); labels in `dashed` are reference lines (the roofline)."""

    title: str
    xlabel: str
    ylabel: str
    series: dict[str, tuple[list, list]] = field(default_factory=dict)
    dashed: tuple[str, ...] = ()
    logx: bool = True
    logy: bool = True

    def add(self, label: str, x, y) -> None:
        xs, ys = self.series.setdefault(label, ([], []))
        xs.append(x)
        ys.append(y)


def save_plot(path: Path, panels: list[Panel]) -> str | None:
    """Write the panels side by side to `path`; returns a note instead when matplotlib is absent. Panels without a
    series (a configuration measured nothing for them) are left out, and with none left nothing is drawn."""
    panels = [panel for panel in panels if panel.series]
    if not panels:
        return None
    try:
        import matplotlib
        matplotlib.use("Agg")  # headless: benchmark machines have no display
        import matplotlib.pyplot as plt
    except ImportError:
        return f"matplotlib is absent, {path.name} was not drawn (pip install matplotlib)"
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for label, (xs, ys) in panel.series.items():
            ax.plot(xs, ys, "--x" if label in panel.dashed else "-o", label=label, markersize=4)
        ax.set(title=panel.title, xlabel=panel.xlabel, ylabel=panel.ylabel)
        ax.set_xscale("log" if panel.logx else "linear")
        ax.set_yscale("log" if panel.logy else "linear")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def write_json(path: Path, rows: list[dict]) -> None:
    """Write atomically (tmp + rename), so a killed run never leaves half a file behind."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(rows, indent=1) + "\n")
    os.replace(tmp, path)


def report(name: str, out: Path, env: dict, rows: list[dict], columns: list[Column], panels: list[Panel],
           notes: list[str]) -> str:
    """Write <out>/<name>.json (env fields in every row) and <name>.png, print the table and notes; returns them
    as markdown for RESULTS.md."""
    out.mkdir(parents=True, exist_ok=True)
    rows = [{**env, **row} for row in rows]
    write_json(out / f"{name}.json", rows)
    plot_note = save_plot(out / f"{name}.png", panels) if rows else None
    text = markdown_table(rows, columns)
    bullets = notes + ([plot_note] if plot_note else [])
    if bullets:
        text += "\n\n" + "\n".join(f"- {note}" for note in bullets)
    print(f"\n{env['command']}\n{env['device']}, torch {env['torch']}, triton {env['triton']}, "
          f"{env['torch_threads']} threads, load {env['load1']}\n\n{text}\n", file=sys.stdout, flush=True)
    return text


def main(script: str, doc: str, name: str, run: Callable, columns: list[Column],
         argv: list[str] | None, add_arguments: Callable | None = None) -> tuple[str, list[dict]]:
    """A benchmark script's main: parse argv, run(args) -> (rows, panels, notes), report. Returns the markdown
    and the rows, for run_all.py. `add_arguments(parser)` adds a script's own options to the shared ones."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = arg_parser(doc.splitlines()[0])
    if add_arguments:
        add_arguments(parser)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        # Compile in-process: after a first compile, inductor's pool of compile workers starts up in the
        # background and takes the cores being timed (a 0.1 ms compiled kernel measured 8-16 ms for seconds on
        # 2 cores). A GPU host has cores to spare and keeps the parallel compile.
        from torch._inductor import config as inductor_config
        inductor_config.compile_threads = 1
    env = env_info(device, command_line(script, argv))
    rows, panels, notes = run(args)
    return report(name, args.out, env, rows, columns, panels, notes), rows


def marked(name: str) -> tuple[str, str]:
    """The HTML comments around a page section that the script `name` owns (other scripts keep it as it is)."""
    return f"<!-- begin: {name} -->", f"<!-- end: {name} -->"


def marked_sections(text: str) -> list[str]:
    """Every marked section of a page, in order, markers included."""
    import re

    return [m.group(0) for m in re.finditer(r"<!-- begin: (\S+) -->.*?<!-- end: \1 -->", text, re.S)]


def write_marked_section(path, name: str, section: str) -> None:
    """Put `section` (without its markers) into the page at `path` between the markers of `name`, replacing what
    was there, or at the end; the rest of the page is kept. Written atomically."""
    from pathlib import Path

    from pndm_fast.atomic import atomic_file

    begin, end = marked(name)
    block = f"{begin}\n{section.strip()}\n{end}"
    text = Path(path).read_text() if Path(path).exists() else ""
    if begin in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    with atomic_file(path) as file:
        file.write(text.encode("utf-8"))
