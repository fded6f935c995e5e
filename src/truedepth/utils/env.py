"""Where numbers come from: the user cache folder and a description of the machine."""

from __future__ import annotations

import datetime
import datetime as _dt
import os
import platform
import sys
from pathlib import Path
from typing import Any


def cache_dir() -> Path:
    """Return (creating it) the user cache folder.

    ``$TRUEDEPTH_CACHE`` if set, else ``$XDG_CACHE_HOME/truedepth``, else ``~/.cache/truedepth``.
    """
    if os.environ.get("TRUEDEPTH_CACHE"):
        path = Path(os.environ["TRUEDEPTH_CACHE"]).expanduser()
    elif os.environ.get("XDG_CACHE_HOME"):
        path = Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "truedepth"
    else:
        path = Path.home() / ".cache" / "truedepth"
    path.mkdir(parents=True, exist_ok=True)
    return path


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_info(device: str, dtype: str) -> dict[str, Any]:
    import torch
    import transformers

    info: dict[str, Any] = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "dtype": dtype,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "date": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    if hasattr(os, "getloadavg"):
        info["load_average"] = round(os.getloadavg()[0], 2)  # other work on the machine slows every number
    return info


def describe_machine(info: dict[str, Any]) -> str:
    where = f"{info['gpu']} ({info['device']})" if "gpu" in info else f"{info['device']}"
    threads = f"{info['torch_threads']} thread" + ("s" if info["torch_threads"] != 1 else "")
    text = (
        f"Measured on: {info['cpu']}, {info['cores']} cores (torch uses {threads}), "
        f"device {where}, {info['dtype']}, torch {info['torch']}, transformers {info['transformers']}, "
        f"{info['date']}."
    )
    load = info.get("load_average")
    if load is not None and info["device"] == "cpu" and load > 0.5:
        text += (
            f"\nLoad average {load} at the start: other processes were using the CPU, so speeds are "
            "understated and noisy."
        )
    return text


def machine() -> str:
    """One line: the GPU's name, or the CPU's cores and torch threads."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    threads = torch.get_num_threads()
    return f"{os.cpu_count()}-core CPU ({platform.machine()}), {threads} torch thread{'s' * (threads > 1)}, no GPU"


def environment(device: Any) -> dict[str, Any]:
    import torch
    import transformers

    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or platform.machine())
    return {
        "date": datetime.date.today().isoformat(),
        "device": str(dev),
        "device_name": name,
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "command": " ".join(["truedepth", *sys.argv[1:]]) if sys.argv else "",
    }


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of handing it back to the kernel.

    By default glibc serves every allocation over 32 MB (a batch of logits, attention scores, MLP
    activations) with a fresh mmap and unmaps it on free, so each training step or forward pass
    faults in and zeroes the same pages again: on the 2-core CPU of docs/COMPRESS.md that was 15 %
    of all CPU time in system calls, and a distillation step ran 18 % faster without it (peak
    memory +15 %). Linux with glibc only; a no-op elsewhere or when ``TRUEDEPTH_MALLOC=system``.
    Returns whether the setting was applied."""
    if os.environ.get("TRUEDEPTH_MALLOC", "") == "system" or not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another C library: leave it as it is
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    # large blocks from the heap, not mmap; the heap's free top is returned only past 2 GB
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def use_threads(threads: int | None) -> None:
    """Set torch's CPU threads for this process to `threads` (None: torch's choice); the error names --threads."""
    if threads is None:
        return
    if threads < 1:
        from .errors import UserError

        raise UserError(f"--threads must be at least 1 (got {threads}).")
    import torch

    torch.set_num_threads(threads)
