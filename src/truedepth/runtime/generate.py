"""A lean decode loop: static KV cache, one compiled single-token step, no per-token host sync.

`model.generate` runs logits processors, stopping criteria and bookkeeping in Python for every
token. For batch-1 decoding of a 7B model on a GPU, that host work and the kernel-launch gaps
are a large share of the step (method.md: 148.8 tok/s under HF's compiled generate against
175.9 in a lean loop). This loop keeps only what decoding needs:

- one transformers `StaticCache`, allocated once and `reset()` between generations, so the
  compiled step and its CUDA graphs are recorded once and replayed;
- the prompt is run once (prefill, not compiled: its length varies);
- each new token costs one call of a compiled function (model step + greedy/top-k/top-p
  sampling), captured in CUDA graphs on GPU (`torch.compile(mode="reduce-overhead")`);
- tokens stay on the device; the host waits only at the end, or every `eos_check_every`
  tokens when an EOS token can end the generation early.

`fuse_projections(model)` additionally runs q/k/v as one GEMM and gate/up as one GEMM in every
layer (the original parameters become views of the fused tensors, so memory is unchanged).

    from truedepth.runtime.generate import FastGenerator
    gen = FastGenerator(model, max_batch=1, max_seq=512)
    out = gen.generate(input_ids, max_new_tokens=256)              # greedy
    out = gen.generate(input_ids, 256, do_sample=True, top_p=0.9)  # sampling
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..utils.errors import UserError
from .fused import fuse_projections, is_fused, unfuse_projections  # noqa: F401  (re-exported: the loop's options)

# ---------------------------------------------------------------------------------------------
# Sampling (pure tensor code: it runs inside the compiled step, on the device)
# ---------------------------------------------------------------------------------------------


def filter_logits(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """Float32 logits with temperature applied and tokens outside top-k / top-p set to -inf.

    Same order and semantics as transformers' Temperature, TopK and TopP warpers, so sampling
    draws from the same distribution as `model.generate(do_sample=True, ...)`.
    """
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= (1 - top_p)
        remove_sorted[..., -1:] = False  # always keep the most likely token
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def sample_next(
    logits: torch.Tensor,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> torch.Tensor:
    """Next token per row, shape (batch, 1), chosen on the device (no host sync)."""
    if not do_sample:
        return logits.argmax(dim=-1, keepdim=True)
    probs = filter_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
    # argmax(p / E) with E ~ Exp(1) is a draw from p (Gumbel-max in another form) without the
    # host synchronisation that torch.multinomial needs on CUDA
    noise = torch.empty_like(probs).exponential_(1)
    return (probs / noise).argmax(dim=-1, keepdim=True)


def check_sampling(do_sample: bool, temperature: float, top_k: int | None, top_p: float | None) -> None:
    if temperature is None or temperature <= 0:
        raise UserError(f"temperature must be > 0, got {temperature}; use do_sample=False for greedy decoding.")
    if top_k is not None and top_k < 0:
        raise UserError(f"top_k must be a positive number of tokens (or 0/None for no limit), got {top_k}.")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise UserError(f"top_p must be in (0, 1], got {top_p}.")
    if not do_sample and (temperature != 1.0 or top_k or (top_p is not None and top_p < 1.0)):
        raise UserError(
            "temperature/top_k/top_p only apply when sampling; pass do_sample=True (or drop them for greedy decoding)."
        )


# ---------------------------------------------------------------------------------------------
# What a model can serve (checked before any memory is allocated)
# ---------------------------------------------------------------------------------------------
class EmptyPromptError(UserError):
    """A prompt of zero tokens: there is nothing to continue."""


class ContextLengthError(UserError):
    """Prompt + new tokens beyond the model's positions (config.max_position_embeddings)."""


