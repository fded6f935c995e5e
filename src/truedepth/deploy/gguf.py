"""Export a (transformed) model to GGUF for llama.cpp and the programs built on it.

The file uses llama.cpp's ``deci`` architecture: the Llama decoder layer with a per-layer head
count, KV-head count and feed-forward length. A wide LP layer is exactly such a layer (its norm
weights are ones after folding), so stock llama.cpp runs an LP model with no change.

    model, tok = truedepth.load("default", plan="parallel=20:28")
    truedepth.export_gguf(model, tok, "lp.gguf", type="q8_0")

Tensors are named with gguf-py's tensor map, quantized with gguf-py (f16, bf16, q8_0) or with
llama.cpp's own quantizer through llama-cpp-python (k-quants such as q4_k_m). The tokenizer comes
from the GGUF the model was converted from (the default model), else from the Hugging Face
tokenizer with gguf-py's vocabulary helpers. The file appears only when it is complete.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.arch import ATTN_ROWS, SUPPORTED, base_model_type, head_dim, layer_widths, measured_widths
from ..utils.errors import UserError
from ..utils.io import atomic_path, temp_file
from ..utils.options import option, override
from ..utils.shared_options import OverwriteOption

ARCH = "deci"
ROTARY_ROWS = ATTN_ROWS[:2]  # q and k: the rows rotary embeddings act on
# written by gguf-py
GGUF_PY_TYPES = ("f32", "f16", "bf16", "q8_0")
# written f32, then quantized by llama.cpp (llama_model_quantize); the i-quants need an
# importance matrix and are left out
LLAMA_CPP_TYPES = (
    "q4_0",
    "q4_1",
    "q5_0",
    "q5_1",
    "q2_k",
    "q3_k_s",
    "q3_k_m",
    "q3_k_l",
    "q4_k_s",
    "q4_k_m",
    "q5_k_s",
    "q5_k_m",
    "q6_k",
)
TYPES = GGUF_PY_TYPES + LLAMA_CPP_TYPES
# llama.cpp's pre-tokenizer names by the hash convert_hf_to_gguf.py computes (get_vocab_base_pre),
# for the BPE families truedepth exports (Qwen3 models are refused for their q/k norms)
PRE_TOKENIZER_CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ "
    "🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM, SmolLM2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5, Qwen2, Qwen2.5
}


class GGUFExportError(UserError):
    """A model, type or path that cannot be exported; the message says why and what to do."""


@dataclass
class GGUFOptions(OverwriteOption):
    """The file `export_gguf` writes: where, in which tensor type, and whether it may replace one."""

    gguf: str | None = option(None, "GGUF file to write", metavar="PATH", required=True)
    type: str = option("f32", f"tensor type: {', '.join(TYPES)}.", type=str.lower, metavar="TYPE")
    overwrite: bool = override(False, help_note="(--gguf PATH)")


# ---------------------------------------------------------------------------------------------
# Checks done before anything is written
# ---------------------------------------------------------------------------------------------
def check_type(type: str) -> str:
    t = str(type).lower()
    if t not in TYPES:
        raise GGUFExportError(f"unknown GGUF type {type!r}; use one of {', '.join(TYPES)}.")
    if t in LLAMA_CPP_TYPES:
        try:
            import llama_cpp  # noqa: F401
        except ImportError as e:
            raise GGUFExportError(
                f"type {t} is made by llama.cpp's quantizer, which needs llama-cpp-python: "
                "pip install 'truedepth[gguf]' (or export f32/f16/bf16/q8_0)."
            ) from e
    return t


def check_path(path: str | os.PathLike, overwrite: bool) -> Path:
    path = Path(path)
    if path.is_dir():
        raise GGUFExportError(f"{path} is a folder; give the path of the .gguf file to write.")
    if path.exists() and not overwrite:
        raise GGUFExportError(f"{path} exists; pass overwrite=True (--overwrite) to replace it.")
    if not path.parent.is_dir():
        raise GGUFExportError(f"the folder {path.parent} does not exist; create it first.")
    return path


def rope_settings(config: Any) -> dict[str, Any]:
    """Rotary parameters as transformers 5 (rope_parameters) or 4 (rope_theta, rope_scaling) store them."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type", params.get("type")) or "default"
    return params


