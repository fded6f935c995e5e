"""truedepth search: scoring plans from the original layers, the search itself, the baseline, the CLI."""

import copy
import json
import math

import pytest
import torch
from helpers.tiny import ARCHS, tiny_model

import truedepth
from truedepth import Plan, apply_plan
from truedepth.apps.search import beam as search_beam
from truedepth.apps.search import pipeline as search_run
from truedepth.apps.search import scoring as search_scoring
from truedepth.apps.search import space as search_space
from truedepth.cli import main
from truedepth.core.plan import parse_int_ranges


def fused_objective(model, plan, ids, objective):
    """Objective of `plan` computed independently: apply_plan on a copy, a plain forward."""
    fused = copy.deepcopy(model)
    if not Plan.parse(str(plan)).is_identity:
        apply_plan(fused, plan)
    with torch.no_grad():
        logp = torch.log_softmax(fused(ids).logits[:, :-1].float(), -1)
        if objective == "ppl":
            return torch.exp(-logp.gather(2, ids[:, 1:, None]).mean()).item()
        base = torch.log_softmax(model(ids).logits[:, :-1].float(), -1)
        return (base.exp() * (base - logp)).sum(-1).mean().item()


def plant_redundant(model, layers):
    """Zero the attention and MLP output projections: these layers return their input unchanged,
    so running them in parallel with a neighbour, or skipping them, costs exactly nothing."""
    with torch.no_grad():
        for i in layers:
            layer = model.model.layers[i]
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    return model


def calib(seed=0, n=3, t=16):
    return torch.randint(3, 128, (n, t), generator=torch.Generator().manual_seed(seed))


QUIET = dict(progress=False)


# ---- scoring ----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_scorer_equals_the_fused_model(arch):
    model, ids = tiny_model(arch, layers=8), calib()
    scorer = search_scoring.PlanScorer(model, ids, "ppl")
    assert scorer.base == pytest.approx(fused_objective(model, "base", ids, "ppl"), rel=1e-5)
    for plan in ["parallel=2:6", "parallel=5:8/3,skip=1", "skip=7", "parallel=0:2,parallel=3:6/3"]:
        assert scorer.score(plan) == pytest.approx(fused_objective(model, plan, ids, "ppl"), rel=1e-5), plan


def test_kl_objective_equals_the_fused_model():
    model, ids = tiny_model("llama", layers=8), calib()
    scorer = search_scoring.PlanScorer(model, ids, "kl")
    assert scorer.base == 0.0
    for plan in ["parallel=2:6", "parallel=4:7/3,skip=0"]:
        want = fused_objective(model, plan, ids, "kl")
        assert scorer.score(plan) == pytest.approx(want, rel=1e-4)
        assert want > 1e-4


def test_scorer_counts_passes_and_reuses_results():
    model, ids = tiny_model("llama", layers=8), calib()
    scorer = search_scoring.PlanScorer(model, ids)
    assert (scorer.evals, scorer.layer_runs) == (1, 8)  # the recording pass
    scorer.score("parallel=6:8")
    assert (scorer.evals, scorer.layer_runs) == (2, 10)  # starts at layer 6: 2 layers re-run
    scorer.score("parallel=6:8")
    assert scorer.evals == 2  # memoised
    scorer.score("skip=0")
    assert (scorer.evals, scorer.layer_runs) == (3, 17)


def test_kept_plan_gives_the_same_scores_from_fewer_layers():
    model, ids = tiny_model("llama", layers=8), calib()
    plain, kept = search_scoring.PlanScorer(model, ids), search_scoring.PlanScorer(model, ids)
    kept.keep_states("parallel=1:3")
    assert (kept.evals, kept.layer_runs) == (1, 8 + 7)  # a kept plan is not an evaluation; layers 1..7 ran
    kept.score("parallel=1:3,parallel=5:7")
    assert kept.layer_runs == 15 + 3  # from the kept input of layer 5: the pair and layer 7 (plainly: 7)
    plans = [
        "parallel=1:3,parallel=5:7",
        "parallel=1:3,skip=6",
        "parallel=1:3",
        "parallel=1:4/3",
        "skip=1",
        "parallel=0:2",
        "parallel=6:8",
        "parallel=1:3,parallel=4:6,skip=7",
    ]
    for plan in plans:
        assert kept.score(plan) == pytest.approx(plain.score(plan), rel=1e-6), plan
    kept.keep_states("skip=2,parallel=4:6")  # replaces the kept plan; positions shift after a skip
    for plan in ["skip=2,parallel=4:6,parallel=6:8", "skip=2,skip=4", "skip=2,parallel=4:6,skip=7"]:
        assert kept.score(plan) == pytest.approx(plain.score(plan), rel=1e-6), plan
    for plan in ["parallel=1:3,parallel=5:7", "skip=2,parallel=4:6,skip=7"]:
        assert plain.score(plan) == pytest.approx(fused_objective(model, plan, ids, "ppl"), rel=1e-5)


