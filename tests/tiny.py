"""Tiny random models of every supported architecture, built from a config (no download)."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

ARCHS = ("llama", "mistral", "qwen2", "qwen3")


def tiny_config(arch: str = "llama", layers: int = 8, **overrides):
    kw = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
              rms_norm_eps=1e-5, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "mistral":
        kw["sliding_window"] = None
    kw.update(overrides)
    return AutoConfig.for_model(arch, **kw)


def tiny_model(arch: str = "llama", layers: int = 8, seed: int = 0, randomize_norms: bool = True, **overrides):
    """A random model in float32, eval mode. Norm weights are randomised too: with the default of
    ones, a wrong fold of the norm weight into the projections would go unnoticed."""
    torch.manual_seed(seed)
    config = tiny_config(arch, layers, **overrides)
    config._attn_implementation = "eager"
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
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