def check_exportable(model: Any) -> str:
    """The architecture name, or a GGUFExportError saying what has no place in a `deci` GGUF."""
    config = model.config
    arch = base_model_type(config)
    if arch not in SUPPORTED:
        raise GGUFExportError(
            f"model type {arch!r} cannot be exported; GGUF export supports "
            f"{', '.join(a for a in SUPPORTED if not SUPPORTED[a])}."
        )
    if SUPPORTED[arch]:
        raise GGUFExportError(
            f"{arch} has per-head {'/'.join(SUPPORTED[arch])} weights inside attention, which llama.cpp's "
            "'deci' architecture (the Llama layer with per-layer widths) has no place for; export a Llama, "
            "Mistral or Qwen2 model."
        )
    if getattr(config, "use_sliding_window", False) or (arch == "mistral" and getattr(config, "sliding_window", None)):
        raise GGUFExportError(
            f"this {arch} model uses sliding-window attention, which 'deci' does not "
            "implement; only full-attention models can be exported."
        )
    rope = rope_settings(config)
    if rope["rope_type"] not in ("default", "linear", "llama3"):
        raise GGUFExportError(
            f"rope type {rope['rope_type']!r} has no 'deci' form; supported: default, linear, llama3."
        )
    return arch


# ---------------------------------------------------------------------------------------------
# Hyper-parameters: per-layer widths
# ---------------------------------------------------------------------------------------------
def layer_shapes(model: Any) -> list[dict[str, int]]:
    """Heads, KV heads and MLP width of each decoder layer, from the widths the plan recorded
    (`core.arch.layer_widths`), checked against the projections the model holds."""

    def named(w: Any) -> dict[str, int]:
        return {"heads": w.heads, "kv_heads": w.kv_heads, "ff": w.intermediate}

    shapes = [named(w) for w in layer_widths(model.config)]
    for i, (shape, layer) in enumerate(zip(shapes, measured_widths(model))):
        rows = named(layer)
        if rows != shape:  # a config that does not describe its weights: refuse rather than write nonsense
            raise GGUFExportError(
                f"layer {i} has {rows} but config.truedepth['layer_widths'] says {shape}; "
                "the model or its config was edited after the transform."
            )
    return shapes


def add_hyperparameters(writer: Any, model: Any, shapes: list[dict[str, int]], name: str) -> None:
    import gguf

    config = model.config
    hd = head_dim(config)
    rope = rope_settings(config)
    writer.add_name(name)
    writer.add_block_count(len(shapes))
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_head_count([s["heads"] for s in shapes])
    writer.add_head_count_kv([s["kv_heads"] for s in shapes])
    writer.add_feed_forward_length([s["ff"] for s in shapes])
    # explicit: llama.cpp would derive it from the first layer's head count, wrong for a wide first layer
    writer.add_key_length(hd)
    writer.add_value_length(hd)
    writer.add_rope_dimension_count(hd)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)


