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
    assert sorted(p.name for p in (ROOT / "scripts" / "research").glob("*.py")) == ["lsq_repair.py"]


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
