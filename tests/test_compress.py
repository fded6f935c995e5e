"""`truedepth compress`: stages, the saved folder, resuming, refused changes and bad input (tiny models)."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from test_finetune import Killed, char_tokenizer, kill_at, text_file

import truedepth
from truedepth import cli
from truedepth.apps.compress import budget as compress_budget
from truedepth.apps.compress import checks as compress_checks
from truedepth.apps.compress import options as compress_options
from truedepth.apps.compress import pipeline as compress_run
from truedepth.apps.compress import stages as compress_stages
from truedepth.apps.finetune import config as ft_config
from truedepth.core.loading import read_config
from truedepth.core.plan import as_plan

LAYERS, DEPTH = 8, 6  # tiny_dir (tests/conftest.py) has 8 layers
pytestmark = pytest.mark.usefixtures("private_cache")


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    path = tmp_path_factory.mktemp("texts")
    for i, name in enumerate(("train", "held", "other")):
        text_file(path / f"{name}.txt", i)
    return path


@pytest.fixture(scope="module")
def finished(tiny_dir, texts, tmp_path_factory):
    """One complete run, shared by the tests that inspect or compare with it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRUEDEPTH_CACHE", str(tmp_path_factory.mktemp("cache")))
        out = tmp_path_factory.mktemp("runs") / "full"
        assert cli.main(compress_args(tiny_dir, texts, out)) == 0
    return out


def compress_args(tiny_dir, texts, out, *extra):
    train, held, other = (texts / f"{n}.txt" for n in ("train", "held", "other"))
    return [
        "compress",
        "--model",
        str(tiny_dir),
        "--target-depth",
        str(DEPTH),
        "--budget-minutes",
        "5",
        "--out",
        str(out),
        "--data",
        str(train),
        "--eval-text",
        str(held),
        "--other-text",
        str(other),
        "--eval-tokens",
        "256",
        "--eval-window",
        "32",
        "--calib-windows",
        "2",
        "--calib-length",
        "32",
        "--select-windows",
        "2",
        "--tokens",
        str(32 * 4 * 6),
        "--seq-len",
        "32",
        "--batch-size",
        "4",
        "--lr",
        "3e-3",
        "--train-dtype",
        "fp32",
        "--checkpoint-every",
        "2",
        "--decode-tokens",
        "4",
        "--quiet",
        "--generate-tokens",
        "64",
        *extra,
    ]


def test_stages_write_a_loadable_folder_with_the_target_depth(tiny_dir, texts, finished):
    out = finished
    summary = json.loads((out / compress_options.SUMMARY_FILE).read_text())
    plan = as_plan(summary["plan"])
    assert len(plan.blocks(LAYERS)) == DEPTH and summary["depth"] == {"base": LAYERS, "fine-tuned": DEPTH}
    model, tokenizer = truedepth.load(out)
    assert model.config.num_hidden_layers == DEPTH and as_plan(model.config.truedepth["plan"]) == plan
    assert tokenizer("ab")["input_ids"] == char_tokenizer()("ab")["input_ids"]
    # the saved model is the fine-tuned one: it scores what compress.json says
    from truedepth.measure.eval.perplexity import perplexity

    held = (texts / "held.txt").read_text()
    assert perplexity(model, tokenizer, held, tokens=256, window=32, progress=False)["perplexity"] == pytest.approx(
        summary["perplexity"]["held_out"]["fine-tuned"], rel=1e-6
    )
    # the contiguous plan of the paper at the same depth, measured on its own
    assert summary["contiguous_plan"] == "parallel=2:6"
    lp, _ = truedepth.load(tiny_dir, plan="parallel=2:6")
    assert perplexity(lp, tokenizer, held, tokens=256, window=32, progress=False)["perplexity"] == pytest.approx(
        summary["perplexity"]["held_out"]["contiguous"], rel=1e-6
    )
    # fidelity to the base model: the fine-tuned model's and the contiguous plan's, measured on their own
    from truedepth.measure.eval.fidelity import fidelity

    base, _ = truedepth.load(tiny_dir)
    assert summary["fidelity_tokens"] == 256 and set(summary["fidelity"]) == {"held_out", "other_domain"}
    for name, compared in (("fine-tuned", model), ("contiguous", lp)):
        want = fidelity(base, compared, tokenizer, held, tokens=256, window=32, progress=False)
        got = summary["fidelity"]["held_out"][name]
        assert got["top1_agreement"] == want["top1_agreement"] and got["kl"] == pytest.approx(want["kl"], rel=1e-6)
    assert "Agreement with the base model" in (out / "README.md").read_text()
    assert set(summary["stages"]) == set(compress_options.STAGES)
    assert summary["decode_tokens_per_second"]["fine-tuned"] > 0
    assert summary["machine"]["device"] == "cpu" and summary["machine"]["dtype"] == "fp32"  # resolved, not 'auto'
    card = (out / "README.md").read_text()
    assert card.startswith("---\nbase_model: " + str(tiny_dir) + "\n") and "- truedepth" in card
    for png in ("search.png", "quality.png", ft_config.CURVE_FILE):
        assert (out / png).stat().st_size > 0


