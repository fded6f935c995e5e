"""`truedepth bench --engine vllm|llama.cpp` (and compress's serve stage): serve the base model and LP
models in the engine people deploy, drive them with vLLM's own benchmark client (`vllm bench serve`) at
each concurrency level, the models taking turns, and report (measure.bench.serving holds the options,
the checks and the summary; deploy.engines the models and the servers of each engine)."""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..measure.bench.serving import (
    CLIENT_FIELDS,
    LoadSettings,
    check_engine_options,
    describe_settings,
    summarize,
)
from ..utils.errors import MeasurementError
from ..utils.io import atomic_write_json
from .engines import Candidate, safe_name
from .server import Server, check_port, exit_on_termination, free_port, running_server


# ---------------------------------------------------------------------------------------------
# The client: vLLM's `vllm bench serve`, called in this process (an import of vLLM costs ~20 s on a
# small CPU: once, not once per run)
# ---------------------------------------------------------------------------------------------
def client_arguments(
    server: Server,
    tokenizer: Path,
    s: LoadSettings,
    level: int,
    repeat: int,
    endpoint: str,
    engine_headers: tuple[str, ...] = (),
) -> list[str]:
    """vLLM's client at one level. Each repeat and level draws other random prompts (its own seed): the
    same prompts again would hit the engine's prefix cache and skip their prefill. Every model gets the
    same prompts at the same repeat and level."""
    return [
        "--backend",
        "openai",
        "--base-url",
        server.url,
        "--endpoint",
        endpoint,
        "--model",
        server.name,
        "--served-model-name",
        server.name,
        "--tokenizer",
        str(tokenizer),
        "--dataset-name",
        "random",
        "--random-input-len",
        str(s.prompt),
        "--random-output-len",
        str(s.new),
        "--random-range-ratio",
        "0",
        "--num-prompts",
        str(s.requests_at(level)),
        "--max-concurrency",
        str(level),
        "--num-warmups",
        str(s.warmup),
        "--ignore-eos",
        "--temperature",
        "0",
        "--seed",
        str(s.seed + 1000 * repeat + level),
        "--disable-tqdm",
        *[arg for header in engine_headers for arg in ("--header", header)],
    ]


def run_client(argv: list[str], log: Path) -> dict[str, Any]:
    """One `vllm bench serve` run; its printed report goes to `log`, its result comes back."""
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    args = parser.parse_args(argv)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = main(args)
    with open(log, "a") as out:
        out.write(" ".join(["vllm bench serve", *argv]) + "\n" + printed.getvalue() + "\n")
    return result


def check_alive(server: Server) -> None:
    """A server whose process exited or whose /health fails (vLLM's engine died) ends the bench, with its log."""
    import urllib.request

    try:
        alive = server.process.poll() is None
        with urllib.request.urlopen(server.url + "/health", timeout=30) as response:
            alive = alive and response.status == 200
    except OSError:
        alive = False
    if not alive:
        raise MeasurementError(
            f"the {server.name} server stopped serving during the bench; its last output ({server.log}):\n"
            f"{server.log_tail(25)}"
        )


def measured(result: dict[str, Any]) -> dict[str, Any]:
    return {ours: result.get(theirs) for ours, theirs in CLIENT_FIELDS.items()}


# ---------------------------------------------------------------------------------------------
# Turns: every repeat and level, each model once
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def servers_up(engine: Any, candidates: list[Candidate], settings: LoadSettings, logs: Path) -> Iterator[dict]:
    """Every model's server running at once (the default): turns switch between them without restarts."""
    with contextlib.ExitStack() as stack:
        up = {}
        for c in candidates:
            print(f"starting the {engine.name} server for {c.label} on port {c.port}", file=sys.stderr)
            up[c.label] = stack.enter_context(start(engine, c, settings, logs))
        yield up


def start(engine: Any, c: Candidate, settings: LoadSettings, logs: Path) -> Any:
    return running_server(
        c.label,
        engine.command(c, settings),
        c.port,
        logs / f"server-{safe_name(c.label)}.log",
        env=engine.env(settings),
        timeout_s=settings.extra["server_timeout"],
    )


def turns(candidates: list[Candidate], settings: LoadSettings) -> Iterator[tuple[int, int, Candidate]]:
    for repeat in range(settings.repeats):
        for level in settings.levels:
            for c in candidates:
                yield repeat, level, c


