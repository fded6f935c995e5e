"""Integration: the real offline default model (SmolLM2-135M-Instruct, Llama architecture)."""

import pytest
import torch
from helpers.reference import reference_logits

import truedepth

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def default():
    torch.manual_seed(0)
    return truedepth.load("default")


def test_default_model_loads_offline_and_answers(default):
    model, tok = default
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1] :])


def test_wide_layers_match_reference_on_the_real_model(default):
    import copy

    model, tok = default
    ids = tok("It is a truth universally acknowledged, that a single man in possession", return_tensors="pt").input_ids
    want = reference_logits(model, "parallel=20:28", ids)
    lp = truedepth.parallelize(copy.deepcopy(model), 20, 28)
    got = lp(ids).logits
    assert ((got - want).norm() / want.norm()).item() <= 1e-5
    assert lp.config.num_hidden_layers == 26
