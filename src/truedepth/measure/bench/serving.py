"""`truedepth bench --engine vllm|llama.cpp`: its options, their checks and the summary of its runs. The
servers and the client that drives them are in truedepth.deploy.engine_bench (deploy sits above measure).

The base model and LP models are served by the engine people deploy, driven by vLLM's own benchmark
client (`vllm bench serve`) at several concurrency levels.
Each model gets its own server on 127.0.0.1. At every repeat and concurrency level the models take
turns (base, LP 1, LP 2, base, ...), so slow drift of the machine's load reaches all alike. A level
sends a fixed number of random prompts of --prompt tokens, each asking for exactly --new tokens
(ignore_eos), at most `level` at a time. Per model and level the report gives output tokens/s, mean
and p99 time per output token (TPOT), mean time to first token (TTFT), completed and failed
requests: the median over --repeats with the spread (min-max), and LP against base.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

from ...core.plan import parse_int_ranges
from ...utils.errors import UserError, check_output_file
from ...utils.options import option

ENGINES = ("transformers", "vllm", "llama.cpp")
METRICS = ("output_tok_s", "mean_tpot_ms", "p99_tpot_ms", "mean_ttft_ms")
CLIENT_FIELDS = {  # our name: the field of vLLM's benchmark result
    "output_tok_s": "output_throughput",
    "mean_tpot_ms": "mean_tpot_ms",
    "p99_tpot_ms": "p99_tpot_ms",
    "mean_ttft_ms": "mean_ttft_ms",
    "completed": "completed",
    "failed": "failed",
    "duration_s": "duration",
}


@dataclass
class EngineOptions:
    """How `bench` serves and loads the models when --engine is a serving engine."""

    group_title = "serving engine (--engine vllm or llama.cpp)"
    engine: str = option(
        "transformers",
        "where to measure: 'transformers' (this process, the modes of --mode), or a serving engine: "
        "'vllm' (`vllm serve`) or 'llama.cpp' (`llama-server`, GGUF files exported here), each loaded by "
        "vLLM's benchmark client (`vllm bench serve`) at every --concurrency level.",
        choices=ENGINES,
    )
    concurrency: str = option("1,4,8,16", "engine: concurrency levels (requests in flight at once), comma-separated.")
    requests: int | None = option(
        None, "engine: requests per model, level and repeat (default: 4 x the level, at least 8)"
    )
    tensor_parallel_size: int = option(
        1,
        "engine vllm: passed to `vllm serve` (on CPU each rank gets its own block of cores through "
        "VLLM_CPU_OMP_THREADS_BIND unless it is set).",
    )
    port: int | None = option(
        None, "engine: port of the first server; the next models count up from it (default: free ports)"
    )
    server_timeout: float = option(900.0, "engine: seconds a server may take to load its model.")
    gguf_type: str = option("f32", "engine llama.cpp: tensor type of the exported GGUF files (see `export --help`).")
    work_dir: str | None = option(
        None,
        "engine: folder for the saved LP models, GGUF files and server logs, kept (default: a temporary folder, "
        "deleted at the end)",
        metavar="DIR",
    )


@dataclass
class LoadSettings:
    prompt: int
    new: int
    levels: list[int]
    requests: int | None
    repeats: int
    warmup: int
    seed: int
    dtype: str
    eager: bool
    tensor_parallel_size: int
    max_model_len: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def requests_at(self, level: int) -> int:
        return self.requests if self.requests is not None else max(8, 4 * level)


# ---------------------------------------------------------------------------------------------
# Summary: median and spread over repeats, LP against base
# ---------------------------------------------------------------------------------------------
def summarize(runs: list[dict[str, Any]], base: str = "base") -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    keys = list(dict.fromkeys((r["model"], r["concurrency"]) for r in runs))
    for model, level in keys:
        mine = [r for r in runs if (r["model"], r["concurrency"]) == (model, level)]
        row: dict[str, Any] = {k: mine[0][k] for k in ("model", "plan", "depth", "concurrency")}
        row["repeats"] = len(mine)
        for m in METRICS:
            values = [r[m] for r in mine if r.get(m) is not None]
            row[m] = statistics.median(values) if values else None
            row[f"{m}_min"], row[f"{m}_max"] = (min(values), max(values)) if values else (None, None)
        row["completed"] = sum(r.get("completed") or 0 for r in mine)
        row["failed"] = sum(r.get("failed") or 0 for r in mine)
        rows.append(row)
    by_key = {(r["model"], r["concurrency"]): r for r in rows}
    for row in rows:
        ref = by_key.get((base, row["concurrency"]))
        if ref is None or row["model"] == base:
            continue
        row["throughput_vs_base"] = ratio(row["output_tok_s"], ref["output_tok_s"])
        row["tpot_speedup_vs_base"] = ratio(ref["mean_tpot_ms"], row["mean_tpot_ms"])  # >1: LP is faster
        row["ttft_speedup_vs_base"] = ratio(ref["mean_ttft_ms"], row["mean_ttft_ms"])
    return rows


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


# ---------------------------------------------------------------------------------------------
# Options checked before anything runs, and the one-line description of a run
# ---------------------------------------------------------------------------------------------
def check_engine_options(args: Any) -> LoadSettings:
    """Everything about the options that can be refused before a model is read or a server started."""
    from ...utils.device import device_and_dtype

    levels = parse_int_ranges(args.concurrency, "--concurrency", minimum=1)
    if args.requests is not None and args.requests < 1:
        raise UserError(f"--requests {args.requests}: give at least 1 request per level.")
    if args.repeats < 1:
        raise UserError(f"--repeats {args.repeats}: give at least 1.")
    if args.tensor_parallel_size < 1:
        raise UserError(f"--tensor-parallel-size {args.tensor_parallel_size}: give 1 or more.")
    if args.prompt_tokens < 1 or (args.new_tokens is not None and args.new_tokens < 2):
        raise UserError("--prompt must be at least 1 and --new at least 2 (TPOT needs a second token).")
    modes = [m.strip() for m in (args.mode or "compiled").split(",") if m.strip()]
    if args.engine == "llama.cpp" and args.mode is not None:
        raise UserError("--mode is not an option of llama.cpp (it has no compiled mode); leave it out.")
    if len(modes) != 1 or modes[0] not in ("eager", "compiled"):
        raise UserError(
            f"--mode {args.mode!r} with --engine {args.engine}: give one of eager (no compilation) or compiled "
            "(the engine's default)."
        )
    _, dtype = device_and_dtype("cpu" if args.device is None else args.device, args.dtype)
    new = args.new_tokens if args.new_tokens is not None else 64
    settings = LoadSettings(
        prompt=args.prompt_tokens,
        new=new,
        levels=levels,
        requests=args.requests,
        repeats=args.repeats,
        warmup=args.warmup_runs,
        seed=args.seed,
        dtype=dtype,
        eager=modes[0] == "eager",
        tensor_parallel_size=args.tensor_parallel_size,
        max_model_len=max(256, args.prompt_tokens + new + 16),
        extra={"server_timeout": args.server_timeout},
    )
    check_output_file(args.json_file, "--json")
    check_output_file(args.plot, "--plot")
    return settings


def describe_settings(results: dict[str, Any]) -> str:
    s = results["settings"]
    mode = "" if results["engine"] == "llama.cpp" else (", eager" if s["eager"] else ", compiled")
    return (
        f"{results['engine']} {results['engine_version']} on {results['cpu']} ({results['cores']} cores), "
        f"{s['dtype']}{mode}, TP {s['tensor_parallel_size']}; "
        f"random prompts of {s['prompt']} tokens, {s['new']} new; median (min-max) of {s['repeats']} repeat(s)"
    )
