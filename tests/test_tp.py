"""Tensor parallelism on CPU: 2 gloo processes against the single-process model.

Two launches of 2 ranks run at once (module fixture). One runs every equivalence case in both
ranks, writes JSON for the tests to read, then has rank 1 killed while rank 0 waits in an
all-reduce; the other has rank 1 frozen (SIGSTOP). Rank 0 must stop with an error: at once for a
killed peer (gloo sees the closed connection), after --tp-timeout for a frozen one. This file is
also the worker: `python tests/test_tp.py equivalence OUT TIMEOUT` / `... hang TIMEOUT`, run with
torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT).

Tolerance: fp32 logits of the sharded model equal the single-process model to 1e-5 relative
(sums are split across ranks, so only the float rounding order differs); greedy tokens exactly.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers.tiny import tiny_config, tiny_model

import truedepth
from truedepth.runtime.distributed import tp
from truedepth.runtime.distributed.errors import RankFailureError
from truedepth.utils.errors import MissingAssetError

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent
WORLD = 2
LAYERS = 8
REL_TOL = 1e-5
# (name, arch, plan, config overrides): base, pairs, a group of 3 with Qwen3's per-head norms,
# biases with a skip, tied embeddings
CASES = [
    ("llama-base", "llama", "base", {}),
    ("llama-pairs", "llama", "parallel=2:6", {}),
    ("qwen3-triples", "qwen3", "parallel=1:7/3", {}),
    ("qwen2-pairs-skip", "qwen2", "parallel=2:6,skip=7", {}),
    ("llama-tied-pairs", "llama", "parallel=0:8", {"tie_word_embeddings": True}),
]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# =============================================================================================
# Workers (run in the spawned processes)
# =============================================================================================
def greedy(model, ids, **kw):
    return model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=8,
        min_new_tokens=8,
        pad_token_id=0,
        **kw,
    )


def shard_report(model, ref) -> dict:
    """Shard sizes of layer 0's q_proj against the unsharded model, and whether any shard keeps a
    larger (full) tensor alive behind it."""
    from torch.distributed.tensor import DTensor

    def local(p):
        return p.to_local() if isinstance(p, DTensor) else p

    hidden_full = [
        name
        for name, p in model.named_parameters()
        if local(p).untyped_storage().nbytes() != local(p).numel() * local(p).element_size()
    ]
    return {
        "q_rows": local(model.model.layers[0].self_attn.q_proj.weight).shape[0],
        "q_rows_full": ref.model.layers[0].self_attn.q_proj.weight.shape[0],
        "storage_larger_than_shard": hidden_full,
    }


@torch.no_grad()
def equivalence_worker(out_dir: str, timeout_s: float) -> None:
    from truedepth.measure.bench.tp_bench import count_decode_all_reduces, tp_bench

    torch.set_num_threads(1)
    mesh = tp.init_distributed(timeout_s=timeout_s)
    results = {}
    for (name, arch, plan, overrides), impl in itertools.product(CASES, tp.IMPLEMENTATIONS):
        ref = tiny_model(arch, layers=LAYERS, seed=0, **overrides)  # same seed: same weights on every rank
        if plan != "base":
            truedepth.apply_plan(ref, plan)
        ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))
        want = ref(ids).logits
        want_tokens = greedy(ref, ids)
        model = copy.deepcopy(ref)
        tp.parallelize_tp(model, mesh, impl)
        with tp.AllReduceCounter() as counter:
            got = model(ids).logits
        prefill, step = count_decode_all_reduces(model, ids)
        results[f"{name}/{impl}"] = {
            "rel_err": rel_err(got, want),
            "max_abs": (got - want).abs().max().item(),
            "tokens_equal": bool(torch.equal(greedy(model, ids), want_tokens)),
            "static_tokens_equal": bool(torch.equal(greedy(model, ids, cache_implementation="static"), want_tokens)),
            "all_reduces_forward": counter.all_reduces,
            "other_collectives": counter.total - counter.all_reduces,
            "all_reduces_prefill": prefill,
            "all_reduces_decode_step": step,
            "depth": len(model.model.layers),
            "tied": model.lm_head.weight is model.model.embed_tokens.weight,
            **shard_report(model, ref),
        }
    bench = tp_bench(
        _bench_config(),
        ["base", "parallel=2:6"],
        impls=tp.IMPLEMENTATIONS,
        prompt_tokens=6,
        new_tokens=3,
        warmup=1,
        timeout_s=timeout_s,
        progress=False,
    )
    (Path(out_dir) / f"rank{tp.rank()}.json").write_text(json.dumps({"cases": results, "bench": bench}))
    tp.quiet_other_ranks()
    print(f"printed by rank {tp.rank()}", flush=True)
    wait_to_fail(model, timeout_s)


def _bench_config():
    config = tiny_config("llama", LAYERS)
    config._attn_implementation = "sdpa"
    return config


@torch.no_grad()
def hang_worker(timeout_s: float) -> None:
    torch.set_num_threads(1)
    mesh = tp.init_distributed(timeout_s=timeout_s)
    wait_to_fail(tp.parallelize_tp(tiny_model("llama", layers=2), mesh), timeout_s)


def wait_to_fail(model, timeout_s: float) -> None:
    """Rank 1 idles until the test kills or freezes it; rank 0 starts a forward pass (whose
    all-reduces need rank 1) when the test writes a line to its stdin, and must stop with an error."""
    ids = torch.randint(3, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    print("ready", file=sys.__stdout__, flush=True)  # sys.__stdout__: rank 1's stdout may be silenced
    if tp.rank() != 0:
        time.sleep(600)
        sys.exit(0)
    sys.stdin.readline()
    started = time.monotonic()
    try:
        with tp.explain_rank_failures(timeout_s):
            model(ids)
    except RankFailureError as e:
        print(f"stopped after {time.monotonic() - started:.2f} s: {e}", file=sys.stderr, flush=True)
        sys.exit(3)
    sys.exit(0)  # the forward pass finished without rank 1: the test fails on the exit code


# =============================================================================================
# Launch helpers: the ranks are started by hand with torchrun's environment, so that a test can
# kill or freeze one of them (torchrun itself would tear the group down on a death).
# =============================================================================================
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict:
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(REPO / "src"), str(HERE.parent), os.environ.get("PYTHONPATH", "")]),
    )
    env.update(extra)
    return env


def start_ranks(*worker_args: str) -> list[subprocess.Popen]:
    port = str(free_port())
    procs = []
    for r in range(WORLD):
        env = child_env(
            RANK=str(r),
            LOCAL_RANK=str(r),
            WORLD_SIZE=str(WORLD),
            LOCAL_WORLD_SIZE=str(WORLD),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, str(HERE), *worker_args],
                cwd=REPO,
                env=env,
                text=True,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        )
    return procs


def read_until_ready(proc: subprocess.Popen) -> str:
    """Everything the rank printed to stdout before its "ready" line (EOF: it crashed)."""
    lines = []
    for line in proc.stdout:
        if line.strip() == "ready":
            return "".join(lines)
        lines.append(line)
    raise AssertionError(
        f"rank exited with {proc.wait()} before it was ready:\n{''.join(lines)[-2000:]}\n{proc.stderr.read()[-6000:]}"
    )


def fail_one_rank(procs: list[subprocess.Popen], how: str, limit_s: float) -> dict:
    """Let rank 0 start a forward pass, kill or freeze rank 1, and wait for rank 0 to give up."""
    try:
        outputs = [read_until_ready(p) for p in procs]
        procs[0].stdin.write("go\n")
        procs[0].stdin.flush()
        time.sleep(0.5)  # rank 0 is now waiting inside an all-reduce for rank 1
        os.kill(procs[1].pid, signal.SIGKILL if how == "killed" else signal.SIGSTOP)
        started = time.monotonic()
        try:
            _, err = procs[0].communicate(timeout=limit_s)
        except subprocess.TimeoutExpired:
            pytest.fail(f"rank 0 still waiting {limit_s:.0f} s after rank 1 was {how}")
        return {
            "stdout": outputs,
            "stderr": err,
            "returncode": procs[0].returncode,
            "waited": time.monotonic() - started,
        }
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()


EQUIVALENCE_TIMEOUT_S = 60.0  # long: the test machine may be loaded; the kill is seen at once anyway
HANG_TIMEOUT_S = 15.0  # also bounds the start-up skew between the two ranks (rendezvous); waited in parallel


@pytest.fixture(scope="module")
def tp_run(tmp_path_factory):
    """Both launches start together (the hang test's waiting overlaps the equivalence work)."""
    out = tmp_path_factory.mktemp("tp")
    equivalence = start_ranks("equivalence", str(out), str(EQUIVALENCE_TIMEOUT_S))
    hang = start_ranks("hang", str(HANG_TIMEOUT_S))
    frozen = fail_one_rank(hang, "frozen", HANG_TIMEOUT_S + 60)
    killed = fail_one_rank(equivalence, "killed", EQUIVALENCE_TIMEOUT_S + 60)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]
    return {"ranks": ranks, "stdout": killed["stdout"], "failures": {"killed": killed, "frozen": frozen}}


