"""Saved truedepth models served by stock vLLM (CPU build) through truedepth's plugin.

vLLM runs in subprocesses (tests/helpers/vllm_worker.py; `vllm serve` is tested in
tests/test_vllm_serving.py): its engine starts worker processes with `spawn`. Engines run in eager
mode with a 1 GiB KV cache; tensor parallelism binds one core per rank. The worker runs the engine
core in its own process (VLLM_ENABLE_V1_MULTIPROCESSING=0) and single-rank engines with the "uni"
executor, so no engine costs two spawned processes that each import vLLM again (about 15 s of the
20 s an engine took); tensor parallelism keeps one spawned worker per rank. The reference is the transformed
transformers model, teacher-forced on vLLM's tokens:
up to the first position where either side's top two log-probabilities differ by less than
NEAR_TIE, greedy tokens must be equal and the chosen tokens' log-probabilities within LOGPROB_TOL.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.tiny import tiny_model

import truedepth
from truedepth.deploy.vllm import ServingError, check_config, check_servable

pytestmark = pytest.mark.slow

NEAR_TIE = 1e-3
LOGPROB_TOL = 1e-3
NEW_TOKENS = 32
WORKER = Path(__file__).parent / "helpers" / "vllm_worker.py"
TINY_PROMPTS = [[1, 5, 9, 20, 33, 7], [1, 90, 4, 61], [1, 17, 17, 100, 3, 45, 12, 8]]
DEFAULT_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "Water boils at a temperature of",
]
# Tiny models whose heads, KV heads and MLP (4, 2, 96) and wide layers divide by 2; head_dim 32
# because vLLM's CPU attention has no kernel for 16. Every plan kind appears at least once.
TINY = {
    "llama": ("llama", "parallel=1:3,parallel=4:7/3"),
    "qwen3": ("qwen3", "parallel=1:3,parallel=4:7/3"),
    "qwen2": ("qwen2", "parallel=0:2,skip=2,merge=3:5,shuffle=5:8@1"),
    "mistral": ("mistral", "shuffle=0:4@2,parallel=4:7/3"),
    "identity": ("llama", "shuffle=0:1"),  # every layer in place, yet a truedepth model
    "plain": ("llama", None),  # the same weights, served by vLLM's own Llama
}
TP2 = ("llama", "qwen3")


def vllm_env(tensor_parallel_size: int = 1, in_process: bool = False) -> dict[str, str]:
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_LOGGING_LEVEL="WARNING", TOKENIZERS_PARALLELISM="false")
    if in_process:  # the engine core in the worker process itself, not in a spawned one
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if tensor_parallel_size > 1:  # one core per rank: the CPU build cannot bind 2 ranks to 1 NUMA node otherwise
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i) for i in range(tensor_parallel_size))
    return env


def run_engines(specs: list[dict], workdir: Path, tensor_parallel_size: int = 1, timeout: float = 420) -> list[dict]:
    """Run the specs in one worker process; one result (or error) per spec. The engine core runs in
    that process; a single-rank engine's model too (executor "uni"), unless a spec names another."""
    workdir.mkdir(parents=True, exist_ok=True)
    for spec in specs:
        spec.setdefault("tensor_parallel_size", tensor_parallel_size)
        if spec["tensor_parallel_size"] == 1:
            spec.setdefault("executor", "uni")
    spec_path, out_path, log_path = workdir / "specs.json", workdir / "out.json", workdir / "log.txt"
    spec_path.write_text(json.dumps(specs))
    with open(log_path, "w") as log:
        proc = subprocess.run(
            [sys.executable, str(WORKER), str(spec_path), str(out_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=vllm_env(tensor_parallel_size, in_process=True),
            timeout=timeout,
        )
    if proc.returncode != 0 or not out_path.exists():
        raise AssertionError(f"vLLM worker failed ({proc.returncode}):\n{log_path.read_text()[-4000:]}")
    return json.loads(out_path.read_text())


def outputs(result: dict) -> list[dict]:
    assert "error" not in result, result.get("error")
    return result["outputs"]


@torch.no_grad()
def reference(model, prompt: list[int], tokens: list[int]) -> dict:
    """transformers teacher-forced on vLLM's continuation: its greedy choice, the log-probability
    of vLLM's token and its top-2 gap, at every generated position."""
    ids = torch.tensor([prompt + tokens])
    logprobs = model(ids).logits[0, len(prompt) - 1 : -1].float().log_softmax(-1)
    top2 = logprobs.topk(2, dim=-1).values
    return {
        "tokens": logprobs.argmax(-1).tolist(),
        "logprobs": logprobs[range(len(tokens)), tokens].tolist(),
        "gaps": (top2[:, 0] - top2[:, 1]).tolist(),
    }


def agreement(ours: dict, theirs: dict) -> dict:
    """Compare two greedy continuations up to the first near-tie of either side."""
    n = len(ours["tokens"])
    cut = next((i for i in range(n) if min(ours["gaps"][i], theirs["gaps"][i]) < NEAR_TIE), n)
    diffs = [abs(a - b) for a, b in zip(ours["logprobs"][:cut], theirs["logprobs"][:cut])]
    first_diff = next((i for i in range(n) if ours["tokens"][i] != theirs["tokens"][i]), None)
    return {
        "near_tie": cut if cut < n else None,
        "gap": min(ours["gaps"][cut], theirs["gaps"][cut]) if cut < n else None,
        "first_token_difference": first_diff,
        "max_logprob_diff": max(diffs, default=0.0),
        "equal_before_tie": ours["tokens"][:cut] == theirs["tokens"][:cut],
    }


def assert_agree(label: str, ours: dict, theirs: dict) -> dict:
    report = agreement(ours, theirs)
    print(f"{label}: {json.dumps(report)}")
    assert report["equal_before_tie"], f"{label}: tokens differ before the first near-tie: {report}"
    assert report["max_logprob_diff"] <= LOGPROB_TOL, f"{label}: {report}"
    return report


# ---------------------------------------------------------------------------------------------
# Tiny random models: every plan kind, four architectures, tensor-parallel size 1 and 2
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    models = {}
    for name, (arch, plan) in TINY.items():
        # std 0.1: a peaked next-token distribution, so near-ties are rare
        model = tiny_model(arch, layers=8, seed=1, head_dim=32, initializer_range=0.1)
        if plan:
            truedepth.apply_plan(model, plan)
        model.save_pretrained(root / name)
        models[name] = model
    return root, models


def tiny_specs(root: Path, names) -> list[dict]:
    return [
        {"model": str(root / n), "prompts": TINY_PROMPTS, "max_tokens": NEW_TOKENS, "tokenizer": False} for n in names
    ]


@pytest.fixture(scope="module")
def one_rank_runs(tiny_models, bad_folders, tmp_path_factory):
    """Every single-rank engine of the module's tiny models, then the folders vLLM must refuse, in one
    worker process: ({name: result}, [results of bad_specs])."""
    root, _ = tiny_models
    results = run_engines(tiny_specs(root, TINY) + bad_specs(bad_folders), tmp_path_factory.mktemp("one-rank"))
    return dict(zip(TINY, results)), results[len(TINY) :]


@pytest.fixture(scope="module")
def tp2_runs(tiny_models, tmp_path_factory):
    root, _ = tiny_models
    return dict(zip(TP2, run_engines(tiny_specs(root, TP2), tmp_path_factory.mktemp("tp2"), tensor_parallel_size=2)))


@pytest.mark.parametrize("name", [n for n in TINY if n != "plain"])
def test_any_plan_serves_like_transformers(tiny_models, one_rank_runs, name):
    _, models = tiny_models
    for k, (prompt, out) in enumerate(zip(TINY_PROMPTS, outputs(one_rank_runs[0][name]))):
        assert len(out["tokens"]) == NEW_TOKENS
        assert_agree(f"{name} {TINY[name][1]} prompt {k}", out, reference(models[name], prompt, out["tokens"]))


def test_identity_plan_through_plugin_equals_vllms_own_llama(tiny_models, one_rank_runs):
    ours, own = outputs(one_rank_runs[0]["identity"]), outputs(one_rank_runs[0]["plain"])
    assert json.loads((tiny_models[0] / "plain/config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    for a, b in zip(ours, own):
        assert a["tokens"] == b["tokens"]
        assert max(abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"])) <= 1e-6


@pytest.mark.parametrize("name", TP2)
def test_tensor_parallel_2_equals_1(one_rank_runs, tp2_runs, name):
    for k, (one, two) in enumerate(zip(outputs(one_rank_runs[0][name]), outputs(tp2_runs[name]))):
        assert_agree(f"{name} TP2 vs TP1 prompt {k}", two, one)


def test_config_and_model_classes_pickle_by_module_path():
    """vLLM pickles the config into its engine process: the classes must be found by name."""
    model = truedepth.apply_plan(tiny_model("qwen3", layers=4, head_dim=32), "parallel=0:2")
    config = pickle.loads(pickle.dumps(model.config))
    assert type(config) is type(model.config) and config.truedepth == model.config.truedepth
    assert pickle.loads(pickle.dumps(type(model))) is type(model)


# ---------------------------------------------------------------------------------------------
# Bad input: refused before any weight loads, with the fix in the message
# ---------------------------------------------------------------------------------------------
def edited_copy(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    edit(config)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.fixture(scope="module")
def bad_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    model = truedepth.apply_plan(tiny_model("llama", layers=4, head_dim=32), "parallel=1:4/3")
    model.save_pretrained(root / "lp")  # its wide layer: 12 heads, 6 KV heads, MLP 288
    return {
        "lp": root / "lp",
        "not_truedepth": edited_copy(
            root / "lp", root / "not_truedepth", lambda c: (c.pop("truedepth"), c.update(model_type="llama"))
        ),
        "unsupported": edited_copy(
            root / "lp",
            root / "unsupported",
            lambda c: c.update(model_type="truedepth_gemma2", architectures=["TrueDepthGemma2ForCausalLM"]),
        ),
    }


def bad_specs(bad_folders) -> list[dict]:
    return [
        {"model": str(bad_folders["lp"]), "tensor_parallel_size": 4, "prompts": [[1]], "tokenizer": False},
        {"model": str(bad_folders["not_truedepth"]), "prompts": [[1]], "tokenizer": False},
        {"model": str(bad_folders["unsupported"]), "prompts": [[1]], "tokenizer": False},
    ]


def test_vllm_refuses_bad_input_before_loading(one_rank_runs):
    world, plain, unsupported = (r.get("error", "") for r in one_rank_runs[1])  # run after the tiny engines
    assert "tensor-parallel size 4 does not divide layer 1" in world and "valid sizes for this model: 1, 2." in world
    assert "12 heads, 6 KV heads, MLP size 288" in world
    assert "is not a truedepth model" in plain and "truedepth.save" in plain
    # vLLM reads config.json with transformers before any plugin code runs: its message names the type
    assert "truedepth_gemma2" in unsupported


def test_check_servable_names_the_problem(bad_folders, tmp_path):
    assert [s.width for s in check_servable(bad_folders["lp"], 2)] == [1, 3]
    with pytest.raises(ServingError, match=r"layer 1 .*valid sizes for this model: 1, 2\.$"):
        check_servable(bad_folders["lp"], 4)
    with pytest.raises(ServingError, match="is not a truedepth model"):
        check_servable(bad_folders["not_truedepth"])
    with pytest.raises(ServingError, match="model type 'gemma2' is not supported .* llama, mistral, qwen2, qwen3"):
        check_servable(bad_folders["unsupported"])
    with pytest.raises(ServingError, match="has no config.json"):
        check_servable(tmp_path)


def test_default_model_shape_lists_the_sizes_that_divide_every_layer():
    config = {
        "model_type": "truedepth_llama",
        "num_hidden_layers": 26,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "intermediate_size": 1536,
        "truedepth": {"layer_widths": [1] * 20 + [2] * 4 + [1] * 2},
    }
    with pytest.raises(
        ServingError, match=r"size 2 does not divide layer 0 .*9 heads, 3 KV heads.*sizes for this model: 1, 3\."
    ):
        check_config(config, 2)
    assert len(check_config(config, 3)) == 26


# ---------------------------------------------------------------------------------------------
# The offline default model, parallel=20:28: Python API and OpenAI-compatible server
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def default_lp(tmp_path_factory):
    folder = tmp_path_factory.mktemp("default-lp")
    model, tokenizer = truedepth.load("default", dtype="fp32", plan="parallel=20:28")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model, tokenizer


@pytest.mark.integration
def test_default_model_lp_greedy_matches_transformers(default_lp, tmp_path):
    folder, model, tokenizer = default_lp
    prompts = [tokenizer(p)["input_ids"] for p in DEFAULT_PROMPTS]
    spec = {"model": str(folder), "prompts": prompts, "max_tokens": NEW_TOKENS, "tokenizer": True}
    reports = []
    for prompt, text, out in zip(prompts, DEFAULT_PROMPTS, outputs(run_engines([spec], tmp_path)[0])):
        reports.append(assert_agree(f"default parallel=20:28 {text!r}", out, reference(model, prompt, out["tokens"])))
    assert sum(r["near_tie"] is None for r in reports) >= 1  # some prompt must be compared over all 32 tokens
