"""`vllm serve` of the default model's LP form (`parallel=20:28`) under load and under abuse, on 127.0.0.1.

One server for the module, started and stopped by truedepth's own `running_server` (the code `bench
--engine vllm` uses). It must answer like transformers; answer concurrent greedy requests as it answers
them one at a time (up to near-ties: top-two log-probability gap < NEAR_TIE); answer bad requests with
an error and keep serving (the canary request gives the same answer after each); and serve 200 requests
without its resident memory growing by more than RSS_GROWTH_MIB."""

from __future__ import annotations

import http.client
import json
import os
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import torch

import truedepth
from truedepth.deploy.server import running_server
from truedepth.deploy.vllm.serve import serve_command, serve_env

pytestmark = [pytest.mark.slow, pytest.mark.integration]

NEAR_TIE = 1e-3
MAX_MODEL_LEN = 512
RSS_GROWTH_MIB = 64  # over 200 requests: a leak of more than ~0.3 MiB per request fails
CANARY = {"prompt": "The capital of France is", "max_tokens": 8}
TOPICS = [
    "The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
    "The three primary colors are", "Water boils at a temperature of", "The largest planet in the solar system",
    "To make a cup of tea, first", "import numpy as np\n", "The French Revolution began in",
    "A haiku about autumn:", "The speed of light is", "My favourite book is",
    "Photosynthesis is the process", "In 1969, astronauts", "The recipe calls for two eggs and",
    "SELECT name FROM users WHERE", "The opposite of hot is", "Dear Sir or Madam,",
]  # fmt: skip


@pytest.fixture(scope="module")
def lp_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("default-lp") / "model"
    model, tokenizer = truedepth.load("default", dtype="fp32", plan="parallel=20:28")
    truedepth.save(model, tokenizer, folder)
    return folder, model, tokenizer


@pytest.fixture(scope="module")
def server(lp_folder, tmp_path_factory):
    from truedepth.deploy.server import free_port

    port = free_port()
    argv = serve_command(lp_folder[0], port, "lp", max_model_len=MAX_MODEL_LEN, max_num_seqs=16, eager=True)
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = serve_env() | {"VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with running_server("lp", argv, port, log, env=env, timeout_s=600) as running:
        yield running
    assert running.process.poll() is not None


def post(server, payload, timeout=300) -> tuple[int, dict]:
    body = payload if isinstance(payload, bytes) else json.dumps({"model": "lp", **payload}).encode()
    request = urllib.request.Request(server.url + "/v1/completions", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def greedy(server, prompt: str, max_tokens: int = 16) -> dict:
    status, answer = post(server, {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "logprobs": 2})
    assert status == 200, answer
    choice = answer["choices"][0]
    tops = choice["logprobs"]["top_logprobs"]
    gaps = [sorted(t.values(), reverse=True)[0] - sorted(t.values(), reverse=True)[1] for t in tops]
    return {"text": choice["text"], "tokens": choice["logprobs"]["tokens"], "gaps": gaps}


def same_up_to_near_tie(a: dict, b: dict) -> bool:
    n = len(a["tokens"])
    cut = next((i for i in range(n) if min(a["gaps"][i], b["gaps"][i]) < NEAR_TIE), n)
    return a["tokens"][:cut] == b["tokens"][:cut]


def canary(server) -> str:
    status, answer = post(server, {**CANARY, "temperature": 0})
    assert status == 200, answer
    return answer["choices"][0]["text"]


def test_completion_matches_transformers(server, lp_folder):
    _, model, tokenizer = lp_folder
    ids = tokenizer(CANARY["prompt"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=CANARY["max_tokens"], do_sample=False)[0, ids.shape[1] :]
    answer = canary(server)
    assert answer == tokenizer.decode(expected)
    assert "Paris" in answer


def test_concurrent_requests_answer_as_one_at_a_time(server):
    alone = [greedy(server, p) for p in TOPICS]
    with ThreadPoolExecutor(len(TOPICS)) as pool:  # all in flight at once: batched together by the engine
        together = list(pool.map(lambda p: greedy(server, p), TOPICS))
    different = [(p, a["text"], b["text"]) for p, a, b in zip(TOPICS, alone, together) if not same_up_to_near_tie(a, b)]
    assert not different, different
    assert sum(a["tokens"] == b["tokens"] for a, b in zip(alone, together)) >= len(TOPICS) - 2


BAD_REQUESTS = {
    "prompt longer than --max-model-len": {"prompt": "word " * (MAX_MODEL_LEN + 50), "max_tokens": 4},
    "max_tokens 0": {"prompt": "Hello", "max_tokens": 0},
    "max_tokens negative": {"prompt": "Hello", "max_tokens": -5},
    "malformed JSON": b'{"model": "lp", "prompt": "Hello", "max_tokens": 4',
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_request_gets_an_error_and_the_server_keeps_serving(server, case):
    before = canary(server)
    status, answer = post(server, BAD_REQUESTS[case])
    assert status == 400 and "error" in answer, (status, answer)
    assert server.process.poll() is None
    assert canary(server) == before


def test_client_that_disconnects_mid_stream(server):
    before = canary(server)
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    body = {"model": "lp", "prompt": "Tell me a long story.", "max_tokens": 400, "stream": True, "ignore_eos": True}
    connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200
    assert response.read(5) == b"data:"  # the stream has started (read through the chunked encoding)
    connection.sock.shutdown(2)  # gone, mid-answer
    connection.close()
    assert server.process.poll() is None
    assert canary(server) == before


def resident_mib(server) -> float:
    root = psutil.Process(server.process.pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]) / 2**20


def test_two_hundred_requests_leave_memory_flat(server):
    def short(i: int) -> int:  # one new token: each request allocates and frees what a longer one would
        return post(server, {"prompt": f"{TOPICS[i % len(TOPICS)]} (request {i})", "max_tokens": 1})[0]

    # one after another, as the issue says: concurrent requests batch differently with the machine's load, and
    # each new batch shape adds kernels to oneDNN's (bounded) primitive cache, which is not growth per request
    assert {short(i) for i in range(20)} == {200}  # warm: allocator pools and caches filled
    before = resident_mib(server)
    assert {short(i) for i in range(20, 220)} == {200}
    after = resident_mib(server)
    print(f"server RSS {before:.0f} MiB -> {after:.0f} MiB over 200 requests (pid {os.getpid()})")
    assert after - before < RSS_GROWTH_MIB
