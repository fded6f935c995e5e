"""truedepth sweep: points, resumable results, tables, plots, bench files, report."""

import copy
import csv
import json

import pytest
import torch
from helpers.tiny import tiny_model

import truedepth
from truedepth.apps.sweep import plots, report, tables
from truedepth.apps.sweep import points as pts
from truedepth.core.plan import Plan, RangeChangeWarning, parse_int_ranges
from truedepth.utils.errors import MissingAssetError


# ---------------------------------------------------------------------------------------------
# Points
# ---------------------------------------------------------------------------------------------
def test_int_ranges_follow_the_plan_grammar_end_exclusive():
    assert parse_int_ranges("2:17:2", "--delta") == [2, 4, 6, 8, 10, 12, 14, 16]
    assert parse_int_ranges("1:3", "--delta") == [1, 2] == list(Plan.parse("skip=1:3").steps[0].layers)
    assert parse_int_ranges("8, 2,8", "--delta") == [2, 8]
    for bad, msg in (
        ("a", "cannot read --delta 'a'"),
        ("5:2", "is empty"),
        ("2:2", "is empty"),
        ("1:2:0", "is empty"),
        (",", "no --delta"),
        ("0,4", ">= 1"),
    ):
        with pytest.raises(ValueError, match=msg):
            parse_int_ranges(bad, "--delta", minimum=1)


def test_old_inclusive_ranges_that_would_change_meaning_are_explained():
    with pytest.raises(ValueError) as e:  # the old default: 2..16 inclusive would silently lose 16
        parse_int_ranges("2:16:2", "--delta", was_inclusive=True)
    assert str(e.value) == (
        "--delta 2:16:2: ranges now exclude their end, as in plans, so this no longer includes 16 "
        "(it meant 2, 4, ..., 16; now 2, 4, ..., 14). Write 2:17:2 for 2, 4, ..., 16, "
        "or 2:15:2 for 2, 4, ..., 14."
    )
    assert parse_int_ranges("2:15:2", "--delta", was_inclusive=True) == [2, 4, 6, 8, 10, 12, 14]  # unambiguous
    with pytest.warns(RangeChangeWarning, match=r"--start 0:3 means 0, 1, 2: .*write 0:4 for that"):
        assert parse_int_ranges("0:3", "--start", was_inclusive=True) == [0, 1, 2]
    with pytest.raises(
        ValueError,
        match=r"--target-depth 28..22: write ranges as A:B, end exclusive as in plans "
        r"\(22:29 for 22..28\)",
    ):
        parse_int_ranges("28..22", "--target-depth")


def test_cli_refuses_the_old_default_delta_before_any_work(capsys, tmp_path):
    from truedepth.cli import main

    assert main(["sweep", "--out", str(tmp_path), "--delta", "2:16:2"]) == 2
    assert "Write 2:17:2 for 2, 4, ..., 16" in capsys.readouterr().err
    assert not (tmp_path / pts.RESULTS_FILE).exists()


def test_points_at_the_default_position_end_two_layers_before_the_last():
    points, notes = pts.sweep_points(["parallel", "skip"], [2, 3, 16], "end", 30)
    plans = [str(p.plan()) for p in points]
    assert plans == ["base", "parallel=26:28", "parallel=12:28", "skip=26:28", "skip=25:28", "skip=12:28"]
    assert notes == ["parallel: odd Δ 3 left out (pairs need an even Δ)"]
    depths = {str(p.plan()): p.plan().depth(30) for p in points}
    assert depths["parallel=12:28"] == 22 and depths["skip=12:28"] == 14  # L - Δ/2 and L - Δ


def test_points_centre_and_start_scan():
    centre, _ = pts.sweep_points(["merge"], [4], "center", 30, include_base=False)
    assert [str(p.plan()) for p in centre] == ["merge=13:17"]
    scan, notes = pts.sweep_points(["parallel"], [8], "0:25:8", 30, include_base=False)
    assert [str(p.plan()) for p in scan] == ["parallel=0:8", "parallel=8:16", "parallel=16:24"]
    assert "1 ranges do not fit 30 layers (e.g. 24:32)" in notes[0]


