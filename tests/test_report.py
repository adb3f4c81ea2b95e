"""The comparison: runs resume, the report renders from saved results with every plot embedded."""

import json
from pathlib import Path

import pytest

from tiny_experiment import tiny_overrides
from ubsmoe.cli import main
from ubsmoe.config import ConfigError
from ubsmoe.report.compare import build_report, run_comparison
from ubsmoe.report.variants import Variant, parse_variants


@pytest.fixture(scope="module")
def comparison(tiny_bert, tiny_task, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    overrides = tiny_overrides(tiny_bert, tiny_task, **{"federation.rounds": 1, "train.local_steps": 2})
    summary = run_comparison(["smoe", "hetlora"], [0, 1], out, overrides=overrides, show_progress=False)
    return out, overrides, summary


def test_compare_writes_every_run_and_the_summary(comparison):
    out, _, summary = comparison
    assert sorted(p.parent.name for p in out.glob("*/results.json")) == ["hetlora-s0", "hetlora-s1", "smoe-s0", "smoe-s1"]
    saved = json.loads((out / "compare.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    smoe = saved["methods"]["smoe"]
    runs = [json.loads((out / f"smoe-s{s}" / "results.json").read_text()) for s in (0, 1)]
    accuracies = [r["final"]["tier_accuracy"]["0.5"] for r in runs]
    assert smoe["accuracy"]["0.5"]["mean"] == pytest.approx(sum(accuracies) / 2)
    assert smoe["accuracy"]["0.5"]["std"] == pytest.approx(abs(accuracies[0] - accuracies[1]) / 2)
    assert smoe["seeds"] == [0, 1]
    assert saved["methods"]["hetlora"]["low_tier_reduction"]["train_flops_per_token"] < \
        smoe["low_tier_reduction"]["train_flops_per_token"]


def test_compare_skips_finished_runs(comparison, monkeypatch):
    out, overrides, _ = comparison

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished run was run again")

    monkeypatch.setattr("ubsmoe.engine.rounds.run_experiment", must_not_run)
    run_comparison(["smoe", "hetlora"], [0, 1], out, overrides=overrides, show_progress=False)


def test_report_rebuilds_from_saved_results_with_every_plot_embedded(comparison, tmp_path):
    out, _, _ = comparison
    for name in ("report.md", "report.html", "compare.json"):
        (out / name).unlink()
    assert main(["report", str(out)]) == 0
    html = (out / "report.html").read_text()
    plots = sorted((out / "plots").glob("*.png"))
    # accuracy per round, accuracy by method, accuracy against compute, one load heatmap (smoe)
    assert len(plots) == 4
    assert html.count("<img") == len(plots) and html.count("data:image/png;base64,") == len(plots)
    assert "http" not in html  # nothing to fetch
    md = (out / "report.md").read_text()
    assert "| smoe | 2 |" in md and "| hetlora | 2 |" in md


def test_report_of_an_empty_folder_is_a_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no finished runs" in capsys.readouterr().err


def test_compare_refuses_unknown_methods_before_running(tmp_path, capsys):
    assert main(["compare", "--methods", "smoe,nosuch", "--out", str(tmp_path)]) == 2
    assert "nosuch" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_rebuilt_report_keeps_the_comparisons_method_order(comparison, tmp_path):
    out, _, _ = comparison
    folder = tmp_path / "order"
    for run in out.glob("*-s0"):
        (folder / run.name).mkdir(parents=True)
        (folder / run.name / "results.json").write_text((run / "results.json").read_text())
    build_report(folder, methods=["smoe", "hetlora"])
    assert main(["report", str(folder)]) == 0
    assert list(json.loads((folder / "compare.json").read_text())["methods"]) == ["smoe", "hetlora"]
    (folder / "compare.json").write_text("{not json")  # an unreadable summary: back to the order of names
    assert main(["report", str(folder)]) == 0
    assert list(json.loads((folder / "compare.json").read_text())["methods"]) == ["hetlora", "smoe"]


# ---------------------------------------------------------------------------------------- variants
def test_variants_are_parsed_from_the_command_line_form():
    plain, ablation, several = parse_variants("ubsmoe, ubsmoe:pg=false,ubsmoe:zeta=0.25:federation.rounds=3")

    assert plain == Variant("ubsmoe", "ubsmoe") and plain.folder(0) == "ubsmoe-s0"
    assert ablation.overrides == ("method.pg=false",) and ablation.folder(2) == "ubsmoe_pg=false-s2"
    assert several.overrides == ("method.zeta=0.25", "federation.rounds=3")
    assert several.label == "ubsmoe:zeta=0.25:federation.rounds=3"


@pytest.mark.parametrize("text, message", [
    ("ubsmoe,pg=false", "does not start with a method name"),
    ("ubsmoe:pg", "'pg' is not key=value"),
    ("ubsmoe,ubsmoe", "variants listed twice: ubsmoe"),
    (" , ", "at least one method or variant"),
])
def test_malformed_variants_are_refused(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_variants(text)


def test_variants_from_a_toml_file(tmp_path):
    path = tmp_path / "variants.toml"
    path.write_text('variants = ["smoe", "ubsmoe:pg=false",\n'
                    '  {method = "ubsmoe", label = "low only", federation = {budgets = [0.25]}, zeta = 0.5, dmr = true}]\n')

    variants = parse_variants(str(path))

    assert [v.label for v in variants] == ["smoe", "ubsmoe:pg=false", "low only"]
    assert variants[2].overrides == ("federation.budgets=0.25", "method.zeta=0.5", "method.dmr=true")
    assert variants[2].folder(0) == "low_only-s0"


@pytest.fixture(scope="module")
def ablation(tiny_bert, tiny_task, tmp_path_factory):
    out = tmp_path_factory.mktemp("ablation")
    overrides = tiny_overrides(tiny_bert, tiny_task, **{"federation.rounds": 1, "train.local_steps": 2,
                                                        "federation.budgets": "0.25,0.5"})
    summary = run_comparison(parse_variants("ubsmoe,ubsmoe:pg=false,hetlora,smoe:federation.budgets=0.25"), [0], out,
                             overrides=overrides, show_progress=False)
    return out, overrides, summary


def test_compare_runs_variants_of_one_method_into_their_own_folders(ablation):
    out, _, summary = ablation

    runs = {p.parent.name: json.loads(p.read_text()) for p in out.glob("*/results.json")}

    assert sorted(runs) == ["hetlora-s0", "smoe_federation.budgets=0.25-s0", "ubsmoe-s0", "ubsmoe_pg=false-s0"]
    assert runs["ubsmoe_pg=false-s0"]["variant"] == "ubsmoe:pg=false"
    assert runs["ubsmoe_pg=false-s0"]["config"]["method"]["pg"] is False
    assert runs["ubsmoe-s0"]["config"]["method"]["pg"] is True
    assert list(summary["methods"]) == ["ubsmoe", "ubsmoe:pg=false", "hetlora", "smoe:federation.budgets=0.25"]
    assert runs["smoe_federation.budgets=0.25-s0"]["tiers"] == [0.25]
    assert summary["methods"]["ubsmoe:pg=false"]["method"] == "ubsmoe"
    assert summary["methods"]["ubsmoe:pg=false"]["accuracy"]["0.25"]["mean"] == \
        runs["ubsmoe_pg=false-s0"]["final"]["tier_accuracy"]["0.25"]
    gain = summary["headline"]["low_resource_gain"]
    assert gain["ubsmoe_variant"] == "ubsmoe" and gain["best_heterogeneous_rank"] == "hetlora"
    report = (out / "report.md").read_text()
    assert "| ubsmoe:pg=false | 1 |" in report and "Expert load imbalance" in report
    assert "| smoe:federation.budgets=0.25 | 1 | " in report and " | – | " in report  # a variant with one tier


def test_compare_refuses_to_resume_a_run_made_with_another_config(ablation):
    out, overrides, _ = ablation

    with pytest.raises(ConfigError, match=r"differing keys: train.lr.*another --out folder"):
        run_comparison(parse_variants("ubsmoe"), [0], out, overrides=overrides + ["train.lr=0.5"], show_progress=False)


def test_compare_names_an_unreadable_results_file(ablation, tmp_path):
    out, overrides, _ = ablation
    folder = tmp_path / "broken"
    (folder / "ubsmoe-s0").mkdir(parents=True)
    (folder / "ubsmoe-s0" / "results.json").write_text('{"method": "ubs')

    with pytest.raises(ConfigError, match=r"ubsmoe-s0/results.json is unreadable"):
        run_comparison(parse_variants("ubsmoe"), [0], folder, overrides=overrides, show_progress=False)


def test_compare_checks_every_variant_before_the_first_run(tiny_bert, tiny_task, tmp_path, capsys):
    overrides = tiny_overrides(tiny_bert, tiny_task)

    code = main(["compare", "--variants", "smoe,ubsmoe:zeta=2", "--out", str(tmp_path), *overrides])

    assert code == 2 and "method.zeta must be in [0, 1]" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_parallel_jobs_give_the_numbers_of_one_job(ablation, tmp_path):
    out, overrides, summary = ablation

    parallel = run_comparison(parse_variants("ubsmoe,ubsmoe:pg=false"), [0], tmp_path, overrides=overrides,
                              show_progress=False, jobs=2)

    for label in ("ubsmoe", "ubsmoe:pg=false"):
        assert parallel["methods"][label]["accuracy"] == summary["methods"][label]["accuracy"]
        assert parallel["methods"][label]["train_load_cv"] == summary["methods"][label]["train_load_cv"]


def test_a_stored_run_without_a_key_that_changes_numbers_is_another_config(ablation, tmp_path):
    """Only keys added without changing any number may be missing from a stored run; a run made before
    data.split_seed existed split the data by its seed, and is not resumed as if it had not."""
    out, overrides, _ = ablation
    folder = tmp_path / "old"
    (folder / "ubsmoe-s0").mkdir(parents=True)
    stored = json.loads((out / "ubsmoe-s0" / "results.json").read_text())
    del stored["config"]["data"]["split_seed"], stored["config"]["task"]
    (folder / "ubsmoe-s0" / "results.json").write_text(json.dumps(stored))

    with pytest.raises(ConfigError, match=r"differing keys: data.split_seed\);"):
        run_comparison(parse_variants("ubsmoe"), [0], folder, overrides=overrides, show_progress=False)


def test_the_readmes_table_of_methods_is_the_registrys(capsys):
    """README.md holds `ubsmoe methods --markdown` as it is: a method added to the registry appears in both."""
    from pathlib import Path

    from ubsmoe.cli import main

    assert main(["methods", "--markdown"]) == 0
    table = capsys.readouterr().out

    assert table.count("\n") == 2 + len(__import__("ubsmoe.methods", fromlist=["REGISTRY"]).REGISTRY)
    assert table in (Path(__file__).parent.parent / "README.md").read_text()


def test_every_committed_results_file_reads_into_records_and_writes_back_unchanged():
    """The benchmarks' results.json files, written by earlier versions, are read by `ubsmoe report` through
    the typed records: reading one and writing it back gives the same JSON (keys added since excepted)."""
    from ubsmoe.engine.run_records import RunResults

    files = sorted((Path(__file__).parents[1] / "benchmarks").glob("**/results.json"))
    assert len(files) > 20
    for path in files:
        stored = json.loads(path.read_text())
        back = RunResults.from_json(stored).to_json()
        for added in ("engine", "shared_experts", "round0", "task"):
            if added not in stored:
                back.pop(added)
        assert back == stored, path


def test_the_committed_evidence_comparison_resumes_without_running_anything_again():
    """Its command, run with today's code, finds every run it holds finished with the config it would give
    (renamed options read under their new names), so that it resumes what is missing only."""
    from ubsmoe.report.compare import finished_run, plan_runs
    from ubsmoe.report.variants import variants_from_toml

    root = Path(__file__).parents[1] / "benchmarks"
    variants = variants_from_toml(root / "ubsmoe_evidence.toml")
    configs = plan_runs(variants, [0, 1, 2], overrides=["threads=1"])
    folders = [(root / "ubsmoe_evidence" / v.folder(s), configs[(v.label, s)]) for v in variants for s in (0, 1, 2)]

    assert sum(finished_run(folder, config) for folder, config in folders) == 27
