"""The dtype a computation runs in where the user says 'auto': bf16 where a matmul timing finds it clearly
faster on the device (timing.bf16_is_faster), else the model's own (fine-tuning steps, the search's scoring)."""

from __future__ import annotations

from typing import Any

from ...utils.errors import UserError


def training_precision(device: Any, dtype: Any, train_dtype: str | None) -> tuple[str, Any, Any]:
    """(device, dtype of the saved/evaluated model, dtype of the training forward/backward) from the options
    --device, --dtype and --train-dtype (None or 'auto': bf16 where it is faster, else fp32)."""
    import torch

    from ...utils.device import as_dtype, device_and_dtype
    from . import timing

    device, dtype_name = device_and_dtype(device, dtype)
    model_dtype = as_dtype(dtype_name)
    auto = "bf16" if timing.bf16_is_faster(device) else "fp32"
    trained = as_dtype(auto if train_dtype in (None, "auto") else train_dtype)
    if torch.float16 in (model_dtype, trained):
        raise UserError("fp16 is not supported for fine-tuning (it needs loss scaling); use bf16 or fp32.")
    return device, model_dtype, trained


def scoring_dtype(dtype: str | None, model_dtype: Any, device: str) -> Any:
    """The dtype the search scores plans in: `dtype`, the model's own for None, and for "auto" bf16 where the
    model is fp32 and bf16 is clearly faster on `device`."""
    import torch

    from ...utils.device import as_dtype
    from . import timing

    if dtype == "auto":
        return torch.bfloat16 if model_dtype == torch.float32 and timing.bf16_is_faster(device) else model_dtype
    return as_dtype(dtype) or model_dtype


def check_search_dtype(dtype: str | None) -> None:
    """Raise, naming the accepted dtypes, unless `dtype` is one, 'auto' or None."""
    if dtype not in (None, "auto"):
        from ...utils.device import as_dtype

        as_dtype(dtype)
