"""The serving engines `truedepth bench --engine` measures: which models, the files each engine loads,
and the server it starts for them. Every check here reads configs only: a plan that does not fit, a
folder an engine cannot serve or a tensor-parallel size the heads do not divide is refused before any
weight is read or any server is started."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.arch import current_plan, layer_widths, transformed_record
from ..core.loading import TOKENIZER_FILES, resolve
from ..core.plan import as_plan
from ..measure.bench.serving import LoadSettings
from ..utils.io import looks_like_path
from .server import HOST, ServerError


@dataclass
class Candidate:
    """One model to serve: its label, plan, depth and the files the engine and the client read."""

    label: str
    plan: str
    depth: int | None
    source: str  # what the folder is made from: the model, a plan of it, or a given folder
    folder: Path | None = None  # an HF folder: served by vLLM, and the tokenizer of the client
    served: Path | None = None  # what the server loads (the folder, or a GGUF file)
    random_weights: bool = False
    port: int = 0


def safe_name(label: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in label)[:80]


def plan_entries(args: Any, source: Any) -> list[str]:
    """--plan entries (plan strings or saved LP folders), or the model's usual plan; each once."""
    given = args.plans if args.plans is not None else source.default_plans()
    return list(dict.fromkeys(given))


def is_folder(entry: str) -> bool:
    return looks_like_path(entry) or Path(entry).is_dir()


class Engine:
    """What the engines share: the candidates (base + plans + folders) and the config-only checks."""

    name = ""
    endpoint = "/v1/completions"
    headers: tuple[str, ...] = ()  # HTTP headers the client sends with every request

    def check_installed(self) -> None:
        from .vllm.serve import vllm_version

        if vllm_version() is None:  # vLLM's benchmark client drives every engine
            raise ServerError(
                f"--engine {self.name} is driven by vLLM's benchmark client (`vllm bench serve`), and vLLM is not "
                'installed here; install it (`pip install "truedepth[vllm]"`) or choose --engine transformers.'
            )

    def candidates(self, args: Any, settings: LoadSettings) -> list[Candidate]:
        from ..measure.bench.benchmark import Source

        source = Source(args, None, None)
        self.source, self.model_id = source, source.model_id
        depth = source.num_layers  # refuses a --model that is already transformed
        found = [Candidate("base", "base", depth, source="base", random_weights=source.shape is not None)]
        for entry in plan_entries(args, source):
            if is_folder(entry):
                found.append(self.folder_candidate(entry, settings))
                continue
            plan = as_plan(entry)
            plan.validate(depth)  # a bad plan fails now, before anything is loaded
            if str(plan) not in [c.plan for c in found]:
                found.append(Candidate(str(plan), str(plan), None, "plan", random_weights=found[0].random_weights))
        for c in found:
            c.depth = len(self.widths(c))
            self.check_widths(c, settings)
        return found

    def folder_candidate(self, entry: str, settings: LoadSettings) -> Candidate:
        from ..core.loading import read_config

        config = read_config(entry)  # refuses a missing folder or one without config.json
        if not transformed_record(config):
            raise ServerError(
                f"--plan {entry} is a folder of a model that truedepth did not transform; give an LP folder "
                "(saved by truedepth.save or `truedepth compress`) or a plan string."
            )
        folder = Path(entry)
        return Candidate(folder.name, str(current_plan(config)), config.num_hidden_layers, str(folder), folder, folder)

    def widths(self, c: Candidate) -> list[Any]:
        if c.source not in ("base", "plan"):
            from ..core.loading import read_config

            return layer_widths(read_config(c.source))
        return layer_widths(self.source.config, None if c.plan == "base" else c.plan)

    def check_widths(self, c: Candidate, settings: LoadSettings) -> None:
        """Engine-specific refusals of a candidate, from its layer widths."""

    def version(self) -> str:
        return ""

    def extra_measurements(self, candidates: list[Candidate], settings: LoadSettings) -> dict[str, Any]:
        """What the engine's own tools measure besides the served load (llama.cpp: llama-bench)."""
        return {}


class VLLMEngine(Engine):
    name = "vllm"

    def check_installed(self) -> None:
        from .vllm.serve import vllm_program

        vllm_program()
        super().check_installed()

    def version(self) -> str:
        from .vllm.serve import vllm_version

        return vllm_version() or ""

    def check_widths(self, c: Candidate, settings: LoadSettings) -> None:
        from .vllm import fits, valid_world_sizes
        from .vllm.serve import on_cpu, thread_binding

        tp = settings.tensor_parallel_size
        if c.source not in ("base", "plan"):
            from .vllm import check_servable

            check_servable(c.source, tp)
            return
        sizes = self.widths(c)
        bad = next((s for s in sizes if not fits(s, tp)), None)
        if bad is not None:
            raise ServerError(
                f"--tensor-parallel-size {tp} does not divide layer {bad.index} of {c.label} ({bad.heads} heads, "
                f"{bad.kv_heads} KV heads, MLP size {bad.intermediate}); sizes that fit: "
                f"{', '.join(map(str, valid_world_sizes(sizes)))}."
            )
        if tp > 1 and on_cpu():
            thread_binding(tp)  # refuses more ranks than cores

    def prepare(self, c: Candidate, args: Any, settings: LoadSettings, work: Path) -> None:
        if c.folder is not None:
            return
        if c.random_weights:
            c.folder = c.served = self.shape_folder(c, work)
        elif c.plan == "base":
            c.folder = c.served = Path(resolve(self.model_id))
        else:
            c.folder = c.served = save_lp_folder(self.model_id, c.plan, settings.dtype, work)

    def shape_folder(self, c: Candidate, work: Path) -> Path:
        """A config-only folder of the shape after the plan, with the default model's tokenizer: vLLM gives it
        random weights; the client needs a tokenizer to make its random prompts."""
        from .vllm import save_config_folder

        folder = work / "models" / f"shape-{safe_name(c.label)}"
        save_config_folder(self.source.config, None if c.plan == "base" else c.plan, folder)
        copy_tokenizer(Path(resolve("default")), folder)
        return folder

    def command(self, c: Candidate, settings: LoadSettings) -> list[str]:
        from .vllm.serve import serve_command

        return serve_command(
            c.served,
            c.port,
            c.label,
            dtype=settings.dtype,
            tensor_parallel_size=settings.tensor_parallel_size,
            max_model_len=settings.max_model_len,
            max_num_seqs=max(settings.levels),
            eager=settings.eager,
            random_weights=c.random_weights,
        )

    def env(self, settings: LoadSettings) -> dict[str, str]:
        from .vllm.serve import serve_env

        return serve_env(settings.tensor_parallel_size)