def test_tasks_score_base_and_saved_model_as_lm_eval_does(tiny_dir, texts, tmp_path):
    """--tasks: compress.json and the model card hold the lm-eval scores of base and fine-tuned model,
    equal to scoring the saved folder and the base model directly; --mmlu-chat likewise."""
    from truedepth.measure.eval import icl
    from truedepth.measure.eval.fidelity import mmlu_chat_agreement

    task = "truedepth_mmlu_anatomy"
    out = tmp_path / "with-tasks"
    assert cli.main(compress_args(tiny_dir, texts, out, "--tasks", task, "--limit", "3", "--mmlu-chat", "2")) == 0
    summary = json.loads((out / compress_options.SUMMARY_FILE).read_text())
    scores = summary["tasks"]
    (base, tokenizer), (saved, _) = truedepth.load(tiny_dir), truedepth.load(out)
    assert summary["mmlu_chat"] == mmlu_chat_agreement(base, saved, tokenizer, 2, progress=False)
    for name, folder in (("base", tiny_dir), ("fine-tuned", out)):
        model, tokenizer = truedepth.load(folder)
        direct = icl.evaluate_tasks(model, tokenizer, [task], limit=3)[task]
        assert scores[name][task]["acc"] == pytest.approx(direct["acc"], abs=1e-12)
        assert scores[name][task]["n_samples"] == 3
    card = (out / "README.md").read_text()
    assert "## lm-eval tasks" in card and "MMLU-chat (2 questions" in card


def test_untrained_models_come_from_the_cache_without_loading(tiny_dir, texts, monkeypatch):
    """The evaluate stage measures base and plan models once; a later run with the same weights, texts
    and sizes takes their perplexities from the cache and loads nothing for them."""
    from truedepth.core import loading

    loaded, real = [], loading.load
    monkeypatch.setattr(loading, "load", lambda *a, **k: loaded.append(k.get("plan")) or real(*a, **k))
    opts = compress_options.CompressOptions(model=str(tiny_dir), eval_tokens=256, eval_window=32, quiet=True)
    held = {"held_out": (texts / "held.txt").read_text()}
    first = compress_stages.measured_perplexities(opts, held, "parallel=2:6", plan="parallel=2:6")
    assert loaded == ["parallel=2:6"]
    assert compress_stages.measured_perplexities(opts, held, "parallel=2:6", plan="parallel=2:6") == first
    assert loaded == ["parallel=2:6"]  # the second time: from the cache, nothing loaded
    other = {"held_out": (texts / "other.txt").read_text()}
    assert compress_stages.measured_perplexities(opts, other, "parallel=2:6", plan="parallel=2:6") != first
    assert loaded == ["parallel=2:6"] * 2  # another text is measured anew


def test_finetune_text_mixes_generated_text_and_the_data(texts, finished):
    from truedepth.apps.finetune import selfdata

    generated = selfdata.read_generated(finished / compress_options.GENERATED_DIR)
    train = (finished / compress_options.TRAIN_FILE).read_text()
    corpus = (texts / "train.txt").read_text()
    summary = json.loads((finished / compress_options.SUMMARY_FILE).read_text())
    assert summary["generate"]["tokens"] == 64 * 256 and summary["corpus_share"] == 0.5
    assert train == selfdata.mix_texts(generated, corpus, 0.5)
    assert corpus[:500] in train and generated[:500] in train
    assert "generated itself" in (finished / "README.md").read_text()


