"""The research scripts still in scripts/research/ run against today's library, on a tiny model.

They import library internals, so a move in the library breaks them silently unless something runs
them (search_depth28_check.py had broken that way). One-off scripts whose numbers are recorded
are archived next to their logs in docs/research/ instead, and are not run (docs/research/README.md).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
LSQ = ROOT / "scripts" / "research" / "lsq_repair.py"
PLAN = "parallel=2:6"  # 8 layers -> keep 0, keep 1, wide(2,3), wide(4,5), keep 6, keep 7
pytestmark = pytest.mark.slow  # each test starts a Python process that imports torch and transformers


def test_every_research_script_is_smoke_tested_or_archived():
    """A script added to scripts/research/ needs a test here; a finished one moves next to its log."""
    assert sorted(p.name for p in (ROOT / "scripts" / "research").glob("*.py")) == ["lsq_repair.py", "vllm_profile.py"]


def text_file(path: Path, seed: int, chars: int = 4000) -> Path:
    g = torch.Generator().manual_seed(seed)
    words = ["the", "a", "lady", "said", "Mr.", "Darcy", "was", "not", "very", "happy", "ball", "and", "\n"]
    path.write_text(" ".join(words[i] for i in torch.randint(len(words), (chars // 4,), generator=g).tolist()))
    return path


@pytest.fixture
def texts(tmp_path):
    return {name: text_file(tmp_path / f"{name}.txt", i) for i, name in enumerate(("train", "held", "other"))}


def lsq_repair(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TRUEDEPTH_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, str(LSQ), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )


def test_lsq_repair_lowers_the_error_of_the_first_wide_layer_on_its_calibration_text(tiny_dir, texts, tmp_path):
    import truedepth
    from truedepth.measure.eval.data import load_text
    from truedepth.measure.eval.perplexity import tokenize

    out = tmp_path / "repaired"
    res = lsq_repair(
        tmp_path,
        "--model",
        str(tiny_dir),
        "--plan",
        PLAN,
        "--data",
        str(texts["train"]),
        "--tokens",
        "1024",
        "--eval-tokens",
        "512",
        "--eval-text",
        str(texts["held"]),
        "--other-text",
        str(texts["other"]),
        "--threads",
        "1",
        "--out",
        str(out),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "least-squares repair of 2 wide layers on 1,024 tokens" in res.stderr
    result = json.loads(res.stdout.strip().splitlines()[-1])
    assert result["plan"] == PLAN and result["tokens"] == 1024
    for key in ("held_out_base", "held_out_repaired", "other_domain_base", "other_domain_repaired"):
        assert math.isfinite(result[key]) and result[key] > 1

    repaired, tok = truedepth.load(out)
    lp, _ = truedepth.load(tiny_dir, plan=PLAN)
    base, _ = truedepth.load(tiny_dir)
    changed = {name for name, p in repaired.state_dict().items() if not torch.equal(p, lp.state_dict()[name])}
    assert changed == {"model.layers.2.mlp.down_proj.weight", "model.layers.3.mlp.down_proj.weight"}
    # On its calibration windows the refit can only lower the first wide layer's error against the
    # original model's hidden state after the two layers it replaced (the ridge pulls towards LP).
    ids = torch.tensor(tokenize(tok, load_text(str(texts["train"])), 1024)[:1024]).view(-1, 512)
    with torch.no_grad():
        target = base(ids, output_hidden_states=True).hidden_states[4]
        errors = {
            name: (m(ids, output_hidden_states=True).hidden_states[3] - target).pow(2).sum().item()
            for name, m in (("lp", lp), ("repaired", repaired))
        }
    assert errors["repaired"] < errors["lp"], errors


def test_lsq_repair_finetunes_from_the_repaired_weights(tiny_dir, texts, tmp_path):
    out = tmp_path / "ft"
    res = lsq_repair(
        tmp_path,
        "--model",
        str(tiny_dir),
        "--plan",
        PLAN,
        "--data",
        str(texts["train"]),
        "--tokens",
        "1024",
        "--threads",
        "1",
        "--finetune",
        "--",
        "--seq-len",
        "32",
        "--batch-size",
        "2",
        "--tokens",
        "128",
        "--train-dtype",
        "fp32",
        "--no-eval",
        "--out",
        str(out),
        "--quiet",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "least-squares repair of 2 wide layers" in res.stderr  # the fine-tune's student was repaired first
    assert (out / "config.json").is_file()


VLLM_PROFILE = ROOT / "scripts" / "research" / "vllm_profile.py"
PARTS = ("input_layernorm", "self_attn.qkv_proj", "self_attn.rotary_emb", "self_attn.attn", "self_attn.o_proj")
PARTS += ("post_attention_layernorm", "mlp.gate_up_proj", "mlp.act_fn", "mlp.down_proj")


def profile_run(step: float, layers: float, parts: dict[str, float], layer_ms: dict[str, float]) -> dict:
    """One repeat of one model in a vllm_profile.py report ("raw"): its timed generates, CPU ms per step."""
    return {
        "clean": {"decode_step_cpu_ms_mean": step - 1.0},
        "clean2": {"decode_step_cpu_ms_mean": step + 1.0},
        "layers": {"decode_step_cpu_ms_mean": step + 2.0, "layers_total_cpu_ms": layers, "layer_cpu_ms": layer_ms},
        "parts": {"part_cpu_ms": parts},
    }


def profile_result(step: float) -> dict:
    """The profile of one model ("results"), as its workers would have summarised it."""
    return {
        "decode_step_cpu_ms": {"median": step},
        "decode_step_ms_profiled": {"median": 2 * step},  # a profiled step: twice the clean CPU time
        "by_shape_ms": [],
        "self_ms": [
            {"layer": "L:decoder_layer w=1", "region": "L:mlp.down_proj w=1", "op": "_C::onednn_mm", "ms": 10.0}
            | {"calls_per_step": 3},
            {"layer": "-", "region": "model.compute_logits", "op": "_C::onednn_mm", "ms": 4.0, "calls_per_step": 1},
        ],
    }


def test_vllm_profile_analysis_takes_the_per_layer_share_from_the_narrow_and_wide_layer_times(tmp_path):
    """The vLLM runs themselves take minutes (docs/research/serving-measurements.md); the arithmetic that
    turns their timings into the documented shares runs here on a report with made-up timings."""
    base_parts = {f"{p} w=1": 1.0 + i for i, p in enumerate(PARTS)}  # 3 narrow layers
    lp_parts = {f"{p} w=1": 1.0 + i for i, p in enumerate(PARTS)} | {f"{p} w=2": 1.5 + i for i, p in enumerate(PARTS)}
    report = {
        "workers": {"base": {"widths": [1, 1, 1]}, "parallel=1:3": {"widths": [1, 2]}},
        "results": {"base | batch 1": profile_result(100.0), "parallel=1:3 | batch 1": profile_result(90.0)},
        "raw": {
            "base | batch 1": [profile_run(100.0, 80.0, base_parts, {"1": 20.0})],
            "parallel=1:3 | batch 1": [profile_run(90.0, 70.0, lp_parts, {"1": 20.0, "2": 30.0})],
        },
    }
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    res = subprocess.run(
        [sys.executable, str(VLLM_PROFILE), "--analyze", str(path)], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr[-3000:]
    a = json.loads(path.read_text())["analysis"]["parallel=1:3 | batch 1"]

    def median(key: str) -> float:
        return a[key]["median"]

    assert median("per_layer_fixed_ms") == pytest.approx(2 * 20.0 - 30.0)  # two narrow layers against one wide
    assert median("per_layer_share_of_base_step") == pytest.approx(3 * 10.0 / 100.0)
    assert median("lp_saving_predicted_ms") == pytest.approx(10.0)
    assert median("lp_saving_measured_ms") == pytest.approx(10.0)  # the clean runs' mean: 100 against 90
    assert median("speedup_cpu") == pytest.approx(100.0 / 90.0)
    rows = a["ms_per_token"]
    assert rows["mlp.down_proj"]["base"] == pytest.approx(9.0) and rows["mlp.down_proj"]["lp"] == pytest.approx(18.5)
    rest = "rest of the decoder layers (Python: residuals, split, views, calls)"
    assert rows[rest]["base"] == pytest.approx(80.0 - sum(base_parts.values()))
    outside = rows["outside the decoder layers (lm_head, sampling, engine)"]  # the layer-timed step less its layers
    assert outside["base"] == pytest.approx(102.0 - 80.0) and outside["lp"] == pytest.approx(92.0 - 70.0)
    assert a["saving_per_merge_ms"]["input_layernorm"]["median"] == pytest.approx(2 * 1.0 - 1.5)
    # the profile's wall times scaled to the clean CPU step (here: halved)
    assert a["profile_ms_per_token"]["base"]["GEMM kernels (oneDNN)"] == pytest.approx(5.0)
    assert a["profile_ms_per_token"]["base"]["logits (lm_head GEMM and its wrapper)"] == pytest.approx(2.0)
    assert "| mlp.down_proj | 9.00 | 18.50 | +9.50 | 8.500 |" in res.stdout  # 2 x 9.0 - 9.5 per merge