class LlamaCppEngine(Engine):
    name = "llama.cpp"
    # llama-server closes a kept-alive connection after 5 s idle; vLLM's client would reuse it and meet
    # "Server disconnected" under load: one connection per request instead
    headers = ("Connection=close",)
    threads: int | None = None  # llama-server's --threads (default: every core this process may use)

    def check_installed(self) -> None:
        from .llamacpp import find_program

        find_program("llama-server")
        super().check_installed()

    def version(self) -> str:
        import importlib.metadata

        try:
            return "llama-cpp-python " + importlib.metadata.version("llama-cpp-python") + " sources"
        except importlib.metadata.PackageNotFoundError:
            return ""

    def candidates(self, args: Any, settings: LoadSettings) -> list[Candidate]:
        from .gguf import check_type

        if args.shape:
            raise ServerError(
                "--engine llama.cpp serves GGUF files exported from real weights; --shape (random weights) works "
                "with --engine vllm or transformers. Give --model."
            )
        if settings.tensor_parallel_size != 1:
            raise ServerError("--tensor-parallel-size is a vLLM option; llama-server runs on one device here.")
        check_type(args.gguf_type)
        self.gguf_type, self.threads = args.gguf_type, args.threads
        settings.dtype = self.gguf_type  # what the served weights are
        return super().candidates(args, settings)

    def prepare(self, c: Candidate, args: Any, settings: LoadSettings, work: Path) -> None:
        from ..core.loading import load
        from .gguf import export_gguf

        target = work / "models" / f"{safe_name(c.label)}.{self.gguf_type}.gguf"
        target.parent.mkdir(parents=True, exist_ok=True)
        source = c.source if c.source not in ("base", "plan") else self.model_id
        model, tokenizer = load(source, dtype="fp32", plan=None if c.plan == "base" or c.folder else c.plan)
        export_gguf(model, tokenizer, target, type=self.gguf_type, overwrite=True)
        del model
        c.folder = c.folder or Path(resolve(self.model_id))  # the tokenizer the client counts tokens with
        c.served = target

    def command(self, c: Candidate, settings: LoadSettings) -> list[str]:
        from .llamacpp import find_program

        slots = max(settings.levels)
        threads = self.threads or len(os.sched_getaffinity(0))
        return [
            str(find_program("llama-server")),
            "--model",
            str(c.served),
            "--host",
            HOST,
            "--port",
            str(c.port),
            "--alias",
            c.label,
            "--parallel",
            str(slots),
            "--ctx-size",
            str(settings.max_model_len * slots),  # llama-server splits the context among its slots
            "--threads",
            str(threads),
            "--threads-batch",
            str(threads),
            "--seed",
            "0",
        ]

    def env(self, settings: LoadSettings) -> dict[str, str]:
        return dict(os.environ)

    def extra_measurements(self, candidates: list[Candidate], settings: LoadSettings) -> dict[str, Any]:
        """llama-bench's prompt (pp) and generation (tg) speed of every GGUF, in one call: the models run in
        turns inside it, --repeats repetitions each (llama.cpp's own mean and standard deviation)."""
        import json
        import subprocess

        from .llamacpp import find_program

        threads = self.threads or len(os.sched_getaffinity(0))
        argv = [str(find_program("llama-bench"))]
        for c in candidates:
            argv += ["-m", str(c.served)]
        argv += ["-p", str(settings.prompt), "-n", str(settings.new), "-t", str(threads)]
        argv += ["-r", str(settings.repeats), "-o", "json"]
        out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=3600).stdout
        label = {str(c.served): c.label for c in candidates}
        rows = json.loads(out[out.index("[") : out.rindex("]") + 1])
        return {
            "llama_bench": [
                {
                    "model": label.get(r["model_filename"], r["model_filename"]),
                    "test": f"pp{r['n_prompt']}" if r["n_prompt"] else f"tg{r['n_gen']}",
                    "threads": r["n_threads"],
                    "tok_s": r["avg_ts"],
                    "stddev_tok_s": r["stddev_ts"],
                }
                for r in rows
            ]
        }


def save_lp_folder(model: str, plan: str, dtype: str, work: Path) -> Path:
    """Load `model`, apply `plan`, save it: one model in memory, the folder vLLM serves."""
    from ..core.loading import load, save

    folder = work / "models" / safe_name(plan)
    loaded, tokenizer = load(model, dtype=dtype, plan=plan)
    save(loaded, tokenizer, folder)
    return folder


def copy_tokenizer(source: Path, folder: Path) -> None:
    for name in (*TOKENIZER_FILES, "special_tokens_map.json", "chat_template.jinja", "merges.txt"):
        if (source / name).is_file():
            shutil.copy(source / name, folder / name)


def engine_for(name: str) -> Engine:
    return {"vllm": VLLMEngine, "llama.cpp": LlamaCppEngine}[name]()
