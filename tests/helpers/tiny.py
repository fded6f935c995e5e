"""Tiny random models of every supported architecture, built from the shape registry (no download)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from truedepth.core.arch import SUPPORTED
from truedepth.core.shapes import shape_config

ARCHS = tuple(SUPPORTED)  # llama, mistral, qwen2, qwen3


def tiny_config(arch: str = "llama", layers: int = 8, **overrides):
    """The registry's "tiny" shape as `arch`, `layers` deep (positions capped at 256 to keep caches small)."""
    kw = dict(num_hidden_layers=layers, max_position_embeddings=256)
    if arch == "mistral":
        kw["sliding_window"] = None
    kw.update(overrides)
    return shape_config("tiny", "eager", arch=arch, **kw)


def tiny_model(arch: str = "llama", layers: int = 8, seed: int = 0, randomize_norms: bool = True, **overrides):
    """A random model in float32, eval mode. Norm weights are randomised too: with the default of
    ones, a wrong fold of the norm weight into the projections would go unnoticed."""
    torch.manual_seed(seed)
    config = tiny_config(arch, layers, **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    if randomize_norms:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.uniform_(0.5, 1.5)
                elif name.endswith("bias"):
                    p.normal_(0, 0.1)
    return model


def char_tokenizer():
    """A character-level tokenizer that fits the tiny models' 128-token vocabulary."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({c: i + 4 for i, c in enumerate([chr(c) for c in range(32, 127)] + ["\n"])})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
