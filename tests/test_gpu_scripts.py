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
pytestmark = pytest.mark.slow  # about 2.5 min on 2 CPU cores


def test_every_gpu_check_runs_in_smoke_mode(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), SMOKE="--smoke", PYTHON=sys.executable)
    done = subprocess.run(["bash", "scripts/gpu/run_all.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
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