# =============================================================================================
# Equivalence, counts, memory (2 processes)
# =============================================================================================
RUNS = [f"{c[0]}/{impl}" for c in CASES for impl in tp.IMPLEMENTATIONS]


@pytest.mark.parametrize("case", RUNS)
def test_sharded_logits_and_greedy_tokens_equal_single_process(tp_run, case):
    for rank in tp_run["ranks"]:
        r = rank["cases"][case]
        assert r["rel_err"] <= REL_TOL, r
        print(f"{case}: logits rel err {r['rel_err']:.1e}, max abs {r['max_abs']:.1e}")
        assert r["tokens_equal"] and r["static_tokens_equal"], r


@pytest.mark.parametrize("case", RUNS)
def test_all_reduces_per_forward_are_two_per_layer(tp_run, case):
    _, _, plan, _ = next(c for c in CASES if c[0] == case.split("/")[0])
    depth = truedepth.Plan.parse(plan).depth(LAYERS)
    for rank in tp_run["ranks"]:
        r = rank["cases"][case]
        assert r["depth"] == depth
        assert r["all_reduces_forward"] == r["all_reduces_prefill"] == r["all_reduces_decode_step"] == 2 * depth
        assert r["other_collectives"] == 0  # embeddings and LM head stay whole: no gather