def test_points_errors_name_the_fix():
    with pytest.raises(ValueError, match="no parallel point fits.*Δ is even"):
        pts.sweep_points(["parallel"], [3, 5], "end", 30)
    with pytest.raises(ValueError, match="no skip point fits"):
        pts.sweep_points(["skip"], [4], "40", 30)
    with pytest.raises(ValueError, match="unknown transform 'pairs'"):
        pts.parse_transforms("parallel,pairs")


def test_shuffle_points_never_keep_the_original_order():
    for start, end in ((26, 28), (10, 12), (0, 3)):
        plan = pts.Point("shuffle", end - start, start).plan(seed=0)
        order = [j for b in plan.blocks(30) for j in b.layers][start:end]
        assert sorted(order) == list(range(start, end)) and order != list(range(start, end))


# ---------------------------------------------------------------------------------------------
# Model copies
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("plan", ["parallel=2:6", "skip=1:3", "merge=4:8", "shuffle=2:6@1"])
def test_plan_copy_shares_untouched_weights_and_leaves_the_base_intact(plan):
    base = tiny_model("llama", layers=8)
    ids = torch.randint(3, 128, (1, 10))
    before = base(ids).logits
    want = truedepth.apply_plan(copy.deepcopy(base), plan)(ids).logits
    cheap = pts.plan_copy(base, Plan.parse(plan))
    got = truedepth.apply_plan(cheap, plan)(ids).logits
    assert torch.equal(got, want)
    assert torch.equal(base(ids).logits, before)  # the base model is untouched
    assert type(base).__name__ == "LlamaForCausalLM" and len(base.model.layers) == 8
    touched = {i for s in Plan.parse(plan).steps if s.kind != "shuffle" for i in s.layers}
    shared = base.model.embed_tokens.weight.data_ptr() == cheap.model.embed_tokens.weight.data_ptr()
    assert shared
    base_ptrs = {p.data_ptr() for i in range(8) if i not in touched for p in base.model.layers[i].parameters()}
    copy_ptrs = {p.data_ptr() for p in cheap.parameters()}
    assert base_ptrs <= copy_ptrs  # untouched layers are not copied


# ---------------------------------------------------------------------------------------------
# Running: resumable
# ---------------------------------------------------------------------------------------------
def make_sweep(tmp_path, **kw):
    args = dict(
        out=tmp_path,
        transforms=["parallel", "skip"],
        deltas=[2, 4],
        tokens=64,
        window=32,
        model="tiny",
        dtype="fp32",
        progress=False,
    )
    args.update(kw)
    return pts.Sweep(**args)


def test_run_sweep_measures_each_point_once_and_resumes(tmp_path, monkeypatch):
    from truedepth.measure.eval.perplexity import perplexity

    model = tiny_model("llama", layers=8)
    ids = torch.randint(3, 128, (64,)).tolist()
    sweep = make_sweep(tmp_path)
    points, _ = pts.sweep_points(sweep.transforms, sweep.deltas, "end", 8)
    calls = []
    real = pts.measure_point

    def counting(base, tok, plan, todo, s, i):
        calls.append(str(plan))
        if len(calls) == 3:
            raise KeyboardInterrupt  # an interruption in the middle of the sweep
        return real(base, tok, plan, todo, s, i)

    monkeypatch.setattr(pts, "measure_point", counting)
    with pytest.raises(KeyboardInterrupt):
        pts.run_sweep(sweep, model, None, points, ids)
    assert len(pts.read_results(tmp_path / pts.RESULTS_FILE)) == 2
    with open(tmp_path / pts.RESULTS_FILE, "a") as f:
        f.write('{"key": "torn')  # a half-written line from a killed process is ignored
    calls.clear()
    monkeypatch.setattr(pts, "measure_point", lambda *a: (calls.append(str(a[2])), real(*a))[1])
    pts.run_sweep(sweep, model, None, points, ids)
    assert calls == [str(p.plan()) for p in points][2:]  # only the unfinished points
    calls.clear()
    pts.run_sweep(sweep, model, None, points, ids)  # rerun with the same settings: nothing to do
    assert calls == []
    rows = tables.collect_rows(pts.read_results(tmp_path / pts.RESULTS_FILE).values(), sweep.settings())
    assert [r["plan"] for r in rows] == ["base", "parallel=4:6", "parallel=2:6", "skip=4:6", "skip=2:6"]
    # the stored numbers are the perplexity of the transformed model, computed independently here
    want = perplexity(
        truedepth.apply_plan(copy.deepcopy(model), "parallel=2:6"), None, ids, tokens=64, window=32, progress=False
    )["perplexity"]
    assert rows[2]["perplexity"] == pytest.approx(want, rel=1e-6)
    assert rows[0]["perplexity_rel"] == 1.0 and rows[2]["perplexity_rel"] == pytest.approx(rows[0]["perplexity"] / want)