def test_scorer_refuses_a_transformed_model():
    model = apply_plan(tiny_model("llama"), "parallel=2:4")
    with pytest.raises(ValueError, match="already transformed.*without a plan"):
        search_scoring.PlanScorer(model, calib())


# ---- search space -----------------------------------------------------------------------------
def test_plan_of_joins_neighbours_and_round_trips():
    E = search_space.Element
    elems = [E(4, 2, "parallel"), E(2, 2, "parallel"), E(7, 3, "parallel"), E(10, 1, "skip"), E(11, 1, "skip")]
    plan = search_space.plan_of(elems)
    assert str(plan) == "parallel=2:6,parallel=7:10/3,skip=10:12"
    assert sorted(search_space.elements_of(Plan.parse(str(plan)), 12)) == sorted(elems)
    assert plan.depth(12) == 12 - search_space.reduction_of(elems) == 6


def test_reachable_counts_what_free_layers_still_allow():
    E = search_space.Element
    assert search_space.reachable([], 8, 2, False) == 4
    assert search_space.reachable([E(3, 2, "parallel")], 8, 2, False) == 2  # runs of 3 and 3 layers: one pair each
    assert search_space.reachable([E(3, 2, "parallel")], 8, 3, False) == 4
    assert search_space.reachable([E(3, 2, "parallel")], 8, 2, True) == 6


def test_candidates_and_reach():
    cands = search_space.candidate_elements(6, max_group=3, allow_skip=True)
    assert len([c for c in cands if c.kind == "parallel" and c.size == 2]) == 5
    assert len([c for c in cands if c.size == 3]) == 4
    assert len([c for c in cands if c.kind == "skip"]) == 6
    assert search_space.max_reduction(30, 2, False) == 15 and search_space.max_reduction(30, 3, False) == 20
    assert search_space.max_reduction(8, 3, False) == 5 and search_space.max_reduction(8, 2, True) == 7


@pytest.mark.parametrize(
    "text,want",
    [("26", [26]), ("22:29", [22, 23, 24, 25, 26, 27, 28]), ("22:25", [22, 23, 24]), ("28, 26,24", [24, 26, 28])],
)
def test_parse_targets(text, want):
    assert parse_int_ranges(text, "--target-depth") == want


def test_bad_targets_name_the_fix():
    with pytest.raises(ValueError, match="range 'A:B\\[:STEP\\]'"):
        parse_int_ranges("28-22", "--target-depth")
    with pytest.raises(ValueError, match="22:29 for 22..28"):
        parse_int_ranges("28..22", "--target-depth")
    with pytest.raises(ValueError, match="outside 1..29.*30 layers"):
        search_space.target_reductions(30, [30], None, 3, False)
    with pytest.raises(ValueError, match="lowest reachable: 15.*--max-group 3 or --allow-skip"):
        search_space.target_reductions(30, [12], None, 2, False)
    with pytest.raises(ValueError, match="exactly one"):
        search_space.target_reductions(30, [26], [4], 3, False)
    assert search_space.target_reductions(30, [28, 22, 26], None, 3, False) == [2, 4, 8]


