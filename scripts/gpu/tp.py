"""One-GPU inputs for the TP + LP speed-up estimate (no second GPU, no NCCL between GPUs).

    PYTHONPATH=src python scripts/gpu/tp.py --out DIR        (about 30-40 s on an H100/H200)
    PYTHONPATH=src python scripts/gpu/tp.py --out DIR --smoke (CPU, tiny shape, seconds)

Measures, for the Llama-2-7B shape in bf16 at batch 1, the time of one decode step (one token,
no KV context) through one decoder layer of each size a rank holds under TP1/2/4/8:
ordinary layer / N ("full", "half", "quarter", "eighth") and the LP wide pair / N ("wide" = the
pair unsharded; a pair over 2 ranks is "full"-sized per rank). Each size runs as a stack of layers
in eager PyTorch (like HF eager decode) and replayed as one CUDA graph (launch overhead removed).
Also: the final norm + LM head (replicated under our TP), and the per-layer host overhead of our
two TP implementations in eager mode, measured on a 1-rank NCCL group (DTensor dispatch vs a
plain sharded layer with an all-reduce hook).

The estimate then combines these with an ASSUMED cross-GPU all-reduce latency a (NVLink, 8 KB):

    TPN base    = L·t(ordinary/N)                    + 2·L·a           + head
    TPN LP(Δ)   = (L−Δ)·t(ordinary/N) + Δ/2·t(wide/N) + 2·(L−Δ/2)·a   + head

a is not measured here (one GPU): the JSON and table say so.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch

ASSUMED_ALL_REDUCE_US = (10.0, 20.0, 40.0)  # NVLink NCCL small-message all-reduce: assumed, not measured
DELTA = 14  # the paper's Llama-2-7B range: layers 16-29 in pairs


def layer_config(base, heads_factor: float, ffn_factor: float):
    from transformers import LlamaConfig

    kw = base.to_dict()
    kw.update(
        num_attention_heads=int(base.num_attention_heads * heads_factor),
        num_key_value_heads=int(base.num_key_value_heads * heads_factor),
        intermediate_size=int(base.intermediate_size * ffn_factor),
        head_dim=base.head_dim,
    )
    kw.pop("model_type", None)
    cfg = LlamaConfig(**kw)
    cfg._attn_implementation = "sdpa"
    return cfg


def build_stack(cfg, n: int, dtype, device):
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    torch.manual_seed(0)
    with torch.device(device):
        layers = torch.nn.ModuleList([LlamaDecoderLayer(cfg, i) for i in range(n)]).to(dtype).eval()
        for p in layers.parameters():
            p.data.normal_(0, 0.02)
        rotary = LlamaRotaryEmbedding(cfg)
    return layers, rotary


@torch.no_grad()
def time_eager(step, iters: int, device) -> float:
    """Seconds per call of `step`: the median of 3 timed runs of `iters` calls (truedepth's timing code)."""
    from truedepth.measure.bench.timing import median_time

    return median_time(lambda: [step() for _ in range(iters)], device, repeats=3, warmup=1) / iters


GRAPHS_BROKEN = []  # after one failed capture, skip the rest (a failed capture can leave the stream unusable)


@torch.no_grad()
def time_graph(step, iters: int):
    """Seconds per replay of `step` captured as one CUDA graph; None where it cannot be captured."""
    if GRAPHS_BROKEN:
        return None
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
        samples = []
        for _ in range(3):
            start = time.perf_counter()
            for _ in range(iters):
                graph.replay()
            torch.cuda.synchronize()
            samples.append((time.perf_counter() - start) / iters)
        return statistics.median(samples)
    except Exception as e:  # noqa: BLE001  report, do not lose the eager numbers
        print(f"  CUDA graph capture failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
        GRAPHS_BROKEN.append(f"{type(e).__name__}: {str(e)[:300]}")
        return None


def layer_step(layers, rotary, hidden: int, dtype, device):
    x = torch.randn(1, 1, hidden, dtype=dtype, device=device)
    pos = torch.zeros(1, 1, dtype=torch.long, device=device)
    cos_sin = rotary(x, pos)

    def step():
        h = x
        for layer in layers:
            h = layer(h, position_embeddings=cos_sin, position_ids=pos)
        return h

    return step


def measure_sizes(base, sizes: dict, n: int, iters: int, dtype, device, graphs: bool) -> dict:
    out = {}
    for name, (hf, ff) in sizes.items():
        cfg = layer_config(base, hf, ff)
        layers, rotary = build_stack(cfg, n, dtype, device)
        step = layer_step(layers, rotary, base.hidden_size, dtype, device)
        eager = time_eager(step, iters, device) / n
        graph = time_graph(step, iters * 4) if graphs else None
        out[name] = {
            "heads": cfg.num_attention_heads,
            "kv_heads": cfg.num_key_value_heads,
            "intermediate": cfg.intermediate_size,
            "eager_ms": eager * 1e3,
            "graph_ms": None if graph is None else graph / n * 1e3,
        }
        print(
            f"  {name:<8} heads {cfg.num_attention_heads:>3} ffn {cfg.intermediate_size:>6}: eager "
            f"{eager * 1e3:.4f} ms/layer, graph {'-' if graph is None else f'{graph / n * 1e3:.4f}'} ms/layer",
            flush=True,
        )
        del layers, rotary, step
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    return out


@torch.no_grad()
def measure_head(base, iters: int, dtype, device, graphs: bool) -> dict:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    with torch.device(device):
        norm = LlamaRMSNorm(base.hidden_size).to(dtype)
        head = torch.nn.Linear(base.hidden_size, base.vocab_size, bias=False).to(dtype)
    x = torch.randn(1, 1, base.hidden_size, dtype=dtype, device=device)

    def step():
        return head(norm(x)).argmax(-1)

    eager = time_eager(step, iters, device)
    graph = time_graph(step, iters * 4) if graphs else None
    return {"eager_ms": eager * 1e3, "graph_ms": None if graph is None else graph * 1e3}


def tp_overhead(base, iters: int, dtype, device) -> dict:
    """Eager per-layer time of a 'full' layer plain, under DTensor and under the local impl, on a
    1-rank process group (NCCL on GPU): the host overhead each implementation adds per layer."""
    import torch.distributed as dist

    from truedepth.runtime.distributed import tp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    out = {}
    try:
        mesh = tp.init_distributed(60, "cuda" if torch.device(device).type == "cuda" else "cpu")
        cfg = layer_config(base, 1, 1)
        for impl in ("plain", "dtensor", "local"):
            layers, rotary = build_stack(cfg, 4, dtype, device)
            for layer in layers:
                if impl == "dtensor":
                    from torch.distributed.tensor.parallel import parallelize_module

                    parallelize_module(layer, mesh, tp.layer_tp_plan(), src_data_rank=0)
                elif impl == "local":
                    tp.shard_locally(layer, mesh)
            step = layer_step(layers, rotary, base.hidden_size, dtype, device)
            out[impl] = time_eager(step, iters, device) / len(layers) * 1e3
            del layers, rotary, step
        for impl in ("dtensor", "local"):
            out[f"{impl}_overhead_ms"] = out[impl] - out["plain"]
        print("  eager ms/layer on a 1-rank group: " + ", ".join(f"{k} {v:.4f}" for k, v in out.items()), flush=True)
    except Exception as e:  # noqa: BLE001
        out["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        print(f"  TP overhead measurement failed: {out['error']}", flush=True)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return out


def estimate(per_layer: dict, head: dict, layers: int, regime: str) -> list[dict]:
    ordinary = {1: "full", 2: "half", 4: "quarter", 8: "eighth"}
    wide = {1: "wide", 2: "full", 4: "half", 8: "quarter"}
    key = f"{regime}_ms"
    rows = []
    for n in (1, 2, 4, 8):
        t_o, t_w, t_h = per_layer[ordinary[n]][key], per_layer[wide[n]][key], head[key]
        if None in (t_o, t_w, t_h):
            continue
        for a_us in (0.0,) if n == 1 else ASSUMED_ALL_REDUCE_US:
            a = a_us / 1e3
            base = layers * t_o + 2 * layers * a + t_h
            lp = (layers - DELTA) * t_o + DELTA // 2 * t_w + 2 * (layers - DELTA // 2) * a + t_h
            rows.append(
                {
                    "tp": n,
                    "regime": regime,
                    "assumed_all_reduce_us": a_us,
                    "base_ms_per_token": base,
                    "lp_ms_per_token": lp,
                    "estimated_speedup": base / lp,
                }
            )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out")
    ap.add_argument("--smoke", action="store_true", help="tiny shape on CPU, a few iterations (tests the script)")
    args = ap.parse_args()

    from truedepth.core.shapes import shape_config

    cuda = torch.cuda.is_available() and not args.smoke
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    shape = "tiny" if args.smoke else "llama-2-7b"
    # smoke: enough heads that an eighth of them is still a whole head
    base = shape_config(
        shape,
        **(
            dict(
                hidden_size=128,
                num_attention_heads=16,
                num_key_value_heads=16,
                head_dim=8,
                intermediate_size=256,
                num_hidden_layers=32,
            )
            if args.smoke
            else {}
        ),
    )
    n, iters = (2, 3) if args.smoke else (8, 30)
    sizes = {
        "wide": (2, 2),
        "full": (1, 1),
        "half": (1 / 2, 1 / 2),
        "quarter": (1 / 4, 1 / 4),
        "eighth": (1 / 8, 1 / 8),
    }
    started = time.time()
    print(
        f"{shape} on {torch.cuda.get_device_name() if cuda else 'cpu'} ({dtype}), torch {torch.__version__}", flush=True
    )
    per_layer = measure_sizes(base, sizes, n, iters, dtype, device, graphs=cuda)
    head = measure_head(base, iters, dtype, device, graphs=cuda)
    print(f"  final norm + LM head: eager {head['eager_ms']:.4f} ms, graph {head['graph_ms']} ms", flush=True)
    overhead = tp_overhead(base, iters, dtype, device)
    rows = estimate(per_layer, head, base.num_hidden_layers, "eager") + estimate(
        per_layer, head, base.num_hidden_layers, "graph"
    )
    result = {
        "shape": shape,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "dtype": str(dtype),
        "torch": torch.__version__,
        "layers_per_stack": n,
        "delta": DELTA,
        "note": "per-layer decode step at batch 1 without KV context; the all-reduce latency in the estimate "
        "is ASSUMED (no multi-GPU machine), not measured",
        "graph_capture_error": GRAPHS_BROKEN[0] if GRAPHS_BROKEN else None,
        "per_layer": per_layer,
        "head": head,
        "tp_overhead_eager": overhead,
        "estimate": rows,
        "seconds": time.time() - started,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tp.json").write_text(json.dumps(result, indent=1))
    print(f"\nESTIMATE for {shape}, LP delta {DELTA} (all-reduce latency a ASSUMED, not measured):")
    print(f"{'TP':>3} {'regime':<6} {'a (us)':>7} {'base ms/tok':>11} {'LP ms/tok':>10} {'speed-up':>8}")
    for r in rows:
        print(
            f"{r['tp']:>3} {r['regime']:<6} {r['assumed_all_reduce_us']:>7.0f} {r['base_ms_per_token']:>11.3f} "
            f"{r['lp_ms_per_token']:>10.3f} {r['estimated_speedup']:>7.2f}x"
        )
    print(f"(paper, 2x A100, Llama-2-7B, delta 14: 1.29x)  wrote {out / 'tp.json'} in {result['seconds']:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
