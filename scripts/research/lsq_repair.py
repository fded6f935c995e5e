"""Training-free repair of an LP plan by least squares (docs/research/compress-experiments.md).

For every wide layer, in order: the features are the wide MLP's intermediate activations on the
repaired model's own hidden state; the target is the original model's hidden state after the last
layer the wide layer replaced. The MLP's down projection is refitted by ridge regression towards its
LP value:  W = argmin ||a W^T - (t - h)||^2 + lam * mean(diag(a^T a)) * ||W - W_lp||^2,
where h is the wide layer's output without its MLP. Hidden states are carried layer by layer (one pass
of each model over the calibration tokens), so the cost is about two forward passes.

    python scripts/research/lsq_repair.py --tokens 65536 --eval-tokens 32768 --out runs/lsq
    python scripts/research/lsq_repair.py --tokens 65536 --finetune -- --max-minutes 16.45 --fit-tokens \
        --threads 2 --eval-tokens 32768 --out runs/lsq-ft

With `--finetune`, the arguments after `--` go to `truedepth finetune` (model, plan and --data added),
whose student starts from the repaired weights (the product's fine-tune is not changed: this script
wraps its student builder, and stops with an error if the fine-tune no longer builds it there).

Results: docs/research/compress-experiments.md, "A closed-form start". Not part of the product, but
kept runnable: tests/test_research_scripts.py runs both modes on a tiny model (`--model`, `--eval-text`,
`--other-text` point it at a tiny folder and text files).
"""

import argparse
import json
import sys
import time

import torch

from truedepth.apps.finetune import model as ft_model
from truedepth.apps.finetune import pipeline as ft_pipeline
from truedepth.core.arch import decoder_layers
from truedepth.core.loading import load, save
from truedepth.measure.eval.data import load_text
from truedepth.measure.eval.perplexity import perplexity, tokenize

PLAN = "parallel=3:5,parallel=14:16,parallel=17:19,parallel=21:23,parallel=24:28"


class _Stop(Exception):
    pass


def layer_call_args(model, ids):
    """(args, kwargs) of decoder layer 0's call: the mask and rotary embeddings every layer gets
    (one attention type, no padding: the same for every batch of this shape)."""
    got = {}

    def capture(module, args, kwargs):
        got["call"] = (args, {k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _Stop

    hook = decoder_layers(model)[0].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        model(input_ids=ids, use_cache=False)
    except _Stop:
        pass
    finally:
        hook.remove()
    return got["call"]


@torch.no_grad()
def lsq_repair(student, base, batches, members, lam):
    """Refit the down projection of every wide layer of `student` (in place); returns seconds taken."""
    t0 = time.time()
    args, kwargs = layer_call_args(base, batches[0])

    def run(layer, states):
        return [ft_model.run_layers([layer], h, args, kwargs) for h in states]

    embed = base.get_input_embeddings()
    ends = {group[-1]: i for i, group in members.items()}
    states, targets = [embed(b) for b in batches], {}
    for j, layer in enumerate(decoder_layers(base)[: max(ends) + 1]):
        states = run(layer, states)
        if j in ends:
            targets[ends[j]] = states
    states = [embed(b) for b in batches]
    for i, layer in enumerate(decoder_layers(student)[: max(members) + 1]):
        if i in members:
            refit_down_proj(layer, states, targets.pop(i), args, kwargs, lam)
        states = run(layer, states)
    return time.time() - t0


def refit_down_proj(layer, states, targets, args, kwargs, lam):
    down = layer.mlp.down_proj
    d = down.in_features
    gram = torch.zeros(d, d, dtype=torch.float64)
    cross = torch.zeros(d, down.out_features, dtype=torch.float64)
    seen = {}
    hook = down.register_forward_hook(lambda m, a, o: seen.update(a=a[0], mlp=o))
    try:
        for h, t in zip(states, targets):
            out = ft_model.run_layers([layer], h, args, kwargs)
            a = seen["a"].reshape(-1, d).double()
            gram += a.T @ a
            cross += a.T @ (t - (out - seen["mlp"])).reshape(-1, down.out_features).double()
    finally:
        hook.remove()
    w = down.weight.data.double()
    ridge = lam * gram.diagonal().mean()
    fitted = torch.linalg.solve(gram + ridge * torch.eye(d, dtype=torch.float64), cross + ridge * w.T)
    down.weight.data = fitted.T.to(down.weight.dtype).contiguous()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="default", help="model to repair (default: the offline default model)")
    p.add_argument("--plan", default=PLAN)
    p.add_argument("--data", default="austen-train+fortunes", help="calibration text (a training text)")
    p.add_argument("--tokens", type=int, default=65536, help="calibration tokens (windows of 512, batches of 8)")
    p.add_argument("--lam", type=float, default=0.5, help="ridge strength, relative to the mean feature energy")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--eval-text", default="default", help="held-out text (default: the held-out novel)")
    p.add_argument("--other-text", default="other-domain", help="a text of another kind (default: the Jargon File)")
    p.add_argument("--out", help="save the repaired model here (safetensors)")
    p.add_argument("--finetune", action="store_true", help="run `truedepth finetune` from the repaired weights")
    opts, rest = p.parse_known_args()
    torch.set_num_threads(opts.threads)
    if opts.finetune:
        return finetune_from_repair(opts, [a for a in rest if a != "--"])
    base, tok = load(opts.model)
    student = ft_model.build_student(base, opts.plan)
    seconds = repair(student, base, tok, opts)
    result = {
        "plan": opts.plan,
        "data": opts.data,
        "tokens": opts.tokens,
        "lam": opts.lam,
        "seconds": round(seconds, 1),
    }
    for name, spec in (("held_out", opts.eval_text), ("other_domain", opts.other_text)):
        for tag, m in (("base", base), ("repaired", student)):
            result[f"{name}_{tag}"] = perplexity(m, tok, load_text(spec), tokens=opts.eval_tokens, progress=False)[
                "perplexity"
            ]
    print(json.dumps(result))
    if opts.out:
        save(student, tok, opts.out)


def repair(student, base, tok, opts):
    ids = torch.tensor(tokenize(tok, load_text(opts.data), opts.tokens)[: opts.tokens // 512 * 512]).view(-1, 512)
    members = ft_model.wide_members(opts.plan, len(decoder_layers(base)))
    seconds = lsq_repair(student, base, list(ids.split(8)), members, opts.lam)
    print(
        f"least-squares repair of {len(members)} wide layers on {ids.numel():,} tokens: {seconds:.0f} s",
        file=sys.stderr,
    )
    return seconds


def finetune_from_repair(opts, finetune_args):
    from truedepth.cli.main import main as cli_main
    from truedepth.core.loading import load_tokenizer, resolve

    original, tok = ft_pipeline.build_student, load_tokenizer(opts.model, resolve(opts.model))
    repaired = []

    def build_and_repair(base, plan, *args):
        student = original(base, plan, *args)
        repair(student, base, tok, opts)
        repaired.append(plan)
        return student

    ft_pipeline.build_student = build_and_repair
    code = cli_main(["finetune", "--model", opts.model, "--plan", opts.plan, "--data", opts.data, *finetune_args])
    if code == 0 and not repaired:
        raise SystemExit(
            "lsq_repair: the fine-tune no longer builds its student through "
            "truedepth.apps.finetune.pipeline.build_student, so nothing was repaired; update this script"
        )
    return code


if __name__ == "__main__":
    sys.exit(main())