# ---- the search -------------------------------------------------------------------------------
@pytest.mark.parametrize("max_group,allow_skip", [(2, False), (3, False), (3, True)])
def test_found_plans_have_exactly_the_target_depth(max_group, allow_skip):
    model, ids = tiny_model("qwen2", layers=8, seed=1), calib(1)
    scorer = search_scoring.PlanScorer(model, ids, "kl")
    opt = search_beam.Options(max_group=max_group, allow_skip=allow_skip, beam=2, shortlist=4, refine_rounds=1, **QUIET)
    result = search_beam.search(scorer, [1, 2, 3, 4], opt)
    assert sorted(result.found) == [1, 2, 3, 4]
    for k, found in result.found.items():
        plan = Plan.parse(str(found.plan))  # the string round-trips like any user plan
        plan.validate(8)
        assert plan.depth(8) == found.depth == 8 - k
        elems = search_space.elements_of(plan, 8)
        assert all(e.size <= max_group for e in elems if e.kind == "parallel")
        assert allow_skip or all(e.kind == "parallel" for e in elems)
        assert found.objective == scorer.score(plan) <= found.built_objective
        assert found.objective == pytest.approx(fused_objective(model, plan, ids, "kl"), rel=1e-4)


def test_search_finds_planted_redundant_layers():
    """Layers 2 and 5 return their input: the only free plans of reduction 2 use them."""
    model = plant_redundant(tiny_model("llama", layers=8, seed=2), [2, 5])
    scorer = search_scoring.PlanScorer(model, calib(2), "kl")
    for allow_skip in (False, True):
        opt = search_beam.Options(max_group=3, allow_skip=allow_skip, beam=1, shortlist=3, refine_rounds=1, **QUIET)
        found = search_beam.search(scorer, [2], opt).found[2]
        assert found.objective == scorer.base  # bit for bit: adding exact zeros changes nothing
        for e in search_space.elements_of(found.plan, 8):
            useful = [i for i in e.layers if i not in (2, 5)]
            assert len(useful) <= (1 if e.kind == "parallel" else 0), (found.plan, e)
    # nothing else is free: any plan not built around the planted layers costs something
    assert scorer.score("parallel=0:2,parallel=6:8") > scorer.base + 1e-6


def test_search_finds_a_planted_triple():
    model = plant_redundant(tiny_model("mistral", layers=8, seed=3), [3, 4])
    scorer = search_scoring.PlanScorer(model, calib(3), "kl")  # on a random model, ppl can drop below the original
    found = search_beam.search(scorer, [2], search_beam.Options(max_group=3, beam=1, shortlist=4, **QUIET)).found[2]
    assert found.objective == scorer.base
    assert str(found.plan) in ("parallel=2:5/3", "parallel=3:6/3", "parallel=2:4,parallel=4:6")


def test_cosine_proxy_is_zero_where_a_layer_does_nothing():
    model = plant_redundant(tiny_model("llama", layers=8, seed=4), [5])
    scorer = search_scoring.PlanScorer(model, calib(4), "kl")
    proxy = {str(e): scorer.cosine_proxy(e) for e in search_space.candidate_elements(8, 3, True)}
    free = {"skip=5", "parallel=5:7"}  # layer 6 reads x5 == x6
    assert all(proxy[f] < 1e-6 for f in free)
    assert min(v for k, v in proxy.items() if k not in free) > 1e-4
    # --screen keeps the best candidates by this proxy and still finds the free plan
    found = search_beam.search(
        scorer, [1], search_beam.Options(allow_skip=True, screen=3, beam=1, shortlist=2, **QUIET)
    ).found[1]
    assert found.objective == scorer.base


def test_search_copy_in_bf16_ranks_like_fp32():
    model, ids = tiny_model("llama", layers=8, seed=7), calib(7, n=4, t=32)
    assert search_run.search_copy(model, None) is model and search_run.search_copy(model, "fp32") is model
    low = search_run.search_copy(model, "bf16")
    assert next(low.parameters()).dtype == torch.bfloat16 and next(model.parameters()).dtype == torch.float32
    full, half = search_scoring.PlanScorer(model, ids, "kl"), search_scoring.PlanScorer(low, ids, "kl")
    plans = [
        "parallel=0:2",
        "parallel=2:4",
        "parallel=4:6",
        "parallel=6:8",
        "skip=3",
        "parallel=1:4/3",
        "skip=0",
        "skip=7",
        "parallel=3:5",
    ]
    exact = sorted((full.score(p), p) for p in plans)
    # the test means something only if neighbours in the fp32 ranking differ by more than bf16's error
    assert all(b[0] > 1.1 * a[0] for a, b in zip(exact, exact[1:])), exact
    assert [p for _, p in sorted((half.score(p), p) for p in plans)] == [p for _, p in exact]
    for p in plans:
        assert half.score(p) == pytest.approx(full.score(p), rel=0.1)