# ---------------------------------------------------------------------------------------------
# Tensors
# ---------------------------------------------------------------------------------------------
def permute_for_rope(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of q/k (or their bias) from Hugging Face's rotate-half layout to llama.cpp's
    pairs of neighbours (`LlamaModel.permute` in convert_hf_to_gguf.py), head by head."""
    return (
        weight.reshape(n_heads, 2, weight.shape[0] // n_heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def llama3_rope_factors(config: Any) -> torch.Tensor:
    """llama.cpp's `rope_freqs` for Llama 3 rope scaling: default over scaled inverse frequencies,
    both computed by transformers' own rope initialisers."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    hd = head_dim(config)
    base = 1.0 / (float(rope_settings(config)["rope_theta"]) ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    return (base / scaled.float()).float()


def hf_tensors(model: Any, shapes: list[dict[str, int]]) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, float32 tensor) in the layout llama.cpp reads."""
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    for name, tensor in model.state_dict().items():
        if tied and name.startswith("lm_head."):
            continue  # llama.cpp uses token_embd when the output tensor is absent
        tensor = tensor.detach().to("cpu", torch.float32)
        parts = name.split(".")
        if parts[:2] == ["model", "layers"] and parts[3] == "self_attn" and parts[4] in ROTARY_ROWS:
            shape = shapes[int(parts[2])]
            tensor = permute_for_rope(tensor, shape["heads"] if parts[4] == ROTARY_ROWS[0] else shape["kv_heads"])
        yield name, tensor
    if rope_settings(model.config)["rope_type"] == "llama3":
        yield "rope_freqs.weight", llama3_rope_factors(model.config)


def gguf_name(name_map: Any, hf_name: str) -> str:
    if hf_name == "rope_freqs.weight":
        return hf_name
    new = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if new is None:
        raise GGUFExportError(
            f"tensor {hf_name} has no place in a 'deci' GGUF; the model has parts llama.cpp would not run."
        )
    return new


def encode_tensor(tensor: torch.Tensor, type: str) -> tuple[np.ndarray, Any]:
    """(data, raw GGML type or None): matrices in `type`, vectors (norms, biases) in f32 as
    convert_hf_to_gguf.py keeps them. Quantization by gguf-py, never by hand."""
    import gguf

    data = tensor.numpy()
    if data.ndim < 2 or type == "f32":
        return data, None
    if type == "f16":
        return data.astype(np.float16), None
    qtype = {"bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[type]
    try:
        return gguf.quants.quantize(data, qtype), qtype
    except gguf.quants.QuantError:  # rows not a multiple of the block size: f16, as llama.cpp falls back
        return data.astype(np.float16), None


def file_type(type: str) -> int:
    import gguf

    return {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[type]


# ---------------------------------------------------------------------------------------------
# Tokenizer and chat template
# ---------------------------------------------------------------------------------------------
def source_gguf(model: Any, tokenizer: Any) -> Path | None:
    """The GGUF this model was converted from, if truedepth knows it: the default model, loaded
    from its safetensors copy in the user cache. A saved LP folder is not traced back; its
    Hugging Face tokenizer is used."""
    from ..core.loading import default_gguf, default_model_dir
    from ..utils.env import cache_dir

    origin = getattr(tokenizer, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
    if not origin or Path(origin).resolve().parent != cache_dir().resolve():
        return None  # checked first: default_model_dir() would convert the default model if absent
    return default_gguf() if Path(origin).resolve() == default_model_dir().resolve() else None


def copy_tokenizer_fields(writer: Any, gguf_path: Path, vocab_size: int) -> None:
    """Every tokenizer.* key (vocabulary, merges, special ids, chat template) exactly as in `gguf_path`."""
    import gguf

    reader = gguf.GGUFReader(gguf_path)
    tokens = len(reader.fields["tokenizer.ggml.tokens"].data)
    if tokens != vocab_size:
        raise GGUFExportError(
            f"{gguf_path} has {tokens} tokens but the model {vocab_size} embeddings; "
            "take the tokenizer from the GGUF this model came from."
        )
    for name, field in reader.fields.items():
        if not name.startswith("tokenizer."):
            continue
        main = field.types[0]
        if main == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(name, field.contents(), main, sub_type=field.types[-1])
        else:
            writer.add_key_value(name, field.contents(), main)


def pre_tokenizer(tokenizer: Any) -> str:
    digest = hashlib.sha256(str(tokenizer.encode(PRE_TOKENIZER_CHECK_TEXT)).encode()).hexdigest()
    if digest not in PRE_TOKENIZERS:
        raise GGUFExportError(
            "the tokenizer's pre-tokenizer is not one llama.cpp knows for the supported BPE families "
            "(Llama 3, SmolLM2, Qwen2/3); export the model with its original tokenizer."
        )
    return PRE_TOKENIZERS[digest]


def bpe_vocabulary(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens and token types by id, padded to the embedding rows: the logic of convert_hf_to_gguf.py's
    `get_vocab_base` (gguf-py's BpeVocab rejects tokenizers that transformers rebuilt from a GGUF,
    whose tokenizer.json carries a byte-fallback decoder although the vocabulary is byte-level)."""
    import gguf

    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise GGUFExportError(f"the tokenizer has ids up to {max(by_id)} but the model only {vocab_size} embeddings.")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:  # embedding rows with no token
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(by_id[i])
        types.append(
            gguf.TokenType.NORMAL
            if i not in added
            else gguf.TokenType.CONTROL
            if added[i].special
            else gguf.TokenType.USER_DEFINED
        )
    return tokens, types


def add_hf_tokenizer(writer: Any, tokenizer: Any, vocab_size: int) -> None:
    """Byte-level BPE vocabulary from a Hugging Face tokenizer; merges, special ids and chat
    template read by gguf-py's SpecialVocab from the tokenizer saved in its own files."""
    import gguf

    pre = pre_tokenizer(tokenizer)
    tokens, types = bpe_vocabulary(tokenizer, vocab_size)
    with tempfile.TemporaryDirectory(prefix="truedepth-tokenizer-") as tmp:
        tokenizer.save_pretrained(tmp)
        special = gguf.SpecialVocab(Path(tmp), load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise GGUFExportError(
            "the tokenizer has no BPE merges; only byte-level BPE tokenizers can be exported "
            "(Llama 3, SmolLM2, Qwen2/3)."
        )
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special.add_to_gguf(writer, quiet=True)


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------
def write_gguf(
    model: Any, tokenizer: Any, path: Path, type: str, tokenizer_gguf: Path | None, shapes: list[dict[str, int]]
) -> None:
    import gguf

    writer = gguf.GGUFWriter(path, ARCH)
    try:
        add_hyperparameters(writer, model, shapes, name=Path(str(model.config._name_or_path or "model")).name)
        writer.add_file_type(file_type(type))
        if tokenizer_gguf is not None:
            copy_tokenizer_fields(writer, tokenizer_gguf, model.config.vocab_size)
        else:
            add_hf_tokenizer(writer, tokenizer, model.config.vocab_size)
        name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.DECI, len(shapes))
        for hf_name, tensor in hf_tensors(model, shapes):
            data, raw = encode_tensor(tensor, type)
            writer.add_tensor(gguf_name(name_map, hf_name), data, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def llama_cpp_quantize(source: Path, target: Path, type: str, threads: int | None = None) -> None:
    """llama.cpp's own quantizer (the `llama-quantize` tool) through llama-cpp-python."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{type.upper()}")
    params.nthread = threads or os.cpu_count() or 1
    if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params) != 0:
        raise GGUFExportError(f"llama.cpp could not quantize {source} to {type}.")


def export_gguf(
    model: Any,
    tokenizer: Any,
    path: str | os.PathLike,
    type: str = "f32",
    overwrite: bool = False,
    tokenizer_gguf: str | os.PathLike | None | bool = "auto",
) -> Path:
    """Write `model` (base or transformed) as a llama.cpp GGUF file of the `deci` architecture.

    `type`: f32, f16, bf16, q8_0 (gguf-py) or a llama.cpp quantization such as q4_k_m.
    `tokenizer_gguf`: "auto" copies the tokenizer and chat template from the GGUF the model came
    from (the default model) and builds them from `tokenizer` otherwise; a path copies them from
    that GGUF; False always builds them from `tokenizer`. Nothing is written if anything is refused.
    """
    type = check_type(type)
    path = check_path(path, overwrite)
    check_exportable(model)
    shapes = layer_shapes(model)
    vocab_source = resolve_tokenizer_gguf(model, tokenizer, tokenizer_gguf)
    with atomic_path(path) as tmp:
        if type in LLAMA_CPP_TYPES:
            with temp_file(path) as full:  # f32 first, then llama.cpp quantizes it
                write_gguf(model, tokenizer, full, "f32", vocab_source, shapes)
                llama_cpp_quantize(full, tmp, type)
        else:
            write_gguf(model, tokenizer, tmp, type, vocab_source, shapes)
    return path


def resolve_tokenizer_gguf(model: Any, tokenizer: Any, tokenizer_gguf: Any) -> Path | None:
    """The GGUF to copy the tokenizer from, or None to build it from `tokenizer` (checked now)."""
    if tokenizer_gguf == "auto":
        tokenizer_gguf = source_gguf(model, tokenizer)
    elif tokenizer_gguf is False:
        tokenizer_gguf = None
    elif tokenizer_gguf is not None and not Path(tokenizer_gguf).is_file():
        raise GGUFExportError(f"tokenizer_gguf {tokenizer_gguf} is not a file.")
    if tokenizer_gguf is None:
        if tokenizer is None:
            raise GGUFExportError(
                "no tokenizer: pass the model's tokenizer (or tokenizer_gguf=<a GGUF to copy it from>)."
            )
        pre_tokenizer(tokenizer)  # an unknown tokenizer is refused before anything is written
        return None
    return Path(tokenizer_gguf)
