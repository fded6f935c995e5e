"""Run one vLLM engine in its own process and write what it generated as JSON (tests/test_vllm.py).

    python tests/helpers/vllm_worker.py SPECS.json OUT.json

SPECS: a list of engines, run one after the other in this process:
       [{"model": folder, "tensor_parallel_size": 1, "prompts": [text or [token ids], ...],
         "max_tokens": 32, "tokenizer": true, "executor": "uni"}, ...]
       (executor: vLLM's distributed_executor_backend, optional; "uni" runs the model in this process)
OUT:   one result per engine: {"outputs": [{"tokens": [...], "logprobs": [chosen token's logprob, ...],
       "gaps": [top-1 minus top-2 logprob, ...], "text": "..."}, ...]}
       or {"error": "<type>: <message>"} when vLLM refused the model.

vLLM starts its engine core and workers in subprocesses with `spawn` (unless told otherwise:
VLLM_ENABLE_V1_MULTIPROCESSING=0, executor "uni"), hence a script with a main guard rather than a
call inside pytest. One engine serves every prompt of a spec, and one process runs several
engines, since each start and each `import vllm` costs seconds.
"""

from __future__ import annotations

import json
import sys


def generate(spec: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    extra = {"distributed_executor_backend": spec["executor"]} if "executor" in spec else {}
    llm = LLM(
        model=spec["model"],
        dtype="float32",
        enforce_eager=True,
        max_model_len=spec.get("max_model_len", 256),
        tensor_parallel_size=spec.get("tensor_parallel_size", 1),
        seed=0,
        **extra,
        skip_tokenizer_init=not spec.get("tokenizer", True),
        trust_remote_code=False,
    )
    params = SamplingParams(
        temperature=0.0,
        max_tokens=spec.get("max_tokens", 32),
        logprobs=2,
        ignore_eos=True,
        detokenize=spec.get("tokenizer", True),
    )
    prompts = [TokensPrompt(prompt_token_ids=p) if isinstance(p, list) else p for p in spec["prompts"]]
    outputs = []
    for request in llm.generate(prompts, params, use_tqdm=False):
        out = request.outputs[0]
        chosen, gaps = [], []
        for token, top in zip(out.token_ids, out.logprobs):
            best = sorted((lp.logprob for lp in top.values()), reverse=True)
            chosen.append(top[token].logprob)
            gaps.append(best[0] - best[1])
        outputs.append({"tokens": list(out.token_ids), "logprobs": chosen, "gaps": gaps, "text": out.text})
    llm.llm_engine.engine_core.shutdown()  # before the next engine of this process starts
    return {"outputs": outputs}


def run(spec: dict) -> dict:
    try:
        return generate(spec)
    except Exception as exc:  # the message is what the test checks; the engine is gone with the process
        return {"error": f"{type(exc).__name__}: {exc}"}


def main() -> None:
    spec_path, out_path = sys.argv[1], sys.argv[2]
    with open(spec_path) as f:
        specs = json.load(f)
    results = [run(spec) for spec in specs]
    with open(out_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
