"""The main job behind `truedepth demo` (its --help describes what is measured): perplexity and decode
speed of the original model and LP plans, a sample answer, and the report naming the machine."""

from __future__ import annotations

import copy
import sys
import time
from dataclasses import dataclass
from typing import Any

from ..core.loading import ModelOptions, PlanList
from ..measure.bench.timing import NewTokensOption, RepeatsOption
from ..measure.eval.evaluate import PerplexityText
from ..utils.env import describe_machine, machine_info
from ..utils.errors import UserError
from ..utils.options import option, override
from ..utils.shared_options import ProgressOption

DEFAULT_PLANS = ("parallel=20:28", "parallel=16:28", "parallel=12:28")
DEFAULT_PROMPT = "What is the capital of France?"
DECODE_PROMPT_TOKENS = 16
QUICK = {"tokens": 256, "window": 128, "new_tokens": 4, "repeats": 1, "sample_tokens": 8}


@dataclass  # bases in reverse order: --help lists the last base's options first
class DemoOptions(ProgressOption, RepeatsOption, NewTokensOption, PerplexityText, PlanList, ModelOptions):
    """The demo's settings (`truedepth demo --help` explains each); `quick` shrinks them all."""

    plans: list[str] | None = override(
        None, help_note="The original model is measured too.", default_help=" ".join(DEFAULT_PLANS)
    )
    text: str = override("default", default_help="default (held-out Austen novel)")
    tokens: int = override(4096)
    window: int = override(512, help_note="(Disjoint windows.)")
    new_tokens: int = override(24)
    repeats: int = override(3)
    no_progress: bool = override(False, help_note="or step messages")
    sample_prompt: str = option(
        DEFAULT_PROMPT, "question for the sample (chat template). Default: %(default)r", flag="--prompt"
    )
    sample_tokens: int = option(40, "tokens to generate for the sample.")
    sample_plan: str | None = option(None, "plan whose model writes the sample. Default: the first --plan")
    quick: bool = option(
        False,
        f"tiny run for tests: {QUICK['tokens']} tokens, window {QUICK['window']}, one plan, "
        f"{QUICK['new_tokens']}-token decode, {QUICK['sample_tokens']}-token sample",
    )


# ------------------------------------------------------------------------------------------
# Settings
# ------------------------------------------------------------------------------------------
def settings(args: DemoOptions) -> dict[str, Any]:
    """The effective settings (--quick shrinks everything), validated before any work."""
    from ..core.plan import as_plan
    from ..measure.eval.perplexity import check_window_args

    s = {
        "tokens": args.tokens,
        "window": args.window,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "sample_tokens": args.sample_tokens,
    }
    plans = list(args.plans or DEFAULT_PLANS)
    if args.quick:
        s.update(QUICK)
        plans = plans[:1]
    check_window_args(s["tokens"], s["window"], None)
    for key in ("new_tokens", "repeats", "sample_tokens"):
        if s[key] < 1:
            raise UserError(f"--{key.replace('_', '-')} must be at least 1 (got {s[key]}).")
    parsed = [as_plan(p) for p in plans]  # a typo fails here, naming the step
    sample = as_plan(args.sample_plan) if args.sample_plan else (parsed[0] if parsed else as_plan("base"))
    s["plans"] = [as_plan("base")] + [p for p in parsed if not p.is_identity]
    s["sample_plan"] = sample
    return s


# ------------------------------------------------------------------------------------------
# Where the numbers come from
# ------------------------------------------------------------------------------------------
# ------------------------------------------------------------------------------------------
# Measuring
# ------------------------------------------------------------------------------------------
def log(args: DemoOptions, message: str) -> None:
    if not args.no_progress:
        print(message, file=sys.stderr, flush=True)


