"""The one rule for default devices and dtypes: the GPU in bf16 when there is one, else the CPU in fp32."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from .errors import UserError

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def as_dtype(dtype: Any) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype) not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}.")
    return DTYPES[str(dtype)]


def check_device(device: Any) -> None:
    """Refuse a device this torch build cannot use, before anything is loaded onto it."""
    if device is None or isinstance(device, torch.device) and device.type == "cpu":
        return
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError, ValueError):
        raise UserError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps.") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(
            f"device {device!r}: this torch build sees no CUDA GPU; use --device cpu (or install a "
            "CUDA build of torch)."
        )
    if kind == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device {device!r}: MPS is not available here; use --device cpu.")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: Any) -> str:
    """bf16 on a GPU (its fast path), fp32 elsewhere (CPUs without fast bf16 would be slower)."""
    return "bf16" if str(device).startswith("cuda") else "fp32"


def device_and_dtype(device: Any = None, dtype: Any = None) -> tuple[str, str]:
    """Fill in what the user left out: `device` defaults to the GPU if any, `dtype` by the device."""
    device = str(device) if device else default_device()
    check_device(device)
    as_dtype(dtype)
    return device, (dtype if dtype else default_dtype(device))


def autocast(device: Any, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """torch.autocast in `dtype` on `device`'s type; nothing for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)