@pytest.mark.parametrize("bf16_flops, want", [(300e9, torch.bfloat16), (160e9, torch.float32)])
def test_auto_search_dtype_copies_to_bf16_only_where_timing_finds_it_faster(monkeypatch, bf16_flops, want):
    from truedepth.measure.bench import timing

    monkeypatch.setattr(
        timing, "matmul_flops", lambda device, dtype, **k: bf16_flops if dtype == torch.bfloat16 else 200e9
    )
    timing.bf16_is_faster.cache_clear()
    try:
        model = tiny_model("llama", layers=2)
        chosen = search_run.search_copy(model, "auto")
        assert next(chosen.parameters()).dtype == want and (chosen is model) == (want == torch.float32)
        assert next(model.parameters()).dtype == torch.float32  # the model itself is never cast
        low = model.to(torch.bfloat16)
        assert search_run.search_copy(low, "auto") is low  # already low precision: no copy
    finally:
        timing.bf16_is_faster.cache_clear()


def test_budget_still_reaches_the_target():
    model, ids = tiny_model("llama", layers=8), calib()
    scorer = search_scoring.PlanScorer(model, ids)
    after_proxies = 1 + len(search_space.candidate_elements(8, 3, False))
    result = search_beam.search(scorer, [4], search_beam.Options(beam=3, shortlist=6, budget=2, **QUIET))
    assert result.found[4].plan.depth(8) == 4
    assert scorer.evals <= after_proxies + 2 + 4  # budget, then one evaluation per level


def test_refinement_moves_keep_the_reduction():
    E = search_space.Element
    chosen = (E(1, 2, "parallel"), E(4, 3, "parallel"), E(7, 1, "skip"))
    ranked = search_space.candidate_elements(9, 3, True)
    for cand in search_beam.neighbours(chosen, ranked, 4, 9):
        assert search_space.reduction_of(cand) == 4
        search_space.plan_of(cand).validate(9)
        assert len(set(cand) & set(chosen)) == 2  # exactly one element swapped


def test_baseline_is_the_best_contiguous_range_of_pairs():
    model, ids = tiny_model("llama", layers=8, seed=5), calib(5)
    scorer = search_scoring.PlanScorer(model, ids)
    base = search_beam.contiguous_baseline(scorer, [2, 3], progress=False)
    for k in (2, 3):
        costs = {s: fused_objective(model, f"parallel={s}:{s + 2 * k}", ids, "ppl") for s in range(8 - 2 * k + 1)}
        best = min(costs, key=costs.get)
        assert base[k]["plan"]["plan"] == f"parallel={best}:{best + 2 * k}"
        assert len(base[k]["tried"]) == len(costs)


def test_calibration_windows_are_spread_and_deterministic():
    tok = CharTokenizer()
    text = "".join(f"word{i} " for i in range(3000))
    ids = search_scoring.calibration_ids(tok, text, windows=4, length=50)
    assert ids.shape == (4, 50)
    assert torch.equal(ids, search_scoring.calibration_ids(tok, text, windows=4, length=50))
    assert not torch.equal(ids[0], ids[-1])
    with pytest.raises(ValueError, match="too short.*--calib-length"):
        search_scoring.calibration_ids(tok, "short text", windows=2, length=50)


@pytest.mark.parametrize("objective", ["ppl", "kl"])
def test_window_losses_are_the_fused_models_per_window_losses(objective):
    model, ids = tiny_model("llama", layers=8, seed=10), calib(10, n=4)
    scorer, plan = search_scoring.PlanScorer(model, ids, objective), "parallel=2:4,skip=6"
    losses = scorer.window_losses(plan)
    fused = apply_plan(copy.deepcopy(model), plan)
    with torch.no_grad():  # independent reference: a plain forward of the fused model, per window
        logp = torch.log_softmax(fused(ids).logits[:, :-1].float(), -1)
        if objective == "ppl":
            want = -logp.gather(2, ids[:, 1:, None]).squeeze(-1).mean(1)
        else:
            base = torch.log_softmax(model(ids).logits[:, :-1].float(), -1)
            want = (base.exp() * (base - logp)).sum(-1).mean(1)
    assert losses.shape == (4,) and torch.allclose(losses, want.double(), rtol=1e-4, atol=1e-7)
    mean = float(losses.mean())
    assert scorer.score(plan) == pytest.approx(math.exp(mean) if objective == "ppl" else mean, rel=1e-12)


