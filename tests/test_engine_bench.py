"""`truedepth bench --engine`: servers that always stop, refusals before any server starts, the summary's
arithmetic, and one end-to-end run of vLLM: the README's example (JSON fields, no process left behind)."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
import time

import psutil
import pytest
from helpers.cli import assert_user_error
from helpers.readme import commands
from helpers.tiny import char_tokenizer, tiny_model

import truedepth
from truedepth.core.loading import resolve
from truedepth.deploy import engine_bench
from truedepth.deploy import server as server_mod
from truedepth.deploy.server import ServerError, running_server
from truedepth.measure.bench.serving import summarize

# A stand-in server: answers /health, and starts a child that would outlive a careless stop.
FAKE_SERVER = textwrap.dedent(
    """
    import http.server, subprocess, sys
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # a worker of the server
    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
        def log_message(self, *args):
            pass
    http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Health).serve_forever()
    """
)


def fake_server_argv(port: int) -> list[str]:
    return [sys.executable, "-c", FAKE_SERVER, str(port)]


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_server_and_its_children_stop_on_ctrl_c(tmp_path):
    port = server_mod.free_port()
    with pytest.raises(KeyboardInterrupt):
        with running_server("fake", fake_server_argv(port), port, tmp_path / "log", timeout_s=60) as server:
            pgid = server.process.pid
            deadline = time.monotonic() + 30
            while len(psutil.Process(pgid).children()) < 1 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert psutil.Process(pgid).children(), "the stand-in server should have started its worker"
            raise KeyboardInterrupt
    assert not group_alive(pgid)
    assert not server_mod.port_in_use(port)


def test_server_stops_when_the_process_running_it_gets_sigterm(tmp_path):
    """SIGTERM to the bench (e.g. a job scheduler) stops its servers too: `finally` runs."""
    port = server_mod.free_port()
    script = textwrap.dedent(
        f"""
        import os, signal, sys, time
        from pathlib import Path
        from truedepth.deploy.server import exit_on_termination, running_server
        with exit_on_termination():
            with running_server("fake", {fake_server_argv(port)!r}, {port}, Path({str(tmp_path / "log")!r})) as s:
                print(s.process.pid, flush=True)
                time.sleep(120)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pgid = int(proc.stdout.readline())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        proc.kill()
    assert not group_alive(pgid)


def test_a_server_that_exits_early_is_an_error_with_its_output(tmp_path):
    argv = [sys.executable, "-c", "print('cannot load the model'); raise SystemExit(3)"]
    with pytest.raises(ServerError, match="(?s)exited \\(code 3\\).*cannot load the model"):
        with running_server("broken", argv, server_mod.free_port(), tmp_path / "log", timeout_s=60):
            pass


def test_summary_medians_spread_and_ratios():
    runs = [
        {"model": m, "plan": m, "depth": d, "concurrency": c, "repeat": r, "output_tok_s": tps, "mean_tpot_ms": tpot,
         "p99_tpot_ms": tpot * 2, "mean_ttft_ms": 100.0, "completed": 8, "failed": f}
        for m, d, c, r, tps, tpot, f in [
            ("base", 30, 4, 0, 100.0, 40.0, 0), ("base", 30, 4, 1, 110.0, 36.0, 0), ("base", 30, 4, 2, 90.0, 44.0, 1),
            ("lp", 26, 4, 0, 120.0, 33.0, 0), ("lp", 26, 4, 1, 132.0, 30.0, 0), ("lp", 26, 4, 2, 126.0, 31.0, 0),
        ]
    ]  # fmt: skip
    base, lp = summarize(runs)
    assert (base["output_tok_s"], base["output_tok_s_min"], base["output_tok_s_max"]) == (100.0, 90.0, 110.0)
    assert (base["completed"], base["failed"], base["repeats"]) == (24, 1, 3)
    assert lp["output_tok_s"] == 126.0 and lp["mean_tpot_ms"] == 31.0
    assert lp["throughput_vs_base"] == pytest.approx(126.0 / 100.0)
    assert lp["tpot_speedup_vs_base"] == pytest.approx(40.0 / 31.0)
    assert "throughput_vs_base" not in base


