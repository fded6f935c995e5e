"""Generate text with a model, optionally restructured by a plan.

Example: truedepth generate --model default --plan parallel=20:28 "The capital of France is"
"""

from __future__ import annotations

import argparse

from ..utils.errors import UserError
from .common import add_model_arguments, add_tp_arguments, tp_options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="text to continue")
    add_model_arguments(parser)
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default %(default)s)")
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    parser.add_argument("--static-cache", action="store_true", help="use transformers' static KV cache")
    parser.add_argument("--fast", action="store_true",
                        help="use truedepth's lean decode loop (static cache, compiled one-token step)")
    add_tp_arguments(parser)


def encode(tokenizer, prompt: str, chat: bool):
    if chat and not getattr(tokenizer, "chat_template", None):
        raise UserError("--chat: this model's tokenizer has no chat template; drop --chat to continue the raw text.")
    if chat:
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             return_tensors="pt", return_dict=True)["input_ids"]
    return tokenizer(prompt, return_tensors="pt").input_ids


def check_sampling(args: argparse.Namespace) -> None:
    """Options transformers would refuse only after the model has loaded."""
    if args.max_new_tokens < 1:
        raise UserError("--max-new-tokens must be at least 1.")
    if args.sample and not args.temperature > 0:
        raise UserError(f"--temperature must be above 0 (got {args.temperature}); drop --sample for greedy decoding.")
    if args.sample and args.top_k < 1:
        raise UserError(f"--top-k must be at least 1 (got {args.top_k}).")
    if args.sample and not 0 < args.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1] (got {args.top_p}).")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..runtime.distributed.tp import load_model  # the plain loader unless --tp: then each rank loads its shard

    check_sampling(args)
    if args.chat:  # a tokenizer without a chat template is refused before the weights load
        from ..core.loading import load_tokenizer, resolve

        encode(load_tokenizer(args.model, resolve(args.model)), args.prompt, chat=True)
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model, args.plan, args.dtype, args.device, tp_options(args))
    ids = encode(tokenizer, args.prompt, args.chat).to(model.device)
    from ..runtime.generate import check_generation_length

    check_generation_length(model, ids.shape[1], args.max_new_tokens)
    sampling = dict(do_sample=True, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p) \
        if args.sample else dict(do_sample=False)
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
        model.generate(ids, max_new_tokens=args.max_new_tokens, streamer=streamer,
                       pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id, **sampling, **extra)
    return 0