def test_selection_windows_are_disjoint_from_the_search_windows():
    tok = CharTokenizer()
    text = "".join(f"word{i} " for i in range(3000))
    search_ids, select_ids = search_scoring.split_calibration_ids(tok, text, windows=4, select=6, length=50)
    assert search_ids.shape == (4, 50) and select_ids.shape == (6, 50)
    together = search_scoring.calibration_ids(tok, text, windows=10, length=50)  # the same windows, dealt out
    rows = {tuple(r) for r in together.tolist()}
    assert {tuple(r) for r in search_ids.tolist()} | {tuple(r) for r in select_ids.tolist()} == rows
    assert not {tuple(r) for r in search_ids.tolist()} & {tuple(r) for r in select_ids.tolist()}
    where = [together.tolist().index(r) for r in search_ids.tolist()]
    assert where == [1, 3, 6, 8]  # both sets sample the whole text, dealt out alternately
    only, none = search_scoring.split_calibration_ids(tok, text, windows=4, select=0, length=50)
    assert none is None and torch.equal(only, search_scoring.calibration_ids(tok, text, windows=4, length=50))


def test_final_choice_is_the_best_finalist_on_fresh_windows():
    model = tiny_model("llama", layers=8, seed=8)
    scorer, selector = (
        search_scoring.PlanScorer(model, calib(8), "kl"),
        search_scoring.PlanScorer(model, calib(9), "kl"),
    )
    result = search_beam.search(scorer, [2, 3], search_beam.Options(beam=2, shortlist=4, **QUIET))
    picked = {k: f.plan for k, f in result.found.items()}
    search_beam.contiguous_baseline(scorer, [2, 3], progress=False)  # contiguous ranges join the pool
    search_beam.select_on_fresh_windows(scorer, selector, result.found, finalists=4, progress=False)
    for k, f in result.found.items():
        # independent reference: every plan of this reduction the scorer saw, fused for real
        pool = sorted(
            (fused_objective(model, p, calib(8), "kl"), p) for p in scorer.scored() if Plan.parse(p).depth(8) == 8 - k
        )
        finalists = [p for _, p in pool[:4]]
        assert [r["plan"] for r in f.finalists] == finalists
        fresh = {p: fused_objective(model, p, calib(9), "kl") for p in finalists}
        assert str(f.plan) == min(fresh, key=fresh.get)
        assert f.selection_objective == pytest.approx(fresh[str(f.plan)], rel=1e-4)
        assert f.objective == scorer.score(f.plan) and f.plan.depth(8) == 8 - k
        assert f.search_plan == picked[k]
        assert f"parallel=0:{2 * k}" in scorer.scored()  # the baseline's ranges were candidates
    # every finalist was scored once on the fresh windows, after the selector's recording pass
    assert sum(f.selection_passes for f in result.found.values()) == selector.evals - 1 == 8