def test_all_reduce_count_follows_paper_formula_for_pairs(tp_run):
    """L layers, a parallel range of delta layers in pairs: 2·(L − delta/2) all-reduces."""
    for (case, delta), impl in itertools.product(
        (("llama-base", 0), ("llama-pairs", 4), ("llama-tied-pairs", 8)), tp.IMPLEMENTATIONS
    ):
        assert tp_run["ranks"][0]["cases"][f"{case}/{impl}"]["all_reduces_forward"] == 2 * (LAYERS - delta // 2)


def test_each_rank_holds_only_its_slice(tp_run):
    for rank in tp_run["ranks"]:
        for case, r in rank["cases"].items():
            assert r["q_rows"] * WORLD == r["q_rows_full"], case
            assert r["storage_larger_than_shard"] == [], case  # no hidden full copy behind a shard
        assert (
            rank["cases"]["llama-tied-pairs/dtensor"]["tied"] and rank["cases"]["llama-tied-pairs/local"]["tied"]
        )  # moving to the device kept the tie


def test_tp_bench_reports_latency_counts_and_share(tp_run):
    for rank in tp_run["ranks"]:
        bench = rank["bench"]
        assert bench["world_size"] == WORLD and bench["backend"] == "gloo"
        rows = {(r["impl"], r["plan"]): r for r in bench["results"]}
        assert set(rows) == {(i, p) for i in tp.IMPLEMENTATIONS for p in ("base", "parallel=2:6")}
        for impl in tp.IMPLEMENTATIONS:
            assert rows[impl, "base"]["all_reduces_per_token"] == 2 * LAYERS
            assert rows[impl, "parallel=2:6"]["all_reduces_per_token"] == 2 * (LAYERS - 2)
        for r in rows.values():
            assert r["all_reduces_per_token"] == r["expected_all_reduces"]
            assert r["ms_per_token"] > 0 and 0 <= r["all_reduce_share"] <= 1
        assert bench["all_reduce_ms"] > 0
    # every rank returns the same numbers (the slowest rank's time)
    assert tp_run["ranks"][0]["bench"]["results"] == tp_run["ranks"][1]["bench"]["results"]


def test_only_rank0_prints(tp_run):
    assert "printed by rank 0" in tp_run["stdout"][0]
    assert tp_run["stdout"][1] == ""  # rank 1's stdout was silenced


# =============================================================================================
# A dead or frozen rank stops the others within the timeout
# =============================================================================================
@pytest.mark.parametrize("how, timeout_s", [("killed", EQUIVALENCE_TIMEOUT_S), ("frozen", HANG_TIMEOUT_S)])
def test_dead_or_hung_rank_stops_the_others_with_an_error(tp_run, how, timeout_s):
    result = tp_run["failures"][how]
    err = result["stderr"]
    assert result["returncode"] == 3, err[-3000:]
    assert "another rank died or stopped responding" in err, err[-3000:]
    assert f"--tp-timeout {timeout_s:g} s" in err
    stopped = float(re.search(r"stopped after ([0-9.]+) s", err)[1])  # rank 0's own clock, around model(ids)
    if how == "killed":  # a closed connection is seen at once, long before the timeout
        assert stopped < timeout_s / 2, err[-3000:]
    else:  # a frozen rank keeps its connection open: only the timeout can end the wait, and it does
        assert 0.8 * timeout_s <= stopped <= timeout_s + 30, err[-3000:]
    assert result["waited"] <= stopped + 30  # and rank 0 exits soon after giving up


# =============================================================================================
# Up-front validation (single process, no process group)
# =============================================================================================
def test_validation_names_layer_and_valid_world_sizes():
    model = tiny_model("llama", layers=4)  # 4 heads, 2 KV heads, intermediate 96
    with pytest.raises(tp.TPError) as e:
        tp.validate_tp(model, 4)
    msg = str(e.value)
    assert "layer 0" in msg and "KV heads 2" in msg and "attention heads" not in msg
    assert "Valid world sizes for this model and plan: 1, 2." in msg and "--nproc_per_node=2" in msg
    with pytest.raises(tp.TPError, match=r"attention heads 4, KV heads 2 \(3 more layers too\)"):
        tp.validate_tp(model, 3)
    tp.validate_tp(model, 2)  # fine


def test_validation_depends_on_the_plan():
    """SmolLM2-like: 3 heads / 1 KV head shard over no ranks, its pairs (6 / 2) over 2."""
    config = dict(hidden_size=48, num_attention_heads=3, num_key_value_heads=1)
    model = tiny_model("llama", layers=8, **config)
    truedepth.apply_plan(model, "parallel=0:6")
    with pytest.raises(
        tp.TPError,
        match=r"cannot split layer 3 \(original layer 6\).*Valid world sizes for this "
        r"model and plan: 1\.",
    ):
        tp.validate_tp(model, 2)
    all_wide = tiny_model("llama", layers=8, **config)
    truedepth.apply_plan(all_wide, "parallel=0:8")
    tp.validate_tp(all_wide, 2)
    # the same answers from the config alone, before any model exists
    with pytest.raises(tp.TPError, match=r"layer 3 \(original layer 6\)"):
        tp.validate_tp(tiny_config("llama", 8, **config), 2, "parallel=0:6")
    tp.validate_tp(tiny_config("llama", 8, **config), 2, "parallel=0:8")


def test_wide_layer_is_named_with_its_original_layers():
    model = tiny_model("llama", layers=8, hidden_size=96, num_attention_heads=6, num_key_value_heads=3)
    truedepth.apply_plan(model, "parallel=0:4/2,parallel=4:7/3")  # widths 2, 2, 3, 1
    with pytest.raises(tp.TPError, match=r"layer 0 \(wide: original layers 0, 1 in parallel\).*KV heads 6"):
        tp.validate_tp(model, 4)


def test_load_model_checks_before_loading_anything(tmp_path, monkeypatch):
    tiny_model("llama", layers=4).save_pretrained(tmp_path)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")

    def must_not_run(*a, **k):
        raise AssertionError("validation must come before joining the group or loading weights")

    monkeypatch.setattr(tp, "init_distributed", must_not_run)
    monkeypatch.setattr("truedepth.core.loading.load", must_not_run)
    on = tp.TPOptions(enabled=True, timeout_s=5.0)
    with pytest.raises(tp.TPError, match="over 3 ranks cannot split layer 0.*Valid world sizes .*: 1, 2"):
        tp.load_model(str(tmp_path), "parallel=0:2", tp=on)
    with pytest.raises(tp.TPError, match="over 3 ranks"):
        tp.maybe_shard(tiny_model("llama", layers=4), on)


def test_tp_outside_torchrun_says_how_to_launch(monkeypatch):
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(tp.TPError, match=r"torchrun --nproc_per_node=N -m truedepth"):
        tp.maybe_shard(tiny_model("llama", layers=2), tp.TPOptions(enabled=True, timeout_s=5.0))
    model = tiny_model("llama", layers=2)
    assert tp.maybe_shard(model, tp.TPOptions()) is model  # no --tp: untouched


def test_cli_options_and_bad_values():
    from truedepth.utils.options import add_options, from_args

    parser = argparse.ArgumentParser()
    add_options(parser, tp.TPOptions)
    args = parser.parse_args(["--tp", "--tp-timeout", "30"])
    assert from_args(tp.TPOptions, args) == tp.TPOptions(enabled=True, timeout_s=30.0, impl=tp.DEFAULT_IMPL)
    assert from_args(tp.TPOptions, parser.parse_args([])) == tp.TPOptions() and not tp.TPOptions().enabled
    with pytest.raises(tp.TPError, match="conflicts with --tp"):
        tp.rank_device("cuda:1")
    with pytest.raises(tp.TPError, match="positive number of seconds"):
        tp.init_distributed(timeout_s=0)


def test_default_lp_plan_matches_the_paper_range_for_7b():
    from truedepth.measure.bench.tp_bench import default_lp_plan

    assert default_lp_plan(32) == "parallel=16:30"  # Llama-2-7B, delta 14
    for layers in (4, 8, 24, 30):
        truedepth.Plan.parse(default_lp_plan(layers)).validate(layers)


# =============================================================================================
# The real default model through the commands' loader (3 ranks: it has 9 heads / 3 KV heads)
# =============================================================================================
PROMPT = "The capital of France is"
DEFAULT_PLAN = "parallel=16:28"  # wide layers: 18 heads / 6 KV heads, also divisible by 3


@torch.no_grad()
def default_model_worker(out_file: str) -> None:
    from truedepth.core.loading import ModelOptions, PlanOption
    from truedepth.utils.options import add_options, from_args

    torch.set_num_threads(1)
    parser = argparse.ArgumentParser()
    for group in (ModelOptions, PlanOption, tp.TPOptions):
        add_options(parser, group)
    args = parser.parse_args(["--tp", "--plan", DEFAULT_PLAN, "--device", "cpu", "--tp-timeout", "120"])
    model, tokenizer = tp.load_model(args.model, args.plan, args.dtype, args.device, from_args(tp.TPOptions, args))
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    print(json.dumps(out[0].tolist()))  # rank 0 only: the other ranks' stdout is silenced
    if tp.is_main():
        Path(out_file).write_text(json.dumps(out[0].tolist()))


@pytest.mark.integration
def test_default_model_sharded_over_3_ranks_generates_the_same_tokens(tmp_path):
    try:
        model, tokenizer = truedepth.load("default", plan=DEFAULT_PLAN)
    except MissingAssetError as e:
        pytest.skip(str(e))
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)[0].tolist()
    out = tmp_path / "tokens.json"
    cmd = [
        str(Path(sys.executable).with_name("torchrun")),
        "--standalone",
        "--nproc_per_node=3",
        str(HERE),
        "default-model",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert json.loads(out.read_text()) == want
    assert proc.stdout.count(json.dumps(want)) == 1  # printed by rank 0 only


# =============================================================================================
if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "equivalence":
        equivalence_worker(sys.argv[2], float(sys.argv[3]))
    elif mode == "hang":
        hang_worker(float(sys.argv[2]))
    elif mode == "default-model":
        default_model_worker(sys.argv[2])
    else:
        raise SystemExit(f"unknown worker mode {mode!r}")