def test_generate_stage_asks_the_model_questions_with_generate_from_chat(tmp_path, monkeypatch):
    from truedepth.apps.compress import report as compress_report

    calls = []
    monkeypatch.setattr(compress_stages, "load_model", lambda opts: ("model", "tokenizer"))
    monkeypatch.setattr(compress_stages, "generate_text", lambda *a, **k: calls.append(k) or {"tokens": 10})
    opts = compress_options.CompressOptions(target_depth=4, generate_tokens=10, generate_from="chat")
    compress_stages.run_generate_stage(opts, tmp_path, max_seconds=60)
    assert calls[0]["source"] == "chat" and calls[0]["max_seconds"] == 60
    summary = {"generate": {"tokens": 10, "source": "chat"}, "corpus_share": 0.5, "options": {"data": "d"}}
    assert "answers to questions through its chat template" in compress_report.training_text(summary)


def test_rerun_skips_finished_stages_and_refuses_changed_options(tiny_dir, texts, finished, monkeypatch, capsys):
    out, summary = finished, json.loads((finished / compress_options.SUMMARY_FILE).read_text())
    monkeypatch.setattr(compress_stages, "run_search", lambda *a, **k: pytest.fail("search ran again"))
    monkeypatch.setattr(compress_run, "run_finetune_stage", lambda *a, **k: pytest.fail("fine-tune ran again"))
    monkeypatch.setattr(compress_run, "run_generate_stage", lambda *a, **k: pytest.fail("generation ran again"))
    assert cli.main(compress_args(tiny_dir, texts, out)) == 0
    printed = capsys.readouterr().out
    assert all(f"{s}: finished earlier with the same options" in printed for s in compress_options.STAGES)
    assert printed.startswith("expected: --budget-minutes 5 leaves about ")  # the budget curve's line, first
    assert json.loads((out / compress_options.SUMMARY_FILE).read_text())["perplexity"] == summary["perplexity"]

    # an option a finished stage used is refused, naming the option and the stage; nothing changes
    before = sorted(p.name for p in out.iterdir())
    assert cli.main(compress_args(tiny_dir, texts, out, "--calib-windows", "3")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--calib-windows is 3" in err[0] and "finished stage 'search'" in err[0]
    assert cli.main(compress_args(tiny_dir, texts, out, "--tokens", "1024")) == 2
    assert "finished stage 'finetune'" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == before


def test_engine_stage_serves_the_saved_folder_and_reports_it(tiny_dir, texts, finished, tmp_path, monkeypatch, capsys):
    """--engine vllm on a finished run: only the serve stage runs; it measures the base model against the saved
    folder through `bench --engine`'s own function, and compress.json and the model card report it."""
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    asked = []
    row = {"concurrency": 1, "plan": "p", "depth": 6, "repeats": 3, "completed": 24, "failed": 0}
    for metric in ("output_tok_s", "mean_tpot_ms", "p99_tpot_ms", "mean_ttft_ms"):
        row |= {metric: 10.0, f"{metric}_min": 9.0, f"{metric}_max": 11.0}

    def measure_engine(bench):
        asked.append(bench)
        lp = dict(row, model=str(out), throughput_vs_base=1.25)
        return {"engine": "vllm", "engine_version": "0.32.0+cpu", "settings": {"dtype": "fp32", "prompt": 128,
                "new": 64, "repeats": 3}, "models": [{"model": "base"}, {"model": str(out)}],
                "summary": [dict(row, model="base"), lp]}  # fmt: skip

    monkeypatch.setattr("truedepth.deploy.engines.VLLMEngine.check_installed", lambda self: None)
    monkeypatch.setattr("truedepth.deploy.engine_bench.measure_engine", measure_engine)
    monkeypatch.setattr(compress_run, "run_evaluate_stage", lambda *a, **k: pytest.fail("evaluation ran again"))
    assert cli.main(compress_args(tiny_dir, texts, out, "--engine", "vllm", "--concurrency", "1,4")) == 0
    assert len(asked) == 1
    bench = asked[0]
    assert (bench.engine, bench.plans, bench.model, bench.concurrency) == ("vllm", [str(out)], str(tiny_dir), "1,4")
    assert bench.json_file == str(out / compress_stages.ENGINE_FILE)
    serving = json.loads((out / compress_options.SUMMARY_FILE).read_text())["serving"]
    assert [r["model"] for r in serving["summary"]] == ["base", "compressed"]
    card = (out / "README.md").read_text()
    assert "## Served by vllm under load" in card and "| compressed | 6 | 1 |" in card
    assert f"truedepth bench --engine vllm --model {tiny_dir} --plan {out} --concurrency 1,4" in card
    assert "Served by vllm" in capsys.readouterr().out


def test_stage_recorded_before_an_option_existed_counts_as_its_default(
    tiny_dir, texts, finished, tmp_path, capsys, monkeypatch
):
    """A folder written by an older truedepth, whose fine-tune record predates --neighbours, resumes
    with the same command (the option's default is what that run did) and refuses another value."""
    out = tmp_path / "older"
    shutil.copytree(finished, out)
    record_path = compress_stages.stage_path(out, "finetune")
    record = json.loads(record_path.read_text())
    del record["inputs"]["neighbours"]
    record_path.write_text(json.dumps(record))
    monkeypatch.setattr(compress_run, "run_finetune_stage", lambda *a, **k: pytest.fail("fine-tune ran again"))
    assert cli.main(compress_args(tiny_dir, texts, out)) == 0
    assert "finetune: finished earlier with the same options" in capsys.readouterr().out
    assert cli.main(compress_args(tiny_dir, texts, out, "--neighbours", "1")) == 2
    assert "--neighbours is 1 but the finished stage 'finetune'" in capsys.readouterr().err


def test_neighbours_train_the_ordinary_layers_next_to_each_wide_block(tiny_dir, texts, finished, tmp_path, capsys):
    from truedepth.core.arch import decoder_layers

    out = tmp_path / "neighbours"
    assert cli.main(compress_args(tiny_dir, texts, out, "--neighbours", "1")) == 0
    ft_summary = json.loads((out / compress_options.FINETUNE_DIR / "finetune_summary.json").read_text())
    assert ft_summary["config"]["neighbours"] == 1
    wide, _ = truedepth.load(finished)  # same plan, wide layers only
    both, _ = truedepth.load(out)
    widths = both.config.truedepth["layer_widths"]
    assert widths == wide.config.truedepth["layer_widths"] and 1 in widths and max(widths) > 1
    for j, (a, b) in enumerate(zip(decoder_layers(wide), decoder_layers(both))):
        if widths[j] > 1:
            continue
        next_to_wide = any(0 <= k < len(widths) and widths[k] > 1 for k in (j - 1, j + 1))
        same = all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
        assert same != next_to_wide, (j, widths)
    capsys.readouterr()
    # the finished run without --neighbours is not reused for it: refused, naming option and stage
    assert cli.main(compress_args(tiny_dir, texts, finished, "--neighbours", "1")) == 2
    assert "finished stage 'finetune'" in capsys.readouterr().err


def test_interrupted_finetune_resumes_from_its_checkpoint(tiny_dir, texts, finished, tmp_path, monkeypatch, capsys):
    killed = tmp_path / "killed"
    kill_at(monkeypatch, 4)  # dies inside step 4, after the checkpoint of step 2
    with pytest.raises(Killed):
        cli.main(compress_args(tiny_dir, texts, killed))
    monkeypatch.undo()
    assert compress_stages.read_stage(killed, "search") is not None
    assert compress_stages.read_stage(killed, "finetune") is None
    capsys.readouterr()
    assert cli.main(compress_args(tiny_dir, texts, killed)) == 0
    printed = capsys.readouterr().out
    assert "search: finished earlier" in printed and "finetune: resuming from" in printed and "step-00000002" in printed
    a, _ = truedepth.load(finished)
    b, _ = truedepth.load(killed)
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--target-depth", str(LAYERS)], f"--target-depth {LAYERS} is out of range"),
        (["--target-depth", "0"], "--target-depth 0 is out of range"),
        (["--target-depth", "2"], "--target-depth 2 is below what groups"),
        (["--budget-minutes", "1e-7"], "less than one training step"),
        (["--budget-minutes", "0"], "--budget-minutes must be positive"),
        (
            ["--generate-tokens", "0", "--corpus-share", "0.5"],
            "--corpus-share 0.5 asks for generated text but --generate-tokens is 0",
        ),
        (["--corpus-share", "1"], "--corpus-share 1 fine-tunes on --data alone"),
        (["--corpus-share", "1.5"], "--corpus-share is the share of --data"),
        (["--generate-tokens", "-1"], "--generate-tokens must be 0"),
        (["--search-dtype", "int8"], "unknown dtype 'int8'"),
        (["--lr", "0"], "--lr must be positive"),  # the fine-tune's own checks, before the search
        (["--loss", "blocks", "--neighbours", "1"], "never reaches the --neighbours or --train-last layers"),
        (["--neighbours", "-1"], "--neighbours, --train-last and --eval-every must be >= 0"),
        (["--train-last", "-1"], "--neighbours, --train-last and --eval-every must be >= 0"),
        (["--generate-from", "chat"], "tokenizer has no chat template"),  # the tiny model's: refused before the search
        (["--tokens", "0"], "--tokens must be a positive integer (got 0)"),
        (["--batch-size", "0"], "--batch-size must be a positive integer (got 0)"),
        (["--threads", "0"], "--threads must be at least 1 (got 0)"),
        (["--fidelity-tokens", "8"], "--fidelity-tokens (8) must be 0 (no comparison with the base model) or"),
        (["--mmlu-chat", "-1"], "--mmlu-chat must be between 1 and"),
        (["--engine", "vllm", "--concurrency", "0"], "--concurrency needs integers >= 1"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tiny_dir, texts, tmp_path, capsys, extra, message):
    out = tmp_path / "bad"
    assert cli.main(compress_args(tiny_dir, texts, out, *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_search_floor_is_a_lower_bound_of_the_flops_the_search_does(tiny_dir, texts):
    """The budget check's least search cost, against PyTorch's count of the matmul flops a real search does."""
    from torch.utils.flop_counter import FlopCounterMode

    opts = compress_options.CompressOptions(
        model=str(tiny_dir),
        target_depth=DEPTH,
        data=str(texts / "train.txt"),
        calib_windows=2,
        calib_length=32,
        select_windows=2,
        search_dtype=None,
        quiet=True,
    )
    with FlopCounterMode(display=False) as counter:
        compress_stages.run_search_stage(opts)
    floor = compress_budget.search_floor_flops(read_config(str(tiny_dir)), opts)
    assert floor <= counter.get_total_flops() <= 10 * floor  # a bound, and not a trivial one


def test_budget_the_search_alone_overruns_is_refused_unless_the_search_is_done(
    tiny_dir, texts, finished, tmp_path, capsys, monkeypatch
):
    """A budget whose fine-tuning time is gone before the search can end is refused before any work, with a
    budget that passes; a rerun whose search is already recorded is not held to the search's cost."""
    from truedepth.measure.bench import timing

    opts = compress_options.CompressOptions(
        target_depth=DEPTH,
        calib_windows=2,
        calib_length=32,
        select_windows=2,
        seq_len=32,
        batch_size=4,
        train_dtype="fp32",
        search_dtype="fp32",
    )  # as compress_args
    floor = compress_budget.search_floor_flops(read_config(str(tiny_dir)), opts)
    finetune_seconds = 5 * 60 * 0.8  # the end of the fine-tune's share of --budget-minutes 5
    monkeypatch.setattr(timing, "matmul_flops", lambda device, dtype: floor / (2 * finetune_seconds))
    monkeypatch.setattr(timing, "bf16_is_faster", lambda device: False)  # its cache must not keep the fake speed
    out = tmp_path / "short"
    assert cli.main(compress_args(tiny_dir, texts, out, "--search-dtype", "fp32")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "leaves 0 s for fine-tuning after the search's least time (8 min" in err[0], err
    assert not out.exists()
    need = float(err[0].split("pass --budget-minutes ")[1].split()[0])
    config = read_config(str(tiny_dir))
    assert need > 8 / 0.8  # the search's 8 minutes, and a step, before the fine-tune's end at 80 % of the budget
    compress_budget.check_budget(dataclasses.replace(opts, budget_minutes=need), config, searched=False)  # passes
    with pytest.raises(ValueError, match="less than one training step"):  # and is the least that does
        compress_budget.check_budget(dataclasses.replace(opts, budget_minutes=need - 0.1), config, searched=False)
    monkeypatch.setattr(compress_stages, "run_search", lambda *a, **k: pytest.fail("search ran again"))
    assert cli.main(compress_args(tiny_dir, texts, finished)) == 0  # recorded search: only the step must fit


def test_expected_quality_reads_the_budget_curve_at_the_finetunes_tokens(monkeypatch):
    """The fine-tune's minutes: the end of its share of the budget (80 %) less the search's usual time (4.3 times
    its least time); its tokens: those minutes at the curve machine's speed; the curve read linearly between its
    points, and held at its ends."""
    monkeypatch.setattr(compress_budget, "least_seconds", lambda config, opts: (600.0, 1.0, "cpu"))
    monkeypatch.setattr(compress_budget, "CURVE_TOKENS_PER_SECOND", 10)
    monkeypatch.setattr(compress_budget, "BUDGET_CURVE", ((0, 1.4, 1.6), (6000, 1.2, 1.4), (18000, 1.1, 1.2)))

    def line(minutes):
        return compress_budget.expected_quality(compress_options.CompressOptions(budget_minutes=minutes), None)

    got = line(60)  # 48 - 43 = 5 min, 3,000 tokens: half way to the second point
    assert (
        "leaves about 5 min" in got and "about 3,000 tokens" in got and "held-out 1.300x and other domain 1.500x" in got
    )
    assert "not measured" not in got and "the budget curve was measured on" in got
    got = line(100)  # 37 min: beyond the last point
    assert "about 37 min" in got and "1.100x and other domain 1.200x" in got and "curve ends at 18,000 tokens" in got
    got = line(10)  # the search takes it all
    assert "about 0 min" in got and "about 0 tokens" in got and "1.400x and other domain 1.600x" in got


def test_folder_with_other_content_is_refused_unless_overwrite(tiny_dir, texts, tmp_path, capsys, monkeypatch):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert cli.main(compress_args(tiny_dir, texts, out)) == 2
    assert "holds something other than a compress run; pass --overwrite" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    monkeypatch.setattr(
        compress_stages, "run_search", lambda *a, **k: (_ for _ in ()).throw(truedepth.UserError("stop here"))
    )
    assert cli.main(compress_args(tiny_dir, texts, out, "--overwrite")) == 2
    assert not (out / "notes.txt").exists() and (out / compress_options.STAGE_DIR).is_dir()


def test_transformed_model_is_refused(tiny_dir, texts, tmp_path, capsys):
    lp, tok = truedepth.load(tiny_dir, plan="parallel=2:4")
    lp.save_pretrained(tmp_path / "lp")
    tok.save_pretrained(tmp_path / "lp")
    args = compress_args(tmp_path / "lp", texts, tmp_path / "o")
    assert cli.main(args) == 2
    assert "already transformed" in capsys.readouterr().err


def test_contiguous_plan_ends_two_layers_below_the_top():
    assert compress_stages.contiguous_plan(30, 24) == "parallel=16:28"
    assert compress_stages.contiguous_plan(30, 26) == "parallel=20:28"
    assert compress_stages.contiguous_plan(8, 5) == "parallel=0:6"
    assert compress_stages.contiguous_plan(8, 3) is None


def test_without_generated_text_the_finetune_reads_the_data_itself(tmp_path):
    opts = compress_options.CompressOptions(data="austen-train", target_depth=DEPTH, out=str(tmp_path))
    compress_checks.check_options(opts)
    assert opts.generate_tokens == 0 and opts.corpus_share == 1.0  # the defaults: the novels alone
    assert compress_stages.training_data(opts, tmp_path) == "austen-train"
    assert list(tmp_path.iterdir()) == []  # no copy of the text


@pytest.mark.parametrize(
    "data",
    ["other-domain", "default", "austen-train+other-domain", "fortunes + default", "25*austen-train+75*other-domain"],
)
def test_training_text_may_not_hold_a_measuring_text(data, tmp_path):
    opts = compress_options.CompressOptions(data=data, target_depth=DEPTH, out=str(tmp_path))
    with pytest.raises(ValueError, match="is also a text the result is measured on"):
        compress_checks.check_options(opts)
