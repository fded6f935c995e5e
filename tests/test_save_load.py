"""Transformed models save as safetensors and reload with identical logits, strictly."""

import json

import pytest
import torch
from helpers.tiny import ARCHS, tiny_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import truedepth
from truedepth.core.hf import CheckpointMismatchError


def saved(tmp_path, arch="llama", plan="parallel=2:6/2,skip=7"):
    model = truedepth.apply_plan(tiny_model(arch, layers=8), plan)
    model.save_pretrained(tmp_path)
    return model


@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_through_auto_class_gives_identical_logits(tmp_path, arch):
    model = saved(tmp_path, arch, "parallel=1:7/3")
    assert not list(tmp_path.glob("*.bin")) and list(tmp_path.glob("*.safetensors"))
    ids = torch.randint(3, 128, (2, 9))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(reloaded) is type(model)
    assert torch.equal(reloaded(ids).logits, model(ids).logits)
    assert reloaded.config.truedepth == model.config.truedepth
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == f"truedepth_{arch}"


def test_trained_wide_layer_survives_save_and_load(tmp_path):
    model = truedepth.apply_plan(tiny_model("qwen3", layers=6), "parallel=2:6")
    with torch.no_grad():  # "training": change only the wide layers' weights
        for p in model.model.layers[2].parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(tmp_path)
    ids = torch.randint(3, 128, (1, 8))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_reloaded_model_generates_like_the_original(tmp_path):
    model = saved(tmp_path)
    ids = torch.randint(3, 128, (1, 5))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert torch.equal(reloaded.generate(ids, **kw), model.generate(ids, **kw))


def edit_checkpoint(folder, edit):
    path = next(folder.glob("*.safetensors"))
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda t: t.pop("model.layers.2.self_attn.q_proj.weight"), ["missing", "q_proj"]),
        (lambda t: t.__setitem__("model.layers.9.mlp.up_proj.weight", torch.zeros(3, 3)), ["unexpected", "layers.9"]),
        (
            lambda t: t.__setitem__(
                "model.layers.2.mlp.down_proj.weight", t["model.layers.2.mlp.down_proj.weight"][:, :96].clone()
            ),
            ["down_proj"],
        ),
    ],
)
def test_damaged_checkpoint_gives_a_clear_error(tmp_path, edit, words):
    saved(tmp_path)
    edit_checkpoint(tmp_path, edit)
    with pytest.raises((CheckpointMismatchError, RuntimeError, ValueError)) as err:
        AutoModelForCausalLM.from_pretrained(tmp_path)
    for w in words:
        assert w in str(err.value)


def test_plain_model_folder_loads_and_transforms_through_truedepth_load(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    base = tiny_model("llama", layers=4)
    base.save_pretrained(tmp_path)
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]")))
    tok.save_pretrained(tmp_path)
    model, tokenizer = truedepth.load(tmp_path, plan="parallel=0:2")
    ids = torch.randint(3, 128, (1, 6))
    from helpers.reference import reference_logits

    assert ((model(ids).logits - reference_logits(base, "parallel=0:2", ids)).norm() / model(ids).logits.norm()) < 1e-5
    assert tokenizer.convert_tokens_to_ids("a") == 1  # the folder's own tokenizer


def test_base_plan_on_a_saved_transformed_model_is_a_no_op(tmp_path):
    """Commands apply their default plan ('base') to a saved LP model: that must change nothing."""
    model = saved(tmp_path / "lp")
    reloaded = truedepth.apply_plan(
        AutoModelForCausalLM.from_pretrained(tmp_path / "lp", attn_implementation="eager"), "base"
    )
    assert reloaded.config.truedepth == model.config.truedepth
    assert len(reloaded.model.layers) == len(model.model.layers)
    ids = torch.randint(3, 128, (1, 6))
    assert torch.equal(reloaded(ids).logits, model(ids).logits)
    with pytest.raises(truedepth.PlanError, match="already transformed"):
        truedepth.apply_plan(reloaded, "parallel=0:2")
