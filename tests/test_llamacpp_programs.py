"""llama.cpp's own programs run exported LP models (issue 28), and truedepth finds and builds them.

The programs are those of the llama.cpp that the pinned llama-cpp-python vendors, built by
`make llama-programs` (which `make test` runs first) into the user cache. Where they are not built,
the tests that run them are skipped with that reason; the rest (finder, build logic, the Ollama
Modelfile of docs/GGUF.md) always run.

What the program tests compare, and why these tolerances:
- llama-completion, greedy, f32 file and f32 KV cache: the same continuation as truedepth's fp32
  transformers model up to the first near-tie (top-2 log-probability gap < 1e-3 in transformers),
  compared as text (the program prints text, not ids; the prompt's ids are compared as ids).
- llama-perplexity with --ppl-stride S = window - 1 scores, in each window of `window` tokens
  starting every S tokens, every token but the first: exactly the windows `truedepth eval --window W
  --stride W-1` scores (perplexity.py's sliding windows: the first scores W-1 tokens, the later
  ones their last S = W-1). f32 weights and KV cache: logits agree to ~4e-6 of their scale
  (tests/test_gguf.py), i.e. ~1e-4 nats of NLL; the tolerance, 1e-3 nats of mean NLL (0.1 % of
  perplexity), leaves 10x, while a wrong window or token shifts it by far more.
- llama-server: 16 concurrent greedy requests give the ids that the same requests give one at a
  time, up to a near-tie (its own top-2 log-probabilities); batching other requests alongside
  changes only the order of summation.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import subprocess
import tarfile
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from truedepth.deploy.llamacpp import build, programs
from truedepth.deploy.llamacpp.build import BuildOptions, build_programs
from truedepth.deploy.llamacpp.programs import PROGRAMS, MissingProgramError, find_program

ROOT = Path(__file__).resolve().parents[1]
NEAR_TIE = 1e-3  # top-2 log-probability gap under which greedy choices may legitimately differ
THREADS = "1"  # llama.cpp's threads spin-wait: on a shared 2-core machine one thread is the steady choice
PROMPTS = [
    "The capital of France is",
    "It is a truth universally acknowledged, that",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
]
NEW_TOKENS = 16
LP = "parallel=20:28"
# a group of 3, a skipped layer and a pair
LP3 = "parallel=18:21/3,skip=24,parallel=25:27"


# ---------------------------------------------------------------------------------------------
# Finder and build (no compiler: the build steps are replaced where they would compile)
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRUEDEPTH_CACHE", str(tmp_path / "cache"))
    empty = tmp_path / "empty-path"
    empty.mkdir()
    monkeypatch.setenv("PATH", f"{empty}:/usr/bin:/bin")
    return tmp_path


def executable(path: Path, text: str = "echo version: 1") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\n{text}\n")
    path.chmod(0o755)
    return path


def test_pinned_version_is_the_dev_requirement():
    pins = re.findall(r"^llama-cpp-python==(\S+)$", (ROOT / "requirements-dev.txt").read_text(), re.M)
    assert pins == [programs.PINNED_VERSION]


def test_find_program_takes_the_cache_then_path_and_says_how_to_build(cache, monkeypatch):
    with pytest.raises(MissingProgramError) as e:
        find_program("llama-server")
    message = str(e.value)
    assert "\n" not in message and "make llama-programs" in message and "truedepth.deploy.llamacpp.build" in message
    on_path = executable(cache / "empty-path" / "llama-server")
    assert find_program("llama-server") == on_path
    cached = executable(programs.programs_dir() / "llama-server")
    assert find_program("llama-server") == cached
    assert cached.parent.parent.name == programs.llama_cpp_version()  # keyed by the library's version


def fake_sdist(folder: Path, version: str) -> Path:
    source = folder / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    source.mkdir(parents=True)
    (source / "CMakeLists.txt").write_text("# not compiled here\n")
    path = folder / f"llama_cpp_python-{version}.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(folder / f"llama_cpp_python-{version}", arcname=f"llama_cpp_python-{version}")
    return path


def fake_compiler(calls: list):
    """run_logged that 'builds' by writing the programs where CMake would."""

    def run(argv, log, what, show_progress=False):
        calls.append(what)
        if "--build" in argv:
            folder = Path(argv[argv.index("--build") + 1])
            for name in PROGRAMS:
                executable(folder / "bin" / name)

    return run


def leftovers() -> list[str]:
    """Hidden folders of builds in progress (work folders, staging folders)."""
    return sorted(p.name for p in programs.build_root().iterdir() if p.is_dir() and p.name.startswith("."))


def test_build_is_atomic_cached_and_keyed_by_version(cache, monkeypatch):
    sdist = fake_sdist(cache / "dl", "9.9.9")
    calls: list[str] = []
    monkeypatch.setattr(build, "cmake_program", lambda: "cmake")
    monkeypatch.setattr(build, "run_logged", fake_compiler(calls))
    opts = BuildOptions(version="9.9.9", sdist=str(sdist))
    folder = build_programs(opts)
    assert folder == programs.programs_dir("9.9.9") and programs.is_built("9.9.9")
    assert sorted(p.name for p in folder.iterdir()) == sorted(PROGRAMS)
    info = json.loads((folder.parent / "build-info.json").read_text())
    assert info["llama_cpp_python"] == "9.9.9" and "-DBUILD_SHARED_LIBS=OFF" in info["cmake_arguments"]
    assert calls == ["cmake configure", "cmake build"] and leftovers() == []
    build_programs(opts)  # a second clone: found, nothing run
    assert calls == ["cmake configure", "cmake build"]


def test_an_interrupted_build_loses_nothing_and_shows_nothing(cache, monkeypatch):
    sdist = fake_sdist(cache / "dl", "9.9.9")

    def interrupted(argv, log, what, show_progress=False):
        if "--build" in argv:
            executable(Path(argv[argv.index("--build") + 1]) / "bin" / PROGRAMS[0])  # part of the work
            raise KeyboardInterrupt

    monkeypatch.setattr(build, "cmake_program", lambda: "cmake")
    monkeypatch.setattr(build, "run_logged", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_programs(BuildOptions(version="9.9.9", sdist=str(sdist)))
    assert not programs.version_dir("9.9.9").exists()  # nothing half-made where programs are looked for
    assert leftovers() == [".9.9.9.work"]
    # the next run goes on: the unpacked source and what was compiled are still there
    calls: list[str] = []
    monkeypatch.setattr(build, "run_logged", fake_compiler(calls))
    monkeypatch.setattr(build, "extract_llama_cpp", lambda *a: pytest.fail("unpacked the source again"))
    build_programs(BuildOptions(version="9.9.9", sdist=str(sdist)))
    assert programs.is_built("9.9.9") and leftovers() == []


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--jobs", "0"], "--jobs must be at least 1"),
        (["--sdist", "/no/such.tar.gz"], "no such file"),
        (["--version", "latest"], "not a version number"),
    ],
)
def test_build_command_refuses_bad_input_with_one_line(cache, capsys, argv, words):
    assert build.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and "\n" not in err
    assert not list(programs.build_root().glob("*/bin"))


def test_makefile_builds_the_programs_for_test_only():
    rules = dict(re.findall(r"^([\w-]+):([^\n=]*)$", (ROOT / "Makefile").read_text(), re.M))
    assert "llama-programs" in rules["test"].split()
    assert "llama-programs" not in rules["demo"] and "llama-programs" not in rules["setup"]


# ---------------------------------------------------------------------------------------------
# The Ollama Modelfile of docs/GGUF.md (Ollama itself cannot be installed here)
# ---------------------------------------------------------------------------------------------
OLLAMA_PARAMETERS = {  # the valid PARAMETER names of Ollama's Modelfile reference
    "mirostat", "mirostat_eta", "mirostat_tau", "num_ctx", "repeat_last_n", "repeat_penalty", "temperature",
    "seed", "stop", "num_predict", "top_k", "top_p", "min_p", "num_thread", "num_gpu",
}  # fmt: skip


def modelfile_from_doc() -> tuple[dict, str]:
    """The Modelfile block of docs/GGUF.md parsed: FROM, TEMPLATE, SYSTEM, PARAMETER (name -> values)."""
    doc = (ROOT / "docs" / "GGUF.md").read_text()
    blocks = [b for b in re.findall(r"```[^\n]*\n(.*?)```", doc, re.S) if b.startswith("# Modelfile")]
    assert len(blocks) == 1, "docs/GGUF.md must hold one Modelfile block starting with '# Modelfile'"
    text = blocks[0]
    fields: dict = {"PARAMETER": {}}
    for m in re.finditer(r'^(FROM|TEMPLATE|SYSTEM|PARAMETER)\s+("""(.*?)"""|[^\n]*)$', text, re.M | re.S):
        key, value = m.group(1), m.group(3) if m.group(3) is not None else m.group(2).strip()
        if key == "PARAMETER":
            name, arg = value.split(None, 1)
            fields["PARAMETER"].setdefault(name, []).append(json.loads(arg) if arg.startswith('"') else arg)
        else:
            fields[key] = value
    return fields, doc


def render_go_template(template: str, messages: list[dict]) -> str:
    """The subset of Go's text/template a ChatML TEMPLATE uses: {{ range .Messages }}..{{ end }},
    {{ .Role }}, {{ .Content }}, with {{- / -}} trimming; anything else fails the test."""
    parts = re.split(r"({{-?\s*.*?\s*-?}})", template)
    for i, part in enumerate(parts):  # trim markers remove the whitespace beside the action
        if part.startswith("{{-") and i > 0:
            parts[i - 1] = parts[i - 1].rstrip()
        if part.endswith("-}}") and i + 1 < len(parts):
            parts[i + 1] = parts[i + 1].lstrip()

    def action(part):
        return part.strip("{}-").strip() if part.startswith("{{") else None

    def run(start: int, message: dict | None) -> tuple[str, int]:
        out, i = "", start
        while i < len(parts):
            act = action(parts[i])
            if act is None:
                out += parts[i]
            elif act == "range .Messages":
                body_end = i
                for m in messages:
                    text, body_end = run(i + 1, m)
                    out += text
                i = body_end if messages else next(k for k in range(i, len(parts)) if action(parts[k]) == "end")
            elif act == "end":
                return out, i
            elif act in (".Role", ".Content") and message is not None:
                out += message[act[1:].lower()]
            else:
                raise AssertionError(f"the TEMPLATE uses {parts[i]!r}, outside what this check understands")
            i += 1
        return out, i

    return run(0, None)[0]


def test_ollama_modelfile_in_the_docs_fits_the_exported_file():
    import gguf
    import jinja2

    from truedepth.core.loading import default_gguf

    fields, doc = modelfile_from_doc()
    # FROM: the file the guide's export command writes
    assert fields["FROM"].endswith(".gguf") and f"--gguf {Path(fields['FROM']).name}" in doc
    assert set(fields["PARAMETER"]) <= OLLAMA_PARAMETERS
    assert "ollama" in doc.lower() and "cannot be installed" in doc
    source = gguf.GGUFReader(default_gguf()).fields  # an export keeps these tokenizer fields unchanged
    chat_template = source["tokenizer.chat_template"].contents()
    vocabulary = set(source["tokenizer.ggml.tokens"].contents())
    # the TEMPLATE renders as the file's chat template does; Ollama adds SYSTEM as the first
    # message when the request has none (the chat template's default system prompt)
    conversations = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Name a colour."},
        ],
    ]
    for messages in conversations:
        want = jinja2.Template(chat_template).render(messages=messages, add_generation_prompt=True)
        has_system = messages[0]["role"] == "system"
        as_ollama = messages if has_system else [{"role": "system", "content": fields["SYSTEM"]}, *messages]
        assert render_go_template(fields["TEMPLATE"], as_ollama) == want
    # stop: the end-of-turn token the template writes after each message, a token of the vocabulary
    end_of_turn = re.search(r"\.Content }}(\S+)", fields["TEMPLATE"]).group(1)
    assert fields["PARAMETER"]["stop"] == [end_of_turn] and end_of_turn in vocabulary


# ---------------------------------------------------------------------------------------------
# The programs on the real default model
# ---------------------------------------------------------------------------------------------
def program(name: str) -> Path:
    try:
        return find_program(name)
    except MissingProgramError:
        pytest.skip(f"llama.cpp's {name} is not built: run `make llama-programs` (make test does)")


@pytest.fixture(scope="module")
def default():
    import truedepth

    return truedepth.load("default")


@pytest.fixture(scope="module")
def exported(default, tmp_path_factory):
    """export(plan, type) -> (transformers model, GGUF path), each made once for the module."""
    import truedepth
    from truedepth.deploy.gguf import export_gguf

    folder = tmp_path_factory.mktemp("gguf")
    made: dict = {}

    def export(plan: str, type: str = "f32"):
        if (plan, type) not in made:
            model, tok = default
            lp = model if plan == "base" else truedepth.apply_plan(copy.deepcopy(model), plan)
            name = re.sub(r"[^\w]+", "_", plan)
            made[plan, type] = lp, export_gguf(lp, tok, folder / f"{name}-{type}.gguf", type=type)
        return made[plan, type]

    return export


# llama-completion's and llama-perplexity's output passes through llama.cpp's log thread, which this
# version never flushes at exit (common/log.cpp, "logs may be lost if not flushed", llama.cpp issue
# 22142): on a busy machine the last lines can be missing (seen once in 16 runs at load average 11).
# A run whose output lacks its last line is repeated: llama-completion's timings ("total time ="),
# llama-perplexity's value after its last window ("[N]").
COMPLETE = "total time ="


def run(argv, timeout=300, complete: str | None = None) -> subprocess.CompletedProcess:
    for _ in range(3):
        result = subprocess.run(list(map(str, argv)), capture_output=True, text=True, timeout=timeout)
        assert result.returncode == 0, f"{argv[0]} failed ({result.returncode}):\n{result.stderr[-2000:]}"
        if complete is None or complete in result.stdout + result.stderr:
            return result
    pytest.fail(f"{argv[0]}'s output lacked its last lines ({complete!r}) in 3 runs")


@torch.no_grad()
def hf_greedy(model, prompt_ids: list[int], new_tokens: int, eos: int) -> tuple[list[int], list[float]]:
    """transformers' greedy tokens (stopping after EOS, as llama.cpp does) and the top-2
    log-probability gap at each step."""
    ids, gaps, past, feed = [], [], None, list(prompt_ids)
    for _ in range(new_tokens):
        out = model(torch.tensor([feed]), past_key_values=past, use_cache=True)
        past = out.past_key_values
        top = torch.log_softmax(out.logits[0, -1].float(), -1).topk(2)
        ids.append(int(top.indices[0]))
        gaps.append(float(top.values[0] - top.values[1]))
        feed = ids[-1:]
        if ids[-1] == eos:
            break
    return ids, gaps


def completion(gguf_path, prompt: str, new_tokens: int, f32_cache: bool = True) -> tuple[str, list[int]]:
    """llama-completion's greedy continuation (text, as it prints it) and its prompt's ids."""
    cache = ["-ctk", "f32", "-ctv", "f32"] if f32_cache else []
    result = run(
        [program("llama-completion"), "-m", gguf_path, "-p", prompt, "-n", new_tokens, "--temp", "0",
         "--top-k", "1", "-s", "0", "-no-cnv", "-t", THREADS, "-c", "256", "-fa", "off", *cache,
         "--no-display-prompt", "--verbose-prompt", "--no-warmup"],
        complete=COMPLETE,
    )  # fmt: skip
    count = int(re.search(r"number of tokens in prompt = (\d+)", result.stderr).group(1))
    prompt_ids = [int(i) for i in re.findall(r"\s(\d+) -> '", result.stderr)][:count]  # log lines "   504 -> 'The'"
    return result.stdout, prompt_ids


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("plan", [LP, LP3])
def test_llama_completion_continues_like_transformers(default, exported, plan):
    tok = default[1]
    lp, path = exported(plan)
    for prompt in PROMPTS:
        prompt_ids = tok(prompt, add_special_tokens=False).input_ids
        text, llama_prompt_ids = completion(path, prompt, NEW_TOKENS)
        assert llama_prompt_ids == prompt_ids  # same ids, no BOS (the file says add_bos_token false)
        ids, gaps = hf_greedy(lp, prompt_ids, NEW_TOKENS, tok.eos_token_id)
        tie = next((i for i, g in enumerate(gaps) if g < NEAR_TIE), len(ids))
        want = tok.decode(ids[:tie], skip_special_tokens=True, clean_up_tokenization_spaces=False)
        print(f"{plan} {prompt!r}: {text!r} (near-tie at {tie if tie < len(ids) else 'none'})")
        if tie == len(ids):  # no near-tie: the whole continuation
            assert text.rstrip().removesuffix(" [end of text]").rstrip() == want.rstrip(), prompt
        else:
            assert text.startswith(want), prompt


def llama_perplexity(gguf_path, text_file, window: int, stride: int, windows: int) -> tuple[float, int, int]:
    """llama-perplexity's strided perplexity: (perplexity, text tokens, windows)."""
    # the strided mode widens the context by stride // 2 and rounds it up to a multiple of 256 (the
    # window it then uses, checked below): -c window - stride // 2 gives `window` (a multiple of 256);
    # -b the same, or it runs batch // c sequences side by side in a context that many times larger
    ctx = window - stride // 2
    result = run(
        [program("llama-perplexity"), "-m", gguf_path, "-f", text_file, "-c", ctx, "-b", ctx,
         "--ppl-stride", stride, "-t", THREADS, "-ctk", "f32", "-ctv", "f32", "-fa", "off", "--no-warmup"],
        complete=f"[{windows}]",
    )  # fmt: skip
    out = result.stdout + result.stderr
    tokens, chunk = map(int, re.search(r"have (\d+) tokens\. Calculation chunk = (\d+)", out).groups())
    assert chunk == window
    running = re.findall(r"\[(\d+)\](\d+\.\d+),", out)
    return float(running[-1][1]), tokens, int(running[-1][0])


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("plan", ["base", LP])
def test_llama_perplexity_equals_truedepth_eval_on_the_same_windows(default, exported, tmp_path, capsys, plan):
    from truedepth import cli
    from truedepth.measure.eval.data import held_out_text

    tok = default[1]
    window, stride = 256, 255  # every token of a window but the first: truedepth's windows
    text_file = tmp_path / "held_out.txt"
    text_file.write_text(held_out_text()[:8000])
    text_tokens = len(tok(text_file.read_text(), add_special_tokens=False).input_ids)
    windows = math.ceil((text_tokens - window) / stride)  # llama-perplexity's count of windows
    used = window + (windows - 1) * stride  # the tokens those windows cover: truedepth's --tokens
    got, llama_tokens, llama_windows = llama_perplexity(exported(plan)[1], text_file, window, stride, windows)
    assert (llama_tokens, llama_windows) == (text_tokens, windows)
    argv = ["eval", "--text", str(text_file), "--tokens", str(used), "--window", str(window), "--stride", str(stride)]
    assert cli.main([*argv, "--plan", plan, "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ppl = result["perplexity"]
    want = ppl["perplexity"] if isinstance(ppl, dict) else ppl
    print(f"{plan}: llama-perplexity {got:.4f}, truedepth eval {want:.4f}, {windows} windows of {window}")
    assert abs(math.log(got) - math.log(want)) < 1e-3


def post(url: str, body: dict, timeout: float = 300) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def greedy_request(server_url: str, prompt: str) -> list[dict]:
    """One greedy /v1/completions request; per generated token its id and top-2 log-probabilities."""
    answer = post(
        server_url + "/v1/completions",
        {"prompt": prompt, "max_tokens": 12, "temperature": 0, "top_k": 1, "seed": 0, "n_probs": 2},
    )
    choice = answer["choices"][0]
    assert answer["object"] == "text_completion" and choice["text"]
    return choice["logprobs"]["content"]


def agree_up_to_a_near_tie(one: list[dict], other: list[dict]) -> bool:
    for a, b in zip(one, other):
        if a["id"] != b["id"]:
            gap = min(t["top_logprobs"][0]["logprob"] - t["top_logprobs"][1]["logprob"] for t in (a, b))
            return gap < NEAR_TIE
    return len(one) == len(other)


@pytest.mark.integration
@pytest.mark.slow
def test_llama_server_answers_concurrent_requests_like_single_ones(exported, tmp_path):
    from truedepth.deploy.server import HOST, free_port, process_group_alive, running_server
    from truedepth.measure.eval.data import held_out_text

    text = held_out_text()
    prompts = [text[20000 + 997 * i :][:120] for i in range(16)]  # 16 different passages of the novel
    port = free_port()
    argv = [program("llama-server"), "-m", exported(LP)[1], "--host", HOST, "--port", port, "-c", "1024",
            "--parallel", "4", "-t", THREADS, "--no-warmup"]  # fmt: skip
    with running_server("llama.cpp", list(map(str, argv)), port, tmp_path / "server.log", timeout_s=180) as server:
        alone = [greedy_request(server.url, p) for p in prompts]
        with ThreadPoolExecutor(len(prompts)) as pool:
            together = list(pool.map(lambda p: greedy_request(server.url, p), prompts))
        for prompt, a, b in zip(prompts, alone, together):
            assert agree_up_to_a_near_tie(a, b), prompt
        same = sum([t["id"] for t in a] == [t["id"] for t in b] for a, b in zip(alone, together))
        print(f"llama-server: {same} of {len(prompts)} concurrent answers token for token as alone")
        with pytest.raises(urllib.error.HTTPError) as e:  # longer than -c: refused with an error answer
            post(server.url + "/v1/completions", {"prompt": text[:12000], "max_tokens": 4})
        assert e.value.code == 400 and "context" in e.value.read().decode()
        assert agree_up_to_a_near_tie(greedy_request(server.url, prompts[0]), alone[0])  # and it keeps serving
        process = server.process
    assert process.poll() is not None and not process_group_alive(process.pid)


@pytest.mark.integration
@pytest.mark.slow
def test_llama_quantize_makes_a_q4_k_m_file_that_runs(exported, tmp_path):
    import gguf

    f16 = exported(LP, "f16")[1]
    q4 = tmp_path / "lp-q4_k_m.gguf"
    run([program("llama-quantize"), f16, q4, "Q4_K_M", THREADS])
    reader = gguf.GGUFReader(q4)
    assert reader.fields["general.file_type"].contents() == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert gguf.GGMLQuantizationType.Q4_K in {t.tensor_type for t in reader.tensors}
    text, _ = completion(q4, "The capital of France is", 8, f32_cache=False)
    print(f"q4_k_m: {text!r}")
    assert len(text.strip()) > 0
    assert os.path.getsize(q4) < os.path.getsize(f16) / 2