def chat_ids(tokenizer: Any, prompt: str) -> Any:
    """Token ids of `prompt` as a user turn of the model's chat template (plain text if it has none)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    else:
        text = prompt
    return tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]


def sample_answer(model: Any, tokenizer: Any, prompt: str, new_tokens: int) -> str:
    import torch

    ids = chat_ids(tokenizer, prompt).to(next(model.parameters()).device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens, pad_token_id=pad
        )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def run_all(args: DemoOptions, s: dict[str, Any]) -> dict[str, Any]:
    from ..core.loading import load_for_device
    from ..core.transform import apply_plan, check_plan_fits
    from ..measure.bench.speed import interleaved_decode_rates
    from ..measure.eval.data import load_text
    from ..measure.eval.perplexity import make_windows, perplexity, tokenize

    progress = not args.no_progress
    t0 = time.perf_counter()
    log(args, f"loading {args.model} and the text ...")
    base, tokenizer = load_for_device(args.model, dtype=args.dtype, device=args.device)
    for plan in s["plans"] + [s["sample_plan"]]:
        check_plan_fits(base, plan)  # every plan must fit before the first measurement
    ids = tokenize(tokenizer, load_text(args.text), s["tokens"])
    make_windows(ids, s["tokens"], s["window"])  # a too-short text fails now
    param = next(base.parameters())
    info = machine_info(str(param.device), str(param.dtype).replace("torch.", ""))

    # All models stay in memory (for the default model 0.5 GB each in fp32) so that decode speed
    # can be timed in turns below: a busy spell on a shared machine then slows every model alike.
    models: dict[str, Any] = {}
    rows = []
    for i, plan in enumerate(s["plans"]):
        model = base if plan.is_identity else apply_plan(copy.deepcopy(base), plan)
        models[str(plan)] = model
        log(
            args,
            f"[{i + 1}/{len(s['plans'])}] {plan}: depth {model.config.num_hidden_layers}, perplexity on "
            f"{s['tokens']} tokens ...",
        )
        ppl = perplexity(model, tokenizer, ids, tokens=s["tokens"], window=s["window"], progress=progress)
        rows.append(
            {
                "plan": str(plan),
                "depth": model.config.num_hidden_layers,
                "perplexity": ppl["perplexity"],
                "tokens": ppl["tokens"],
            }
        )
    log(args, f"decode speed: {s['repeats']} run(s) of {s['new_tokens']} tokens per model, in turns ...")
    rates = interleaved_decode_rates(
        models,
        tokenizer,
        prompt_tokens=DECODE_PROMPT_TOKENS,
        new_tokens=s["new_tokens"],
        repeats=s["repeats"],
        progress=progress,
    )
    for row in rows:
        row["decode_tokens_per_s"] = rates[row["plan"]]
        row["perplexity_ratio"] = row["perplexity"] / rows[0]["perplexity"]
        row["speed_ratio"] = row["decode_tokens_per_s"] / rows[0]["decode_tokens_per_s"]

    log(args, "generating the sample answers ...")
    sample = s["sample_plan"]
    if str(sample) not in models:
        models[str(sample)] = apply_plan(copy.deepcopy(base), sample)
    # the original model's answer is shown too, for comparison
    samples = {
        name: sample_answer(models[name], tokenizer, args.sample_prompt, s["sample_tokens"])
        for name in dict.fromkeys(["base", str(sample)])
    }
    return {
        "model": args.model,
        "machine": info,
        "settings": {k: v for k, v in s.items() if "plan" not in k},
        "text": args.text,
        "rows": rows,
        "prompt": args.sample_prompt,
        "samples": samples,
        "sample_plan": str(sample),
        "seconds": round(time.perf_counter() - t0, 1),
    }


# ------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------
def format_rows(rows: list[dict[str, Any]]) -> str:
    header = ("plan", "depth", "perplexity", "vs base", "decode tok/s", "vs base")
    body = [
        (
            r["plan"],
            str(r["depth"]),
            f"{r['perplexity']:.2f}",
            f"{r['perplexity_ratio']:.3f}x",
            f"{r['decode_tokens_per_s']:.1f}",
            f"{r['speed_ratio']:.2f}x",
        )
        for r in rows
    ]
    widths = [max(len(line[c]) for line in [header, *body]) for c in range(len(header))]

    def fmt(line: tuple[str, ...]) -> str:
        return "  ".join(v.ljust(w) if c == 0 else v.rjust(w) for c, (v, w) in enumerate(zip(line, widths)))

    return "\n".join([fmt(header), fmt(tuple("-" * w for w in widths)), *map(fmt, body)])


def format_report(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [
        f"Layer Parallelism on {result['model']} (original depth {result['rows'][0]['depth']})",
        "",
        format_rows(result["rows"]),
        "",
        f"perplexity: text '{result['text']}', {result['rows'][0]['tokens']} tokens scored in disjoint windows of "
        f"{s['window']}; lower is better.",
        f"decode: greedy generation of {s['new_tokens']} tokens after a {DECODE_PROMPT_TOKENS}-token prompt, batch 1, "
        f"median of {s['repeats']} run(s) after a warm-up, models timed in turns (includes the prompt's prefill).",
        "",
        f"Q: {result['prompt']}",
    ]
    for plan, answer in result["samples"].items():
        lines.append(f"A ({plan}): {answer}")
    lines += ["", describe_machine(result["machine"]), f"Total time: {result['seconds']:.0f} s."]
    return "\n".join(lines)
