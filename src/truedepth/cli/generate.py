"""Generate text with a model, optionally restructured by a plan.

Example: truedepth generate --model default --plan parallel=20:28 "The capital of France is"
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from ..core.loading import ModelOptions, PlanOption
from ..runtime.distributed.tp import TPOptions
from ..utils.errors import UserError
from ..utils.options import add_options, from_args, option, override
from ..utils.shared_options import SeedOption


@dataclass
class Sampling(SeedOption):
    """How the next token is chosen: greedy, or sampled with these settings."""

    sample: bool = option(False, "sample instead of greedy decoding")
    temperature: float = option(0.7, "sampling temperature (with --sample).")
    top_k: int = option(50, "sample from the K most likely tokens (with --sample).")
    top_p: float = option(0.95, "sample from the most likely tokens whose probabilities add up to P (with --sample).")
    seed: int = override(0, help_note="for sampling.")


@dataclass  # bases in reverse order: --help lists the last base's options first
class GenerateOptions(Sampling, PlanOption, ModelOptions):
    """What `truedepth generate` takes (see its --help)."""

    prompt: str | None = option(None, "text to continue", positional=True)
    max_new_tokens: int = option(32, "tokens to generate.")
    chat: bool = option(False, "wrap the prompt in the tokenizer's chat template")
    static_cache: bool = option(False, "use transformers' static KV cache")
    fast: bool = option(False, "use truedepth's lean decode loop (static cache, compiled one-token step)")
    tp: TPOptions = field(default_factory=TPOptions)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, GenerateOptions)


def encode(tokenizer, prompt: str, chat: bool):
    if chat and not getattr(tokenizer, "chat_template", None):
        raise UserError("--chat: this model's tokenizer has no chat template; drop --chat to continue the raw text.")
    if chat:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
    return tokenizer(prompt, return_tensors="pt").input_ids


def check_sampling(args: GenerateOptions) -> None:
    """Options transformers would refuse only after the model has loaded."""
    if args.max_new_tokens < 1:
        raise UserError("--max-new-tokens must be at least 1.")
    if args.sample and not args.temperature > 0:
        raise UserError(f"--temperature must be above 0 (got {args.temperature}); drop --sample for greedy decoding.")
    if args.sample and args.top_k < 1:
        raise UserError(f"--top-k must be at least 1 (got {args.top_k}).")
    if args.sample and not 0 < args.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1] (got {args.top_p}).")


def run(parsed: argparse.Namespace) -> int:
    import torch

    from ..runtime.distributed.tp import load_model  # the plain loader unless --tp: then each rank loads its shard

    args = from_args(GenerateOptions, parsed)
    check_sampling(args)
    if args.chat:  # a tokenizer without a chat template is refused before the weights load
        from ..core.loading import load_tokenizer, resolve

        encode(load_tokenizer(args.model, resolve(args.model)), args.prompt, chat=True)
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model, args.plan, args.dtype, args.device, args.tp)
    ids = encode(tokenizer, args.prompt, args.chat).to(model.device)
    from ..runtime.generate import check_generation_length

    check_generation_length(model, ids.shape[1], args.max_new_tokens)
    sampling = (
        dict(do_sample=True, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
        if args.sample
        else dict(do_sample=False)
    )
    if args.fast:
        from ..runtime.generate import generate_fast

        text = generate_fast(model, tokenizer, ids, max_new_tokens=args.max_new_tokens, **sampling)
        print(text)
        return 0
    from transformers import TextStreamer

    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    extra = {"cache_implementation": "static"} if args.static_cache else {}
    if not args.sample:
        extra.update(temperature=None, top_k=None, top_p=None)  # silence the model's sampling defaults
    with torch.inference_mode():
        model.generate(
            ids,
            max_new_tokens=args.max_new_tokens,
            streamer=streamer,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
            **sampling,
            **extra,
        )
    return 0