def test_other_settings_are_new_points(tmp_path):
    settings = make_sweep(tmp_path).settings()
    other = make_sweep(tmp_path, tokens=128).settings()
    assert pts.measurement_keys(settings, "base") != pts.measurement_keys(other, "base")
    with_tasks = make_sweep(tmp_path, tasks=["t"], limit=5).settings()
    keys = pts.measurement_keys(with_tasks, "base")
    assert keys["perplexity"] == pts.measurement_keys(settings, "base")["perplexity"]  # perplexity reused
    assert "tasks" in keys


# ---------------------------------------------------------------------------------------------
# Tables, plots, bench, report (from synthetic records: no model needed)
# ---------------------------------------------------------------------------------------------
def synthetic_records(sweep, L=30):
    settings = sweep.settings()
    recs = []
    points, _ = pts.sweep_points(["parallel", "skip", "merge", "shuffle"], list(range(1, 17)), "end", L)
    scan, _ = pts.sweep_points(["parallel"], [8], "0:23:2", L, include_base=False)
    for p in points + scan:
        plan = p.plan()
        ppl = 20.0 * (1.03 if p.transform == "parallel" else 1.2) ** p.delta
        rec = {
            "measure": "perplexity",
            **pts.point_record(p, plan, L),
            "settings": settings,
            "perplexity": ppl,
            "date": "2026-11-26T10:00:00",
            "machine": "test machine",
        }
        rec["key"] = pts.measurement_keys(settings, str(plan))["perplexity"]
        recs.append(rec)
        if p.transform == "base" or (p.transform == "parallel" and p.delta % 4 == 0 and p.start == L - 2 - p.delta):
            tsettings = dict(settings, tasks={"tasks": ["lw"], "num_fewshot": None, "limit": 10})
            recs.append(
                {
                    "measure": "tasks",
                    **pts.point_record(p, plan, L),
                    "settings": tsettings,
                    "key": f"t{plan}",
                    "tasks": {"lw": {"acc": 0.5 - 0.001 * p.delta**2, "acc_stderr": 0.05, "n_samples": 10}},
                }
            )
    return recs


def test_collect_rows_tables_and_plots(tmp_path):
    sweep = make_sweep(tmp_path, model="default", tokens=8192, window=512)
    rows = tables.collect_rows(synthetic_records(sweep), sweep.settings())
    by_plan = {r["plan"]: r for r in rows}
    assert by_plan["parallel=20:28"]["lw"] == pytest.approx(0.436)
    assert by_plan["parallel=20:28"]["lw_rel"] == pytest.approx(0.436 / 0.5)
    assert by_plan["parallel=20:28"]["lw_n"] == 10 and "lw" not in by_plan["skip=20:28"]
    csv_path, json_path = tables.write_tables(tmp_path, rows, {"m": 1})
    table = list(csv.DictReader(open(csv_path)))
    assert table[0]["plan"] == "base" and {"perplexity", "perplexity_rel", "lw", "lw_stderr"} <= set(table[0])
    assert json.loads(json_path.read_text())["rows"][0]["plan"] == "base"
    made = plots.make_plots(tmp_path, rows, "end", None, "default")
    assert {p.name for p in made} == {"delta.png", "start.png", "pareto.png", "relative.png"}
    assert all(p.stat().st_size > 10_000 for p in made)
    assert "parallel=20:28" in tables.format_table(rows)


