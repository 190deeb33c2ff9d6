"""Shared helpers of the benchmarks: timing, interleaved medians, machine description, output.

Every benchmark compares a fast path against a baseline *in the same run*: the two are
timed alternately (A B, B A, A B, ...) so a load spike on a shared machine hits both, and
the figure reported is the ratio of the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def sync(device: torch.device | str) -> None:
    """Wait for queued kernels (a no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: torch.device | str = "cpu") -> tuple[float, Any]:
    """(seconds, result) of one call of ``fn``, synchronising the device around it."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def interleaved(
    fns: dict[str, Callable[[], Any]],
    repeats: int,
    device: torch.device | str = "cpu",
    warmup: int = 0,
    cpu: dict[str, list[float]] | None = None,
) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Time every function ``repeats`` times, alternating their order each round.

    Returns ({name: [wall seconds...]}, {name: result of its first timed call}). ``warmup``
    untimed rounds run first. If a dict is passed as ``cpu`` it receives the process CPU
    seconds of each call (all threads): on a machine shared with other jobs the wall time
    also counts waiting for a core, the CPU time does not.
    """
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    first: dict[str, Any] = {}
    for r in range(repeats):
        order = names if r % 2 == 0 else names[::-1]
        for n in order:
            c0 = time.process_time()
            t, out = timed(fns[n], device)
            if cpu is not None:
                cpu.setdefault(n, []).append(time.process_time() - c0)
            times[n].append(t)
            if n not in first:
                first[n] = out
    return times, first


def timed_cpu(fn: Callable[[], Any], device: torch.device | str = "cpu") -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call of ``fn``."""
    c0 = time.process_time()
    t, _ = timed(fn, device)
    return t, time.process_time() - c0


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        info["loadavg_1m"] = os.getloadavg()[0]
    except OSError:
        pass
    return info


def base_parser(description: str) -> argparse.ArgumentParser:
    """Options every benchmark takes: device, threads, JSON output."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", default=None, help="also write the result dict to this JSON file")
    return p


def setup(args: argparse.Namespace) -> torch.device:
    """Apply --threads and check --device; returns the device."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for but no CUDA device is available")
    return device


def headline(name: str, r: dict[str, Any], threads: str = "torch threads") -> str:
    """The first line of a report: which benchmark, on what machine, under what load."""
    m = r["machine"]
    return (f"{name} on {m['cpu']} ({m['cpu_count']} cpus, {m['torch_threads']} {threads}, torch {m['torch']}), "
            f"device {r['device']}, load avg {m.get('loadavg_1m', float('nan')):.1f}")


def finish(result: dict[str, Any], args: argparse.Namespace, t_start: float,
           report: Callable[[dict[str, Any]], str]) -> dict[str, Any]:
    """Stamp the wall time and the load at the end, print ``report(result)``, write the JSON file if asked."""
    result["wall_s"] = time.perf_counter() - t_start
    result["machine"]["loadavg_end_1m"] = machine().get("loadavg_1m")
    print(report(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


def table(rows: list[dict[str, Any]], cols: list[str], title: str | None = None) -> str:
    """A plain-text table of ``rows`` restricted to ``cols`` (floats to 4 significant digits)."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        if isinstance(v, (list, tuple)):
            return "x".join(str(x) for x in v)
        return "-" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(cols)]
    lines = [] if title is None else [title]
    lines.append("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


# --------------------------------------------------------------------------- memory


def rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc; 0 elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Highest RSS seen while the context is open, sampled every ``interval`` seconds.

    ``delta`` is that peak minus the RSS on entry: the extra memory the block needed.
    Only meaningful in a process that has not already grown its heap beyond the
    block's needs (run each measurement in a fresh process).
    """

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def delta(self) -> int:
        return self.peak - self.start
