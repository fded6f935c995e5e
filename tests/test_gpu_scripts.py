"""The one device run (scripts/gpu/run_all.sh) in its CPU smoke mode: every GPU check's plumbing works.

GPU time is lent rarely and briefly, so a script that broke when the library moved a function must
fail here, on the CPU, not in the few minutes of a device session (bench.py and finetune.py had
done exactly that by 2026-12-01).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # about 2.5 min on 2 CPU cores
def test_every_gpu_check_runs_in_smoke_mode(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), SMOKE="--smoke", PYTHON=sys.executable)
    done = subprocess.run(
        ["bash", "scripts/gpu/run_all.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    log = (tmp_path / "all.log").read_text()
    for step in ("core", "bench", "finetune", "tp"):
        assert f"=== {step} rc=0 " in log, f"{step} failed:\n{log[-4000:]}\n{done.stderr[-2000:]}"
    core = json.loads((tmp_path / "core.json").read_text())
    fp32 = [row["rel_err_vs_reference"] for row in core["rows"] if row["dtype"] == "float32"]
    assert fp32 and max(fp32) < 1e-5  # the transform equals the reference in fp32 on this device too
    finetune = json.loads((tmp_path / "finetune_gpu.json").read_text())
    assert all(run["loss_fell"] for run in finetune["runs"]) and finetune["resume_max_abs_diff"] == 0
    for name in ("bench_gpu.json", "tp.json"):
        assert (tmp_path / name).stat().st_size > 0


@pytest.mark.gpu
def test_core_transform_on_cuda(tmp_path):
    """The core check on the GPU itself (tests/helpers/gpu_core.py, about 30 s): the transformed model
    equals the layer-by-layer reference in fp32, bf16 stays in its rounding band, and the static
    cache (which generate compiles on GPU) gives the dynamic cache's tokens. docs/research/gpu-core.md."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    done = subprocess.run(
        [sys.executable, "tests/helpers/gpu_core.py", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    core = json.loads((tmp_path / "core.json").read_text())
    assert core["device"] != "cpu" and len(core["rows"]) == 8
    for row in core["rows"]:
        assert row["rel_err_vs_reference"] < (1e-5 if row["dtype"] == "float32" else 2e-2), row
        assert row["static_equals_dynamic"], row