def test_findings_and_report(tmp_path):
    sweep = make_sweep(tmp_path, model="default", tokens=8192, window=512)
    rows = tables.collect_rows(synthetic_records(sweep), sweep.settings())
    # parallel ppl grows 3 % per layer: kept >= 95 % while 1.03**-Δ >= 0.95, i.e. Δ <= 1 -> even Δ: none
    assert report.largest_kept(rows, "end", "parallel", "perplexity", 0.80) == 6  # 1.03**-6 = 0.837, **-8 = 0.789
    assert report.largest_kept(rows, "end", "skip", "perplexity", 0.95) is None
    a, b, ka, kb = report.steepest_fall(rows, "end", "parallel", "lw")
    assert (a, b) == (12, 16) and (ka, kb) == pytest.approx((0.356 / 0.5, 0.244 / 0.5))  # acc 0.5 - 0.001 Δ²
    meta = {
        "settings": sweep.settings(),
        "machine": "test machine",
        "first_date": "2026-11-26",
        "last_date": "2026-11-26",
        "results": "runs/x/results.jsonl",
    }
    md = report.write_report(
        sweep,
        rows,
        meta,
        tmp_path / "docs" / "RESULTS.md",
        tmp_path / "docs" / "img",
        "scripts/results.sh",
        "end",
        None,
    )
    text = md.read_text()
    for needle in (
        "## Parallel against skip at equal depth",
        "| 26 | `parallel=20:28` | `skip=24:28` |",
        "## Which positions tolerate pairing",
        "paper: Llama 2 7B (32 layers)",
        "test machine",
        "![quality against Δ](img/sweep_delta.png)",
        "scripts/results.sh",
    ):
        assert needle in text, needle
    assert (tmp_path / "docs" / "img" / "sweep_relative.png").is_file()


def test_pareto_front():
    pts = [(30, 10.0), (29, 10.5), (28, 10.2), (26, 30.0), (27, 12.0)]
    assert plots.pareto_front(pts, lower_x_better=True, lower_y_better=True) == [
        (26, 30.0),
        (27, 12.0),
        (28, 10.2),
        (30, 10.0),
    ]


def test_read_bench_is_lenient(tmp_path):
    records = [
        {"plan": "base", "mode": "eager", "batch": 1, "decode_tok_s": 20.0},
        {"plan": "parallel=20:28", "mode": "eager", "batch": 1, "decode_tok_s": 25.0},
        {"plan": "parallel=20:28", "mode": "eager", "batch": 8, "decode_tok_s": 99.0},
        {"plan": "parallel=20:28", "mode": "fast", "batch": 1, "decode_tok_s": 50.0},
        {"plan": "skip=1", "mode": "eager", "batch": 1, "error": "boom"},
    ]
    (tmp_path / "a.json").write_text(json.dumps({"meta": {}, "records": records}))
    assert tables.read_bench(tmp_path / "a.json") == {"base": 50.0, "parallel=20:28": 40.0}
    assert tables.read_bench(tmp_path / "a.json", mode="fast") == {"parallel=20:28": 20.0}
    (tmp_path / "b.jsonl").write_text(
        "\n".join(
            json.dumps({"plan": {"steps": [{"kind": "parallel", "start": 20, "end": 28}]}, "decode_tokens_per_s": 10.0})
            for _ in range(2)
        )
    )
    assert tables.read_bench(tmp_path / "b.jsonl") == {"parallel=20:28": 100.0}
    (tmp_path / "c.json").write_text(json.dumps([{"plan": "base"}]))
    with pytest.raises(ValueError, match="no bench record with a plan and a decode speed"):
        tables.read_bench(tmp_path / "c.json")


# ---------------------------------------------------------------------------------------------
# CLI: errors before any work
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, message",
    [
        (["--transforms", "parallel", "--delta", "3"], "no parallel point fits"),
        (["--transforms", "twist"], "unknown transform 'twist'"),
        (["--limit", "5"], "--num-fewshot and --limit apply to --tasks"),
        (["--window", "1"], "window must be an integer of at least 2"),
        (["--bench", "missing.json"], "--bench missing.json: no such file"),
        (["--tasks", "truedepth_mmlu_anatomyy"], "did you mean truedepth_mmlu_anatomy"),
    ],
)
def test_cli_errors(argv, message, capsys, tmp_path):
    from truedepth.cli import main

    assert main(["sweep", "--out", str(tmp_path), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / pts.RESULTS_FILE).exists()


def test_cli_list(capsys):
    from truedepth.cli import main

    pytest.importorskip("truedepth.core.loading")  # the default model's config is read, not its weights
    try:
        code = main(["sweep", "--list", "--transforms", "parallel", "--delta", "2:5:2", "--debug"])  # --debug: raise
    except MissingAssetError:
        pytest.skip("default model not installed")
    out = capsys.readouterr().out
    assert code == 0 and "parallel=24:28           depth 28" in out and out.startswith("base")
