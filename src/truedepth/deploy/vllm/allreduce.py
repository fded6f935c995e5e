"""Count the all-reduces that a loaded vLLM model issues per forward step (inside vLLM's workers).

Used through `LLM.apply_model` (scripts/gpu/vllm_bench.py), which pickles these functions by
module path into every worker: they must live in an importable module, not in a script.
"""

from __future__ import annotations


def count_all_reduce_modules(model) -> int:
    """All-reduces one forward step issues, by module (runs inside each vLLM worker)."""
    from vllm.model_executor.layers.linear import RowParallelLinear
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    n = 0
    for m in model.modules():
        if isinstance(m, RowParallelLinear) and m.reduce_results and m.tp_size > 1:
            n += 1
        elif (
            isinstance(m, VocabParallelEmbedding)
            and not isinstance(m, ParallelLMHead)
            and m.reduce_results
            and m.tp_size > 1
        ):
            n += 1
    return n


def start_counting_all_reduce_calls(model) -> None:
    """Wrap the all-reduce that vLLM's parallel layers call (inside each worker)."""
    import vllm.model_executor.layers.linear as linear
    import vllm.model_executor.layers.vocab_parallel_embedding as vocab
    from vllm.distributed import get_tensor_model_parallel_world_size

    original = getattr(linear, "_truedepth_original_all_reduce", linear.tensor_model_parallel_all_reduce)
    calls = {"n": 0}

    def counted(x):
        calls["n"] += get_tensor_model_parallel_world_size() > 1  # at size 1 the call returns x unchanged
        return original(x)

    for module in (linear, vocab):
        module._truedepth_original_all_reduce = original
        module._truedepth_calls = calls
        module.tensor_model_parallel_all_reduce = counted


def all_reduce_calls(model) -> int:
    import vllm.model_executor.layers.linear as linear

    return linear._truedepth_calls["n"]
