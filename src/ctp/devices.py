"""Which torch device to run on: the default, and a check of one the user names (the bottom layer)."""

from __future__ import annotations

import torch

from ctp.errors import CTPError


def check_device(name: str, flag: str = "--device") -> str:
    """``name`` if it is a torch device this machine has; a one-line error otherwise."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise CTPError(f"unknown device '{name}'", "use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CTPError(f"{flag} {name}: no CUDA GPU is available here", f"use {flag} cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CTPError(f"{flag} {name}: this machine has {torch.cuda.device_count()} GPU(s)",
                           "use cuda:0 or another existing index")
    elif device.type not in ("cpu", "mps", "xpu"):
        raise CTPError(f"device type '{device.type}' is not supported", "use cpu or cuda")
    return name


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def available_memory(device: str | torch.device) -> int | None:
    """Bytes that can still be allocated on ``device`` (the CPU: the kernel's MemAvailable), None if unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