# ---------------------------------------------------------------------------------------------
# Refusals: one line, exit 2, before any server starts
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def no_server_may_start(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a server was started before the input was checked")

    monkeypatch.setattr(engine_bench, "running_server", refuse)


@pytest.fixture(scope="module")
def tiny32(tmp_path_factory):
    """A tiny llama with head_dim 32 (vLLM's CPU attention has no kernel for 16), 4 heads, 2 KV heads."""
    folder = tmp_path_factory.mktemp("tiny32") / "model"
    truedepth.save(tiny_model("llama", layers=8, seed=1, head_dim=32, initializer_range=0.1), char_tokenizer(), folder)
    return folder


BENCH = ["bench", "--engine", "vllm", "--mode", "eager", "--concurrency", "1,2", "--requests", "4"]


def test_refuses_a_port_in_use(capsys, tiny32, no_server_may_start):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert_user_error(capsys, *BENCH, "--model", str(tiny32), "--port", str(port), words=f"port {port}")


def test_refuses_without_vllm(capsys, tiny32, no_server_may_start, monkeypatch):
    monkeypatch.setattr("truedepth.deploy.vllm.serve.vllm_version", lambda: None)
    assert_user_error(capsys, *BENCH, "--model", str(tiny32), words="vLLM is not installed")


def test_refuses_a_folder_it_cannot_serve(capsys, tiny32, tmp_path, no_server_may_start):
    assert_user_error(capsys, *BENCH, "--model", str(tiny32), "--plan", str(tmp_path / "nothing"), words="not exist")
    assert_user_error(capsys, *BENCH, "--model", str(tiny32), "--plan", str(tiny32), words="did not transform")


def test_refuses_a_tensor_parallel_size_the_heads_do_not_divide(capsys, tiny32, no_server_may_start):
    line = assert_user_error(
        capsys, *BENCH, "--model", str(tiny32), "--plan", "parallel=2:6", "--tensor-parallel-size", "3",
        words="does not divide",
    )  # fmt: skip
    assert "sizes that fit: 1, 2" in line


def test_refuses_transformers_modes_and_llama_cpp_shapes(capsys, tiny32, no_server_may_start):
    assert_user_error(capsys, "bench", "--engine", "vllm", "--mode", "fast", "--model", str(tiny32), words="--mode")
    assert_user_error(capsys, "bench", "--engine", "llama.cpp", "--shape", "tiny", words="--shape")


# ---------------------------------------------------------------------------------------------
# End to end: two vLLM servers, two levels, the JSON, nothing left running
# ---------------------------------------------------------------------------------------------
def processes_mentioning(text: str) -> list[str]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if text in cmd and p.pid != os.getpid():
            found.append(f"{p.pid}: {cmd[:200]}")
    return found


@pytest.mark.slow
def test_the_readme_vllm_load_example_end_to_end(tmp_path):
    """The README's `bench --engine vllm` example (its variant), on the default model: two servers taking turns
    at two levels, the JSON's fields, nothing left running."""
    (command,) = commands("test_engine_bench.py")
    out, work = tmp_path / "load.json", tmp_path / "work"
    argv = [*shlex.split(command)[1:], "--json", str(out), "--work-dir", str(work)]
    result = subprocess.run(
        [sys.executable, "-m", "truedepth", *argv], capture_output=True, text=True, timeout=900,
        env=dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", TOKENIZERS_PARALLELISM="false"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert not processes_mentioning(str(work)) and not processes_mentioning(resolve("default")), (
        "a server was left running"
    )
    data = json.loads(out.read_text())
    assert data["engine"] == "vllm" and data["engine_version"]
    assert [m["model"] for m in data["models"]] == ["base", "parallel=20:28"]
    assert [m["depth"] for m in data["models"]] == [30, 26]
    assert [(r["repeat"], r["concurrency"], r["model"]) for r in data["runs"]] == [  # the models take turns
        (0, 1, "base"), (0, 1, "parallel=20:28"), (0, 2, "base"), (0, 2, "parallel=20:28"),
    ]  # fmt: skip
    for run in data["runs"]:
        assert (run["completed"], run["failed"]) == (4, 0), run
        for key in ("output_tok_s", "mean_tpot_ms", "p99_tpot_ms", "mean_ttft_ms", "duration_s"):
            assert run[key] > 0, (key, run)
    lp = [row for row in data["summary"] if row["model"] == "parallel=20:28"]
    assert {row["concurrency"] for row in lp} == {1, 2}
    for row in lp:
        assert row["throughput_vs_base"] > 0 and row["tpot_speedup_vs_base"] > 0
        assert row["output_tok_s_min"] <= row["output_tok_s"] <= row["output_tok_s_max"]
    assert "x base" in result.stdout and "parallel=20:28" in result.stdout


def test_llama_bench_rows_name_each_model_and_test(tmp_path, monkeypatch):
    """`bench --engine llama.cpp` adds llama-bench's pp/tg speeds; each row is named by the model it measured."""
    from truedepth.deploy.engines import Candidate, LlamaCppEngine
    from truedepth.measure.bench.serving import LoadSettings

    base, lp = tmp_path / "base.gguf", tmp_path / "lp.gguf"
    rows = [
        {"model_filename": str(f), "n_prompt": p, "n_gen": g, "n_threads": 2, "avg_ts": ts, "stddev_ts": 0.5}
        for f, p, g, ts in [(base, 16, 0, 400.0), (base, 0, 8, 80.0), (lp, 16, 0, 410.0), (lp, 0, 8, 90.0)]
    ]
    fake = tmp_path / "llama-bench"
    fake.write_text(f"#!{sys.executable}\nimport sys\nprint('build info')\nprint({json.dumps(rows)!r})\n")
    fake.chmod(0o755)
    monkeypatch.setattr("truedepth.deploy.llamacpp.find_program", lambda name: fake)
    settings = LoadSettings(16, 8, [1], None, 3, 1, 0, "q8_0", False, 1)
    candidates = [Candidate("base", "base", 30, "base", served=base), Candidate("lp", "p", 26, "plan", served=lp)]
    found = LlamaCppEngine().extra_measurements(candidates, settings)["llama_bench"]
    assert [(r["model"], r["test"], r["tok_s"]) for r in found] == [
        ("base", "pp16", 400.0), ("base", "tg8", 80.0), ("lp", "pp16", 410.0), ("lp", "tg8", 90.0),
    ]  # fmt: skip