def measure_turns(
    engine: Any,
    candidates: list[Candidate],
    settings: LoadSettings,
    logs: Path,
    sequential: bool,
    on_run: Any,
) -> None:
    """Run every turn; with `sequential`, one server at a time (started for its turns of each repeat)."""
    from tqdm.auto import tqdm

    total = settings.repeats * len(settings.levels) * len(candidates)
    with tqdm(total=total, desc=f"bench {engine.name}", unit="run", file=sys.stderr) as bar:

        def one(server: Server, repeat: int, level: int, c: Candidate) -> None:
            argv = client_arguments(server, c.folder, settings, level, repeat, engine.endpoint, engine.headers)
            result = measured(run_client(argv, logs / f"client-{safe_name(c.label)}.log"))
            check_alive(server)
            on_run(
                {"model": c.label, "plan": c.plan, "depth": c.depth, "concurrency": level, "repeat": repeat}
                | result
                | {"load_average": round(os.getloadavg()[0], 2)}
            )
            bar.update()

        if not sequential:
            with servers_up(engine, candidates, settings, logs) as up:
                for repeat, level, c in turns(candidates, settings):
                    one(up[c.label], repeat, level, c)
            return
        for repeat in range(settings.repeats):
            for c in candidates:
                with start(engine, c, settings, logs) as server:
                    for level in settings.levels:
                        one(server, repeat, level, c)


# ---------------------------------------------------------------------------------------------
# The whole run
# ---------------------------------------------------------------------------------------------
def assign_ports(candidates: list[Candidate], first: int | None) -> None:
    """Each model its own port: from --port on (each checked free now), else the OS's free ports."""
    for i, c in enumerate(candidates):
        if first is None:
            c.port = free_port()
        else:
            c.port = first + i
            check_port(c.port)


def measure_engine(args: Any) -> dict[str, Any]:
    """Refuse bad input, prepare the models, serve and drive them in turns; the results (meta, runs,
    summary), also written to args.json_file after every run. `args`: a BenchOptions (compress makes one)."""
    from ..utils.env import cpu_name, environment
    from ..utils.plotting import check_plotting
    from .engines import engine_for

    settings = check_engine_options(args)
    if args.plot:
        check_plotting()
    engine = engine_for(args.engine)
    candidates = engine.candidates(args, settings)  # plans and folders checked: nothing loaded yet
    engine.check_installed()
    assign_ports(candidates, args.port)
    meta = environment("cpu") | {
        "cpu": cpu_name(),
        "cores": len(os.sched_getaffinity(0)),
        "engine": engine.name,
        "engine_version": engine.version(),
        "settings": {k: v for k, v in vars(settings).items() if k != "extra"},
        "requests_per_level": {str(level): settings.requests_at(level) for level in settings.levels},
    }
    runs: list[dict[str, Any]] = []

    def save(run: dict[str, Any]) -> None:
        runs.append(run)
        if args.json_file:  # rewritten after every run: an interrupted run keeps what it measured
            write_results(args.json_file, meta, runs)

    with exit_on_termination(), work_folder(args.work_dir) as work:
        for c in candidates:
            engine.prepare(c, args, settings, work)
        meta["models"] = [model_record(c) for c in candidates]
        measure_turns(engine, candidates, settings, work / "logs", args.sequential, save)
        meta |= engine.extra_measurements(candidates, settings)  # while the files exist
    if args.json_file:
        write_results(args.json_file, meta, runs)
    return meta | {"runs": runs, "summary": summarize(runs)}


def run_engine_bench(args: Any) -> int:
    """`truedepth bench --engine vllm|llama.cpp`: measure, then print the table and write the plot."""
    from ..measure.bench.serving_report import format_markdown, format_table, plot

    results = measure_engine(args)
    summary = results["summary"]
    print(describe_settings(results))
    print(format_markdown(summary) if args.markdown else format_table(summary))
    for row in results.get("llama_bench", []):
        print(f"llama-bench {row['model']}: {row['test']} {row['tok_s']:.1f} ± {row['stddev_tok_s']:.1f} tok/s")
    if args.json_file:
        print(f"wrote {args.json_file}")
    if args.plot:
        print(f"wrote {plot(summary, args.plot, results['engine'])}")
    runs = results["runs"]
    return 1 if runs and all(not r.get("completed") for r in runs) else 0


@contextlib.contextmanager
def work_folder(given: str | None) -> Iterator[Path]:
    if given:
        path = Path(given)
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="truedepth-bench-") as tmp:
        yield Path(tmp)


def model_record(c: Candidate) -> dict[str, Any]:
    return {
        "model": c.label,
        "plan": c.plan,
        "depth": c.depth,
        "source": c.source,
        "served": str(c.served),
        "random_weights": c.random_weights,
    }


def write_results(path: str, meta: dict[str, Any], runs: list[dict[str, Any]]) -> None:
    atomic_write_json(path, meta | {"runs": runs, "summary": summarize(runs)})
