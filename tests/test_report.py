"""The comparison: runs resume, the report renders from saved results with every plot embedded."""

import json

import pytest

from test_engine import tiny_overrides, tiny_task  # noqa: F401  (fixture)
from ubsmoe.cli import main
from ubsmoe.report.compare import build_report, run_comparison


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

    monkeypatch.setattr("ubsmoe.engine.simulation.run_experiment", must_not_run)
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