def check_generation_length(model: nn.Module, prompt_tokens: int, max_new_tokens: int) -> None:
    """Refuse a generation the model cannot serve, before a cache or a step is allocated: an empty
    prompt, max_new_tokens < 1, or prompt + new tokens beyond `max_position_embeddings`."""
    if prompt_tokens < 1:
        raise EmptyPromptError(
            "the prompt is empty (0 tokens); give some text to continue (or at least one token, e.g. the BOS token)."
        )
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    limit = getattr(model.config, "max_position_embeddings", None)
    total = prompt_tokens + max_new_tokens
    if limit and total > limit:
        fix = (
            f"use max_new_tokens <= {limit - prompt_tokens}"
            if prompt_tokens < limit
            else f"shorten the prompt to fewer than {limit} tokens"
        )
        raise ContextLengthError(
            f"prompt ({prompt_tokens} tokens) + max_new_tokens ({max_new_tokens}) = {total} "
            f"exceeds the model's {limit} positions (max_position_embeddings); {fix}."
        )


# ---------------------------------------------------------------------------------------------
# The decode loop
# ---------------------------------------------------------------------------------------------
class FastGenerator:
    """Greedy / top-k / top-p decoding of a HF causal LM with a static cache and a compiled step.

    Args:
        model: a loaded (and possibly LP-transformed) causal LM, already on its device.
        max_batch: the largest batch `generate` will be called with.
        max_seq: prompt length + new tokens at most (the static cache's length).
        compile: compile the one-token step. On CUDA the default mode is "reduce-overhead" (CUDA
            graphs); elsewhere torch.compile's default mode.
        mode / backend / dynamic: passed to torch.compile (override the defaults above;
            dynamic=True compiles one step for every batch size).
        fuse: run q/k/v and gate/up as single GEMMs (`fuse_projections`, in place).

    The cache and the compiled step are made once and reused: the first call of each batch size
    pays for compilation and CUDA-graph recording, later calls replay.
    """

    def __init__(
        self,
        model: nn.Module,
        max_batch: int = 1,
        max_seq: int = 2048,
        compile: bool = True,
        mode: str | None = None,
        backend: str = "inductor",
        fuse: bool = False,
        dynamic: bool | None = None,
    ) -> None:
        if max_batch < 1 or max_seq < 2:
            raise UserError(f"max_batch must be >= 1 and max_seq >= 2, got {max_batch} and {max_seq}.")
        self.model = model.eval()
        self.max_batch, self.max_seq = int(max_batch), int(max_seq)
        self.device = next(model.parameters()).device
        if fuse:
            fuse_projections(model)
        self.compiled = bool(compile)
        self.mode = mode if mode is not None else ("reduce-overhead" if self.device.type == "cuda" else None)
        self.uses_cuda_graphs = self.compiled and self.mode == "reduce-overhead" and self.device.type == "cuda"
        self._step = (
            torch.compile(self._decode_step, mode=self.mode, backend=backend, dynamic=dynamic)
            if self.compiled
            else self._decode_step
        )
        self._cache: Any = None
        self._cache_batch = 0

    # ---- the two halves of a generation -----------------------------------------------------
    def _decode_step(
        self, tokens: torch.Tensor, do_sample: bool, temperature: float, top_k: int | None, top_p: float | None
    ) -> torch.Tensor:
        """One token for every row: the compiled (and CUDA-graphed) part."""
        logits = self.model(input_ids=tokens, past_key_values=self._cache, use_cache=True, logits_to_keep=1).logits
        return sample_next(logits[:, -1, :], do_sample, temperature, top_k, top_p)

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, sampling: tuple = (False, 1.0, None, None)) -> torch.Tensor:
        """Reset the cache, run the prompt (not compiled: its length varies), return the first new tokens."""
        self._cache_for(input_ids.shape[0]).reset()
        logits = self.model(input_ids=input_ids, past_key_values=self._cache, use_cache=True, logits_to_keep=1).logits
        return sample_next(logits[:, -1, :], *sampling)

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, sampling: tuple = (False, 1.0, None, None)) -> torch.Tensor:
        """Next tokens (batch, 1) after `tokens` (batch, 1). The result is only valid until the next
        step (CUDA graphs reuse its memory): copy it out before calling again."""
        if self.uses_cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's output has been consumed
        return self._step(tokens, *sampling)

    def _cache_for(self, batch: int) -> Any:
        """One static cache, kept across calls (new buffers would re-record the CUDA graphs)."""
        if self._cache is None or self._cache_batch != batch:
            from transformers import StaticCache

            self._cache = None  # release the old buffers before allocating new ones
            self._cache = StaticCache(config=self.model.config, max_cache_len=self.max_seq)
            self._cache_batch = batch
        return self._cache

    # ---- public API --------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        do_sample: bool = False,
        top_k: int | None = None,
        top_p: float | None = None,
        temperature: float = 1.0,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        eos_check_every: int = 32,
    ) -> torch.Tensor:
        """Prompt + new tokens, shape (batch, prompt_len + n) with n <= max_new_tokens.

        Without `eos_token_id` exactly `max_new_tokens` tokens are generated and the host never
        waits. With it, a row that produced EOS is padded (with `pad_token_id`, else EOS) like
        `model.generate` does, and the loop stops early once every row has finished (checked
        every `eos_check_every` tokens: one host sync each time).
        """
        input_ids = self._check_inputs(input_ids, max_new_tokens)
        check_sampling(do_sample, temperature, top_k, top_p)
        sampling = (
            bool(do_sample),
            float(temperature),
            int(top_k) if top_k else None,
            float(top_p) if top_p is not None and top_p < 1.0 else None,
        )
        eos = _as_tensor(eos_token_id, self.device)
        batch = input_ids.shape[0]
        new = torch.empty(batch, max_new_tokens, dtype=torch.long, device=self.device)
        new[:, :1] = self.prefill(input_ids, sampling)
        produced = 1
        while produced < max_new_tokens:
            # the input is a view of our own buffer, never a graph output that the next replay overwrites
            new[:, produced : produced + 1] = self.step(new[:, produced - 1 : produced], sampling)
            produced += 1
            if eos is not None and produced % eos_check_every == 0 and bool(_finished(new[:, :produced], eos).all()):
                break
        new = new[:, :produced]
        if eos is not None:
            new = _pad_after_eos(new, eos, pad_token_id)
            done = _finished(new, eos)
            if bool(done.all()):
                new = new[:, : int(_first_eos(new, eos).max()) + 1]
        return torch.cat([input_ids, new], dim=1)

    def _check_inputs(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise UserError(
                "input_ids must be a 2-D tensor (batch, prompt_len) of token ids; "
                "for one prompt use tokenizer(text, return_tensors='pt').input_ids."
            )
        batch, length = input_ids.shape
        if batch < 1:
            raise EmptyPromptError("input_ids holds no prompt (batch of 0); pass at least one.")
        check_generation_length(self.model, length, max_new_tokens)
        if batch > self.max_batch:
            raise UserError(
                f"batch of {batch} prompts exceeds max_batch={self.max_batch}; "
                f"create the FastGenerator with max_batch>={batch}."
            )
        if length + max_new_tokens > self.max_seq:
            raise UserError(
                f"prompt ({length}) + max_new_tokens ({max_new_tokens}) = {length + max_new_tokens} "
                f"exceeds max_seq={self.max_seq}; create the FastGenerator with "
                f"max_seq>={length + max_new_tokens}."
            )
        return input_ids.to(self.device)


def _as_tensor(eos: int | list[int] | None, device: torch.device) -> torch.Tensor | None:
    if eos is None:
        return None
    ids = [eos] if isinstance(eos, int) else list(eos)
    return torch.tensor(ids, dtype=torch.long, device=device) if ids else None


def _is_eos(tokens: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
    return torch.isin(tokens, eos)


def _finished(tokens: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
    return _is_eos(tokens, eos).any(dim=1)


def _first_eos(tokens: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
    """Index of each row's first EOS (the row length if none)."""
    hit = _is_eos(tokens, eos)
    idx = torch.where(hit, torch.arange(tokens.shape[1], device=tokens.device), tokens.shape[1])
    return idx.min(dim=1).values


def _pad_after_eos(tokens: torch.Tensor, eos: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    pad = int(eos[0]) if pad_token_id is None else int(pad_token_id)
    after = torch.arange(tokens.shape[1], device=tokens.device)[None, :] > _first_eos(tokens, eos)[:, None]
    return tokens.masked_fill(after, pad)


# ---------------------------------------------------------------------------------------------
# Text in, text out (used by `truedepth generate --fast`)
# ---------------------------------------------------------------------------------------------
def generate_fast(
    model: nn.Module,
    tokenizer: Any,
    prompt: str | list[str] | torch.Tensor,
    max_new_tokens: int = 128,
    chat: bool | None = None,
    compile: bool | None = None,
    fuse: bool = False,
    **sampling: Any,
) -> str | list[str]:
    """Generate text for `prompt` with the lean loop and return the new text only.

    `prompt`: a string, a list of strings of equal token length, or a (batch, len) tensor of token
    ids (already encoded, e.g. with a chat template). `sampling`: do_sample, temperature, top_k,
    top_p. `chat` applies the tokenizer's chat template to strings (default: when the tokenizer
    has one). `compile` defaults to True on CUDA and False on CPU (where compiling a model takes
    minutes, more than a short generation saves). The generator is cached per model, so
    repeated calls reuse the compiled step and its CUDA graphs.
    """
    if isinstance(prompt, torch.Tensor):
        ids = prompt if prompt.dim() == 2 else prompt.reshape(1, -1)
    else:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise EmptyPromptError("no prompts given; pass a string or a list of strings.")
        ids = _encode(tokenizer, prompts, chat)
    if ids.shape[0] < 1:
        raise EmptyPromptError("no prompts given; pass at least one row of token ids.")
    check_generation_length(model, ids.shape[1], max_new_tokens)  # before the static cache is allocated
    device = next(model.parameters()).device
    compile = device.type == "cuda" if compile is None else bool(compile)
    gen = _cached_generator(model, ids.shape[0], ids.shape[1] + max_new_tokens, compile, fuse)
    out = gen.generate(
        ids, max_new_tokens, eos_token_id=_eos_ids(model, tokenizer), pad_token_id=tokenizer.pad_token_id, **sampling
    )
    texts = tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
    return texts if isinstance(prompt, list) or (isinstance(prompt, torch.Tensor) and len(texts) > 1) else texts[0]


def _cached_generator(model: nn.Module, batch: int, needed: int, compile: bool, fuse: bool) -> FastGenerator:
    # kept on the model itself, so it lives and dies with it (no global cache holding models)
    gen = model.__dict__.get("_truedepth_fast_generator")
    if gen is None or gen.max_seq < needed or gen.max_batch < batch or gen.compiled != compile:
        model.__dict__.pop("_truedepth_fast_generator", None)  # free the old static cache first
        gen = FastGenerator(model, max_batch=batch, max_seq=max(needed, 512), compile=compile, fuse=fuse)
        model.__dict__["_truedepth_fast_generator"] = gen
    elif fuse and not is_fused(model):
        fuse_projections(model)
    return gen


def _encode(tokenizer: Any, prompts: list[str], chat: bool | None) -> torch.Tensor:
    if chat is None:
        chat = bool(getattr(tokenizer, "chat_template", None))
    if chat:
        texts = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts
        ]
        encoded = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    else:
        encoded = [tokenizer(p).input_ids for p in prompts]
    if len({len(e) for e in encoded}) > 1:
        raise UserError(
            f"the prompts encode to different lengths {sorted({len(e) for e in encoded})}; the fast "
            "loop takes no padding: generate them one at a time or use model.generate."
        )
    return torch.tensor(encoded, dtype=torch.long)


def _eos_ids(model: nn.Module, tokenizer: Any) -> list[int] | None:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if ids is None:
        ids = tokenizer.eos_token_id
    if ids is None:
        return None
    return [ids] if isinstance(ids, int) else list(ids)