# ---- command line -----------------------------------------------------------------------------
class CharTokenizer:
    """One token per character: enough for calibration windows and perplexity on a tiny model."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + ord(c) % 120 for c in text]}


@pytest.fixture
def tiny_cli(monkeypatch):
    model = tiny_model("llama", layers=6, seed=6)
    import truedepth.core.loading
    import truedepth.measure.eval.data

    monkeypatch.setattr(truedepth.core.loading, "load_for_device", lambda *a, **k: (model, CharTokenizer()))
    texts = {
        "austen-train": "".join(f"calibration {i} " for i in range(800)),
        "default": "".join(f"held out {i} " for i in range(800)),
    }
    monkeypatch.setattr(truedepth.measure.eval.data, "load_text", lambda spec: texts[spec])
    return model


def test_cli_search_writes_plans_json_and_plot(tiny_cli, tmp_path, capsys):
    out, png = tmp_path / "s.json", tmp_path / "s.png"
    rc = main(
        [
            "search",
            "--target-depth",
            "4:6",
            "--calib-windows",
            "2",
            "--calib-length",
            "32",
            "--baseline",
            "--report-tokens",
            "256",
            "--report-window",
            "64",
            "--shortlist",
            "3",
            "--quiet",
            "--out",
            str(out),
            "--plot",
            str(png),
        ]
    )
    assert rc == 0
    summary = json.loads(out.read_text())
    assert [f["depth"] for f in summary["found"]] == [5, 4]
    assert [b["depth"] for b in summary["baseline"]] == [5, 4]
    for row in summary["found"]:
        plan = Plan.from_dict(row["plan"])  # the JSON every other command accepts
        assert plan.depth(6) == row["depth"] and str(plan) == row["plan"]["plan"]
        # held-out numbers come from the real fused model
        fused = apply_plan(copy.deepcopy(tiny_cli), plan)
        from truedepth.measure.eval.perplexity import perplexity

        want = perplexity(
            fused, CharTokenizer(), "".join(f"held out {i} " for i in range(800)), tokens=256, window=64, progress=False
        )["perplexity"]
        assert row["heldout_ppl"] == pytest.approx(want, rel=1e-6)
    assert summary["base_heldout_ppl"] > 0 and summary["forward_passes"] > 1
    for row in summary["found"]:  # the final choice on fresh windows is recorded with its finalists
        assert row["plan"]["plan"] in [f["plan"] for f in row["finalists"]]
        assert row["selection_objective"] == min(f["selection_objective"] for f in row["finalists"])
    assert all(b["selection_objective"] > 0 for b in summary["baseline"])
    assert png.stat().st_size > 10_000
    text = capsys.readouterr().out
    assert "best contiguous range" in text and "forward passes" in text


def test_cli_single_target_prints_plan_and_json(tiny_cli, capsys):
    rc = main(
        [
            "search",
            "--reduce",
            "2",
            "--calib-windows",
            "2",
            "--calib-length",
            "32",
            "--report",
            "none",
            "--quiet",
            "--max-group",
            "2",
            "--allow-skip",
            "--select-windows",
            "0",
        ]
    )
    assert rc == 0
    lines = capsys.readouterr().out.splitlines()
    plan = Plan.parse(next(x for x in lines if x.startswith("plan: "))[6:])
    assert Plan.from_json(next(x for x in lines if x.startswith("json: "))[6:]) == plan
    assert plan.depth(6) == 4


@pytest.mark.parametrize(
    "argv,message",
    [
        ([], "exactly one of --target-depth"),
        (["--target-depth", "5", "--reduce", "1"], "exactly one of --target-depth"),
        (["--target-depth", "6"], "outside 1..5"),
        (["--target-depth", "1", "--max-group", "2"], "lowest reachable: 3"),
        (["--target-depth", "five"], "cannot read --target-depth"),
        (["--target-depth", "4", "--report", "austen-train"], "same text"),
        (["--target-depth", "4", "--beam", "0"], "--beam must be at least 1"),
        (["--target-depth", "4", "--finalists", "0"], "--finalists must be at least 1"),
        (["--target-depth", "4", "--select-windows", "-1"], "--select-windows must be 0 or more"),
        (["--target-depth", "4", "--search-dtype", "int8"], "unknown dtype 'int8'"),
    ],
)
def test_cli_errors_name_the_problem(tiny_cli, capsys, argv, message):
    assert main(["search", *argv, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("truedepth search: error:") and message in err


def test_cli_help_describes_the_algorithm(capsys):
    with pytest.raises(SystemExit):
        main(["search", "--help"])
    text = capsys.readouterr().out
    for word in (
        "--target-depth",
        "--reduce",
        "--objective",
        "--max-group",
        "--allow-skip",
        "--budget",
        "--calib",
        "--baseline",
        "beam",
        "forward",
        "--select-windows",
        "--finalists",
    ):
        assert word in text


@pytest.mark.integration
def test_default_model_search_small():
    """The real default model: a two-pair plan beats or ties the best contiguous pair range."""
    torch.set_num_threads(1)
    model, tok = truedepth.load("default")
    from truedepth.measure.eval.data import training_text

    ids = search_scoring.calibration_ids(tok, training_text(), windows=2, length=64)
    scorer = search_scoring.PlanScorer(model, ids, "ppl")
    opt = search_beam.Options(beam=1, shortlist=3, refine_rounds=0, screen=12, **QUIET)
    found = search_beam.search(scorer, [2], opt).found[2]
    assert found.plan.depth(30) == 28
    base = search_beam.contiguous_baseline(scorer, [2], progress=False)[2]
    assert found.objective <= base["objective"] * 1.05
