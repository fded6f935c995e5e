"""GPU check for `truedepth finetune`: bf16 training steps of the default model's shape run, the loss
falls, and how many tokens per second they take. Also: resume on the GPU (stop, reload the
checkpoint, continue) against an uninterrupted run, and the memory estimate against the peak.

Runs from the repo root with no network and no weights:

    PYTHONPATH=src python scripts/gpu/finetune.py --out DIR            # ~30-50 s on an H100/H200 (estimate)
    PYTHONPATH=src python scripts/gpu/finetune.py --out DIR --smoke    # tiny shape, CPU, seconds

By default it builds a random-weight model of the shape of SmolLM2-135M (30 layers, hidden 576,
9 heads / 3 KV heads, vocab 49152) from a config; `--model PATH` takes a local model folder instead.
Training data is a fixed set of random token sequences revisited every few steps, so both losses
must fall: `lm` by memorising them, `distill` by matching the unparallelized teacher.
Writes DIR/finetune_gpu.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from truedepth.apps.finetune import train as ft
from truedepth.apps.finetune.config import DTYPE_NAMES, TrainConfig
from truedepth.apps.finetune.model import estimate_training_memory
from truedepth.apps.finetune.pipeline import make_trainable, student_setup
from truedepth.core.plan import as_plan

DEFAULT_SHAPE = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    max_position_embeddings=8192,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    initializer_range=0.1,
)  # larger than HF's 0.02, so layers matter and the LP-vs-base KL is visible
SMOKE_SHAPE = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    tie_word_embeddings=True,
    initializer_range=0.1,
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for finetune_gpu.json")
    p.add_argument("--model", default=None, help="a local model folder instead of the random default shape")
    p.add_argument("--plan", default="parallel=20:28")
    p.add_argument("--steps", type=int, default=40, help="training steps per loss (default 40)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--smoke", action="store_true", help="tiny shape on CPU: checks the script itself")
    return p.parse_args()


def base_model(args: argparse.Namespace, device: str) -> torch.nn.Module:
    if args.model:
        import truedepth

        return truedepth.load(args.model, dtype=torch.float32, device=device)[0]
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**(SMOKE_SHAPE if args.smoke else DEFAULT_SHAPE))
    with torch.device(device):
        return LlamaForCausalLM(config).to(torch.float32).eval()


def one_run(
    base: torch.nn.Module,
    args: argparse.Namespace,
    loss: str,
    device: str,
    dtype: torch.dtype,
    out: Path | None = None,
    stop_after: int | None = None,
    resume: bool = False,
) -> tuple[dict, dict]:
    """Fresh student from `base`, trained `args.steps` steps as `truedepth finetune` trains it; returns
    (record, trained tensors)."""
    cfg = TrainConfig(
        loss=loss,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        tokens=args.steps * args.batch_size * args.seq_len,
        lr=args.lr,
        warmup=0.1,
        checkpoint_every=max(1, args.steps // 2),
        train_dtype=DTYPE_NAMES[dtype],
    )
    student, teacher = make_trainable(student_setup(base, None, as_plan(args.plan), cfg), cfg, dtype)
    # a fixed pool of 4 batches' worth of random sequences: revisited, so the loss must fall
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, base.config.vocab_size, (4 * args.batch_size * args.seq_len,), generator=g)
    data = ft.TokenBatches(ids, args.seq_len, args.batch_size)
    memory = estimate_training_memory(student, teacher.model if teacher else None, cfg, dtype)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        weights = torch.cuda.memory_allocated()
    result = ft.train(
        student, teacher, data, cfg, out, device, dtype, resume=resume, stop_after=stop_after, progress=False
    )
    hist = result.history
    skip = 3 if len(hist) > 6 else 0  # the first steps include CUDA/cuBLAS warm-up
    seconds = hist[-1]["seconds"] - (hist[skip - 1]["seconds"] if skip else 0.0)
    tokens = (len(hist) - skip) * cfg.tokens_per_step
    record = {
        "loss": loss,
        "steps": result.step,
        "tokens_per_step": cfg.tokens_per_step,
        "first_loss": hist[0]["loss"],
        "last_loss": sum(h["loss"] for h in hist[-5:]) / min(5, len(hist)),
        "tokens_per_second": round(tokens / max(seconds, 1e-9), 1),
        "estimated_extra_memory_gib": round(memory["total"] / 2**30, 3),
    }
    if device.startswith("cuda"):
        record["peak_extra_memory_gib"] = round((torch.cuda.max_memory_allocated() - weights) / 2**30, 3)
    record["loss_fell"] = record["last_loss"] < record["first_loss"]
    trained = {k: v.detach().float().cpu() for k, v in ft.trainable_state(student).items()}
    if teacher:
        teacher.close()
    return record, trained


def main() -> int:
    args = parse_args()
    if args.smoke:
        args.plan, args.steps, args.batch_size, args.seq_len = "parallel=2:6", 12, 2, 32
    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    dtype = torch.bfloat16
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    info = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "train_dtype": "bf16 autocast, fp32 trainable weights, bf16 frozen weights",
        "plan": args.plan,
        "model": args.model or ("random tiny (smoke)" if args.smoke else "random SmolLM2-135M shape"),
        "date": time.strftime("%Y-%m-%d"),
        "runs": [],
    }
    for loss in ("lm", "distill"):
        base = base_model(args, device)
        record, _ = one_run(base, args, loss, device, dtype)
        info["runs"].append(record)
        del base
    # resume on the device: half the steps, a fresh process-like rebuild, the rest
    ck = out / "resume-check"
    short = argparse.Namespace(**dict(vars(args), steps=max(4, args.steps // 3)))
    _, want = one_run(base_model(short, device), short, "lm", device, dtype, out=ck / "full")
    one_run(base_model(short, device), short, "lm", device, dtype, out=ck / "killed", stop_after=short.steps // 2)
    _, got = one_run(base_model(short, device), short, "lm", device, dtype, out=ck / "killed", resume=True)
    _, again = one_run(base_model(short, device), short, "lm", device, dtype)  # same run twice: kernel noise
    info["resume_max_abs_diff"] = max(float((got[k] - want[k]).abs().max()) for k in want)
    info["repeat_max_abs_diff"] = max(float((again[k] - want[k]).abs().max()) for k in want)
    import shutil

    shutil.rmtree(ck, ignore_errors=True)
    info["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "finetune_gpu.json").write_text(json.dumps(info, indent=1))
    print(f"{info['device']}, torch {info['torch']}, {info['model']}, plan {args.plan}, {info['train_dtype']}")
    print(
        f"{'loss':8s} {'steps':>5s} {'tok/step':>8s} {'first':>8s} {'last5':>8s} {'tok/s':>10s} {'est GiB':>8s} "
        f"{'peak GiB':>8s}"
    )
    for r in info["runs"]:
        print(
            f"{r['loss']:8s} {r['steps']:5d} {r['tokens_per_step']:8d} {r['first_loss']:8.4f} {r['last_loss']:8.4f} "
            f"{r['tokens_per_second']:10.0f} {r['estimated_extra_memory_gib']:8.3f} "
            f"{r.get('peak_extra_memory_gib', float('nan')):8.3f}"
        )
    print(
        f"resume vs uninterrupted: max |diff| of trained weights {info['resume_max_abs_diff']:.3g} "
        f"(two uninterrupted runs: {info['repeat_max_abs_diff']:.3g}); total {info['seconds']} s"
    )
    ok = all(r["loss_fell"] for r in info["runs"])
    print("OK: loss fell in both runs" if ok else "FAIL: a loss did not fall")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
