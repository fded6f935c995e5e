"""Checkpoints of a fine-tune: trainable weights, optimizer, scheduler, RNG state and data position
(safetensors + JSON), written to a temporary folder, fsynced and renamed into place."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ...utils.errors import InputPathError
from ...utils.io import fsync_dir as _fsync_dir
from ...utils.io import write_synced as _write_bytes  # a name of its own: tests interrupt it
from .config import CHECKPOINT_DIR, CHECKPOINT_FORMAT


def flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state_dict into tensors (for safetensors) and a JSON-able rest."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    for idx, entry in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(entry)
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else dict(g) for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def rng_state() -> dict[str, torch.Tensor]:
    state = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"torch_cuda_{i}"] = s
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch_cpu"])
    cuda = [state[k] for k in sorted((k for k in state if k.startswith("torch_cuda_")), key=lambda k: int(k[11:]))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def checkpoint_dirs(out: Path) -> list[Path]:
    """Complete checkpoints, oldest first (incomplete ones never get a final name)."""
    root = Path(out) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step-*") if (p / "state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(
    out: Path,
    step: int,
    trainable: dict[str, torch.Tensor],
    optimizer: Any,
    scheduler: Any,
    meta: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write checkpoint `step` to a temporary folder, fsync it, then rename it into place.

    A kill at any moment leaves either the previous checkpoints or the new complete one. The
    `keep` newest checkpoints are kept.
    """
    from safetensors.torch import save

    root = Path(out) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # left by a run killed mid-write
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    tmp.mkdir()
    opt_tensors, opt_meta = flatten_optimizer(optimizer.state_dict())
    _write_bytes(tmp / "trainable.safetensors", save({k: v.detach().cpu().contiguous() for k, v in trainable.items()}))
    _write_bytes(tmp / "optimizer.safetensors", save(opt_tensors))
    _write_bytes(tmp / "rng.safetensors", save(rng_state()))
    state = dict(meta, format=CHECKPOINT_FORMAT, step=step, optimizer=opt_meta, scheduler=scheduler.state_dict())
    _write_bytes(tmp / "state.json", json.dumps(state, indent=1).encode())  # last: marks it complete
    _fsync_dir(tmp)
    if final.exists():  # the same step written again after a resume: identical content
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in checkpoint_dirs(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    if state.get("format") != CHECKPOINT_FORMAT:
        raise InputPathError(
            f"checkpoint {path} has format {state.get('format')}, this truedepth reads "
            f"{CHECKPOINT_FORMAT}; resume it with the truedepth version that wrote it."
        )
    state["trainable"] = load_file(path / "trainable.safetensors")
    state["optimizer"] = unflatten_optimizer(load_file(path / "optimizer.safetensors"), state["optimizer"])
    state["rng"] = load_file(path / "rng.safetensors")
    return state


def latest_checkpoint(out: Path) -> Path | None:
    dirs = checkpoint_dirs(out)
    return dirs[-1] if dirs else None
