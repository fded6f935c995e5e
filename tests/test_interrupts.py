"""Ctrl-C (SIGINT) during a long command ends with ONE line that says what was saved and how to go
on, and exit code 130: no KeyboardInterrupt traceback. Each case runs a tiny job in a subprocess
and interrupts it once it is doing real work."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
SRC = Path(__file__).resolve().parent.parent / "src"


# The command runs behind a small launcher that gives it the default SIGINT before exec: a
# background job of a non-interactive shell (`pytest ... &` in a script) starts with SIGINT ignored,
# every child inherits that, and a command that ignores Ctrl-C (rightly, as under nohup) would never
# see the test's. (A launcher rather than preexec_fn, which is not safe in a process with threads.)
LAUNCH = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execv(sys.executable, [sys.executable, '-m', 'truedepth', *sys.argv[1:]])"
)


def interrupt(argv: list[str], started, cwd: Path, limit: float = 240) -> tuple[int, str]:
    """Run `truedepth argv`, send SIGINT once `started(output so far)` is true, return (code, stderr)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]), HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(
        [sys.executable, "-c", LAUNCH, *argv],
        cwd=cwd,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out: list[str] = []
    err: list[str] = []
    readers = [
        threading.Thread(target=lambda s=s, b=b: b.extend(iter(lambda: s.read(1), "")), daemon=True)
        for s, b in ((proc.stdout, out), (proc.stderr, err))
    ]
    for r in readers:
        r.start()
    deadline = time.monotonic() + limit
    while not started("".join(out) + "".join(err)):
        assert proc.poll() is None, f"finished before it could be interrupted: {''.join(err)[-2000:]}"
        assert time.monotonic() < deadline, "never started"
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    code = proc.wait(timeout=120)
    for r in readers:
        r.join(timeout=10)
    return code, "".join(err)


def last_line(err: str) -> str:
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    return err.strip().splitlines()[-1].split("\r")[-1]


def test_eval(tiny_dir, tmp_path):
    code, err = interrupt(
        ["eval", "--model", str(tiny_dir), "--text", "austen-train", "--tokens", "2000000", "--window", "64"],
        lambda s: "perplexity:" in s,
        tmp_path,
    )
    assert code == 130
    assert (
        last_line(err)
        == "truedepth eval: interrupted. Nothing was saved; run it again (fewer --tokens or a --limit make it shorter)."
    )


def test_sweep(tiny_dir, tmp_path):
    out = tmp_path / "sweep"
    code, err = interrupt(
        [
            "sweep",
            "--model",
            str(tiny_dir),
            "--transforms",
            "parallel,skip,merge",
            "--delta",
            "2",
            "--start",
            "0:7",
            "--tokens",
            "16384",
            "--window",
            "64",
            "--out",
            str(out),
        ],
        lambda s: (out / "results.jsonl").is_file(),
        tmp_path,
    )
    assert code == 130
    assert f"{out}/results.jsonl; run the same command again" in last_line(err)
    assert (out / "results.jsonl").read_text().strip()  # what was finished is kept


def test_finetune(tiny_dir, tmp_path):
    out = tmp_path / "ft"
    code, err = interrupt(
        [
            "finetune",
            "--model",
            str(tiny_dir),
            "--plan",
            "parallel=2:6",
            "--tokens",
            "50000000",
            "--seq-len",
            "32",
            "--batch-size",
            "2",
            "--checkpoint-every",
            "1",
            "--no-eval",
            "--out",
            str(out),
        ],
        lambda s: any((out / "checkpoints").glob("*/state.json")),
        tmp_path,
    )
    assert code == 130
    line = last_line(err)
    assert line.startswith("truedepth finetune: interrupted. The latest checkpoint is ") and "--resume" in line


def test_search(tiny_dir, tmp_path):
    code, err = interrupt(
        [
            "search",
            "--model",
            str(tiny_dir),
            "--target-depth",
            "4:8",
            "--calib",
            "austen-train",
            "--calib-windows",
            "256",
            "--calib-length",
            "256",
            "--select-windows",
            "0",
            "--report",
            "none",
            "--out",
            str(tmp_path / "s.json"),
        ],
        lambda s: "original model" in s,
        tmp_path,
    )
    assert code == 130
    assert last_line(err).startswith("truedepth search: interrupted. Nothing was saved")
    assert not (tmp_path / "s.json").exists()
