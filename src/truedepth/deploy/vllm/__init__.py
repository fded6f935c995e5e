"""Serve saved truedepth models with stock vLLM: the plugin and the checks made before loading.

vLLM finds this plugin through the entry point group ``vllm.general_plugins`` (pyproject.toml) and
calls `register` in every process it starts. `register` makes the model types of saved truedepth
folders known to transformers (``truedepth.core.hf``) and maps their architectures
(``TrueDepthLlamaForCausalLM`` ...) to `truedepth.deploy.vllm.model.TrueDepthForCausalLM`, a model
assembled from vLLM's own decoder layers. Then, with no flag and no remote code:

    vllm serve ./lp-model --tensor-parallel-size 2

The checks here read only the config, so a folder that cannot be served is refused before a
weight loads, and in the process that started vLLM, with a message that names the fix.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ...core.arch import SUPPORTED, LayerWidths, layer_widths, transformed_record
from ...core.hf import TYPE_PREFIX
from ...utils.errors import UserError

MODEL_CLASS = "truedepth.deploy.vllm.model:TrueDepthForCausalLM"


class ServingError(UserError):
    """A model folder or a vLLM setting that truedepth's vLLM model cannot serve."""


def fits(layer: LayerWidths, world_size: int) -> bool:
    """vLLM's rule: heads and MLP split evenly; KV heads split evenly or are replicated."""
    kv_ok = layer.kv_heads % world_size == 0 or world_size % layer.kv_heads == 0
    return layer.heads % world_size == 0 and layer.intermediate % world_size == 0 and kv_ok


def architectures() -> list[str]:
    """The `architectures` names that saved truedepth models carry (one per supported arch)."""
    from ...core.hf import TrueDepthModelMixin

    return sorted(cls.__name__ for cls in TrueDepthModelMixin.__subclasses__())


def register() -> None:
    """vLLM plugin entry point: safe to call more than once, and in every vLLM process."""
    from vllm import ModelRegistry

    from ...core import hf  # noqa: F401  (registers the truedepth_<arch> configs with transformers)

    for name in architectures():
        ModelRegistry.register_model(name, MODEL_CLASS)
    _register_config_check()


def _register_config_check() -> None:
    """Have vLLM run `check_config` while it builds its config, in the process that started it."""
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP, VerifyAndUpdateConfig

    class TrueDepthConfigCheck(VerifyAndUpdateConfig):
        @staticmethod
        def verify_and_update_config(vllm_config: Any) -> None:
            model_config = vllm_config.model_config
            check_config(
                model_config.hf_config.to_dict(),
                vllm_config.parallel_config.tensor_parallel_size,
                where=model_config.model,
            )

    for name in architectures():
        MODELS_CONFIG_MAP[name] = TrueDepthConfigCheck


# ---------------------------------------------------------------------------------------------
# Checks on config.json alone
# ---------------------------------------------------------------------------------------------
def base_arch(config: Mapping[str, Any]) -> str:
    return str(config.get("model_type", "")).removeprefix(TYPE_PREFIX)


def layer_sizes(config: Mapping[str, Any], where: Any = "this model") -> list[LayerWidths]:
    """Per-layer widths of a saved truedepth model, from its config (a config.json dict)."""
    widths = (transformed_record(config) or {}).get("layer_widths")
    if not str(config.get("model_type", "")).startswith(TYPE_PREFIX) or not widths:
        raise ServingError(
            f"{where} is not a truedepth model: its config has no truedepth layer widths "
            f"(model type {config.get('model_type')!r}). Save a transformed model with "
            "`model, tok = truedepth.load(model, plan=...)` then `truedepth.save(model, tok, folder)`; a plain model "
            "needs no plugin, vLLM serves it as it is."
        )
    arch = base_arch(config)
    if arch not in SUPPORTED:
        raise ServingError(
            f"{where}: model type {arch!r} is not supported by truedepth's vLLM model; it serves "
            f"{', '.join(sorted(SUPPORTED))}. Transform a model of one of these architectures."
        )
    depth = config.get("num_hidden_layers")
    if len(widths) != depth:
        raise ServingError(
            f"{where}: truedepth.layer_widths has {len(widths)} entries for {depth} layers; the config.json "
            "was edited or is incomplete. Save the model again from truedepth."
        )
    return layer_widths(config)


def valid_world_sizes(sizes: list[LayerWidths]) -> list[int]:
    return [n for n in range(1, min(s.heads for s in sizes) + 1) if all(fits(s, n) for s in sizes)]


def check_config(
    config: Mapping[str, Any], tensor_parallel_size: int = 1, where: Any = "this model"
) -> list[LayerWidths]:
    """Refuse a config that truedepth's vLLM model cannot serve at `tensor_parallel_size`."""
    sizes = layer_sizes(config, where)
    bad = next((s for s in sizes if not fits(s, tensor_parallel_size)), None)
    if bad is not None:
        raise ServingError(
            f"tensor-parallel size {tensor_parallel_size} does not divide layer {bad.index} of {where} "
            f"({bad.width} original layer{'s' if bad.width > 1 else ''} wide: {bad.heads} heads, {bad.kv_heads} KV "
            f"heads, MLP size {bad.intermediate}); valid sizes for this model: "
            f"{', '.join(map(str, valid_world_sizes(sizes)))}."
        )
    return sizes


def check_servable(folder: str | os.PathLike, tensor_parallel_size: int = 1) -> list[LayerWidths]:
    """The same checks on a model folder, before vLLM is started (reads config.json only)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ServingError(
            f"{folder} has no config.json: it is not a saved model folder. Save a transformed "
            "model with `truedepth.save(model, tokenizer, folder)`."
        )
    return check_config(json.loads(path.read_text()), tensor_parallel_size, where=folder)


# ---------------------------------------------------------------------------------------------
# Random-weight shapes for benchmarks
# ---------------------------------------------------------------------------------------------
def save_config_folder(config: Any, plan: Any, folder: str | os.PathLike) -> Path:
    """Write only the config.json that `config` has after `plan` (the identity plan: unchanged).

    vLLM serves such a folder with random weights (``load_format="dummy"``): a benchmark of a
    real shape, LP or not, without its weights. The plan goes through the transform itself, on
    the meta device, so the recorded widths are the ones a real transformed model would carry."""
    import torch
    from transformers import AutoModelForCausalLM

    from ...core.transform import apply_plan

    with torch.device("meta"):
        model = apply_plan(AutoModelForCausalLM.from_config(config), plan)
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)
    return Path(folder)
