"""Bad input on every command, as a new user gives it: one line that names the problem and the fix, exit
code 2 (130 for Ctrl-C), no traceback, nothing already done lost, and, where it can be known from the
config and the files, before the backbone's weights load.

One table of cases on tiny models; the code that no model folder may run and the flipped bytes in saved
state are part of it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from tiny_experiment import causal_overrides, tiny_overrides
from ubsmoe.cli import main

UBSMOE = str(Path(sys.executable).parent / "ubsmoe")
PLANTED = '''
from pathlib import Path
Path(__file__).with_name("RAN").write_text("the folder's code ran")
from transformers import PretrainedConfig
class PlantedConfig(PretrainedConfig):
    model_type = "planted"
'''


@pytest.fixture(scope="module")
def finished(tiny_bert, tiny_task, tmp_path_factory) -> Path:
    """A finished classification run (smoe, tiers 0.5 and 1.0) with its saved model."""
    out = tmp_path_factory.mktemp("bad-input") / "run"
    assert main(["run", "--quiet", "--method", "smoe", "--out", str(out)] + tiny_overrides(tiny_bert, tiny_task)) == 0
    return out


@pytest.fixture(scope="module")
def causal(tiny_causal_llama, tiny_suite, tmp_path_factory) -> Path:
    """A finished causal-LM run with its saved model."""
    out = tmp_path_factory.mktemp("bad-input-causal") / "run"
    assert main(["run", "--quiet", "--method", "smoe", "--out", str(out)]
                + causal_overrides(tiny_causal_llama, tiny_suite)) == 0
    return out


@dataclass
class Context:
    run: Path  # a copy of the finished classification run, the case's own
    causal: Path
    tmp: Path
    bert: Path
    llama: Path
    task: Path
    suite: Path

    def file(self, name: str, text: str | bytes) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
        return path

    def unfinished(self) -> Path:
        """The run as a run killed after its last checkpoint leaves it: no results, no saved model."""
        (self.run / "results.json").unlink()
        shutil.rmtree(self.run / "model")
        return self.run

    def overrides(self, **extra) -> list[str]:
        return tiny_overrides(self.bert, self.task, **{"federation.rounds": 1, "train.local_steps": 1} | extra)


def flip_bytes(path: Path) -> None:
    """Three flipped bytes in the tensor data, past the safetensors header."""
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    for position in (header + 1, (header + len(data)) // 2, len(data) - 2):
        data[position] ^= 0x5A
    path.write_bytes(bytes(data))


def llama_copy(ctx: Context, name: str) -> Path:
    folder = ctx.tmp / name
    shutil.copytree(ctx.llama, folder)
    return folder


def planted_folder(ctx: Context, json_name: str = "config.json") -> Path:
    """A checkpoint folder whose JSON asks transformers to import its own Python file."""
    folder = llama_copy(ctx, "planted")
    (folder / "planted.py").write_text(PLANTED)
    config = json.loads((folder / json_name).read_text())
    config["auto_map"] = {"AutoConfig": "planted.PlantedConfig", "AutoModel": "planted.PlantedModel"}
    if json_name == "config.json":
        config["model_type"] = "planted"
    (folder / json_name).write_text(json.dumps(config))
    return folder


@dataclass
class Case:
    name: str
    argv: Callable[[Context], list[str]]
    code: int
    phrase: str
    after: Callable[[Context], None] | None = None  # what must still hold (nothing lost)
    loads_model: bool = False  # False: refused before any backbone weights load


def _flipped(ctx: Context, which: str) -> Path:
    target = {"state": ctx.run / "model" / "state.safetensors",
              "experts": next(p for p in (ctx.run / "model").glob("*.safetensors") if p.name != "state.safetensors")}[which]
    flip_bytes(target)
    return ctx.run


def _edited(ctx: Context, name: str, old: bytes, new: bytes) -> Path:
    """The run with one of its files edited in place (same length: a header that still parses)."""
    if name == "checkpoint.safetensors":
        (ctx.run / "results.json").unlink()
    data = (ctx.run / name).read_bytes()
    assert old in data and len(old) == len(new)
    (ctx.run / name).write_bytes(data.replace(old, new, 1))
    return ctx.run


def _without_experts(ctx: Context) -> Path:
    next(p for p in (ctx.run / "model").glob("*.safetensors") if p.name != "state.safetensors").unlink()
    return ctx.run


def _flipped_checkpoint(ctx: Context) -> Path:
    (ctx.run / "results.json").unlink()
    flip_bytes(ctx.run / "checkpoint.safetensors")
    return ctx.run


def _same_bytes(path_of: Callable[[Context], Path], content: bytes) -> Callable[[Context], None]:
    def check(ctx: Context) -> None:
        assert path_of(ctx).read_bytes() == content
    return check


CSV = b"sentence,topic\nbank rates market,business\nfilm music award,entertainment\n"

CASES = [
    # 1. code from a loaded folder never runs
    Case("auto_map in config.json", lambda c: ["run", "--out", str(c.tmp / "o")]
         + c.overrides(**{"model.backbone": planted_folder(c)}), 2, "asks to run its own Python code (config.json"),
    Case("auto_map in tokenizer_config.json", lambda c: ["run", "--out", str(c.tmp / "o")]
         + c.overrides(**{"model.backbone": planted_folder(c, "tokenizer_config.json")}), 2,
         "asks to run its own Python code (tokenizer_config.json"),
    # 2. flipped bytes in saved state
    Case("flipped checkpoint", lambda c: ["run", "--resume", str(_flipped_checkpoint(c))], 2, "SHA-256 mismatch"),
    Case("flipped saved state", lambda c: ["predict", "--run", str(_flipped(c, "state")), "--tier", "0.5",
                                           "--input", str(c.file("t.txt", "bank")), "--output", str(c.tmp / "p")],
         2, "state.safetensors is damaged"),
    Case("flipped upcycled experts", lambda c: ["evaluate", "--run", str(_flipped(c, "experts")), "--data", str(c.task)],
         2, "SHA-256 mismatch", loads_model=True),  # read where the experts are built, after the backbone
    Case("checkpoint metadata edited", lambda c: ["run", "--resume", str(_edited(c, "checkpoint.safetensors",
                                                                                  b'\\"round\\": 2', b'\\"round\\": 1'))],
         2, "its metadata (round, scalars, config) differs"),
    Case("model.json edited", lambda c: ["predict", "--run", str(_edited(c, "model/model.json", b'"top_k": 2', b'"top_k": 1')),
                                         "--tier", "0.5", "--input", str(c.file("t.txt", "bank")), "--output",
                                         str(c.tmp / "p")], 2, "it is not the card written with state.safetensors"),
    Case("saved model without its experts", lambda c: ["evaluate", "--run", str(_without_experts(c)), "--data",
                                                        str(c.task)], 2, "lacks the upcycled experts this model was trained with"),
    # 3. outputs never destroy inputs
    Case("evaluate --output is --data", lambda c: ["evaluate", "--run", str(c.run), "--data", str(c.file("d.csv", CSV)),
                                                   "--output", str(c.tmp / "d.csv")], 2, "which this command reads",
         after=_same_bytes(lambda c: c.tmp / "d.csv", CSV)),
    Case("predict --output is --input", lambda c: ["predict", "--run", str(c.run), "--tier", "1", "--input",
                                                   str(c.file("t.txt", b"bank rates\n")), "--output", str(c.tmp / "t.txt")],
         2, "which this command reads", after=_same_bytes(lambda c: c.tmp / "t.txt", b"bank rates\n")),
    Case("predict --output exists", lambda c: ["predict", "--run", str(c.run), "--tier", "1", "--input",
                                               str(c.file("t.txt", "bank rates\n")), "--output",
                                               str(c.file("p.jsonl", b"earlier\n"))], 2, "exists: choose another path, or pass --force",
         after=_same_bytes(lambda c: c.tmp / "p.jsonl", b"earlier\n")),
    Case("evaluate --output inside the model", lambda c: ["evaluate", "--run", str(c.run), "--data", str(c.task),
                                                          "--output", str(c.run / "model" / "s.json")], 2,
         "which this command reads"),
    Case("export over earlier tiers", lambda c: ["export", "--run", str(c.run), "--out", str(c.tmp / "e"), "--tier", "0.5"]
         if c.file("e/tier-0.5/mine.txt", b"user file") else [], 2, "already holds tier-0.5",
         after=_same_bytes(lambda c: c.tmp / "e" / "tier-0.5" / "mine.txt", b"user file")),
    Case("export into the model it exports", lambda c: ["export", "--run", str(c.run / "model"), "--out",
                                                        str(c.run / "model" / "x")], 2, "over or inside the model"),
    # 4. counts checked before anything loads
    Case("evaluate --batch-size -3", lambda c: ["evaluate", "--run", str(c.run), "--data", str(c.task), "--batch-size", "-3"],
         2, "--batch-size: must be at least 1, got -3"),
    Case("predict --batch-size 0", lambda c: ["predict", "--run", str(c.run), "--tier", "1", "--input",
                                              str(c.file("t.txt", "x")), "--output", str(c.tmp / "p"), "--batch-size", "0"],
         2, "--batch-size: must be at least 1, got 0"),
    Case("compare --jobs 0", lambda c: ["compare", "--methods", "smoe", "--jobs", "0", "--out", str(c.tmp / "c")], 2,
         "--jobs: must be at least 1"),
    Case("compare --seeds 0", lambda c: ["compare", "--methods", "smoe", "--seeds", "0", "--out", str(c.tmp / "c")], 2,
         "--seeds must be a count of at least 1"),
    Case("bench --repeats 0", lambda c: ["bench", "tiers", "--repeats", "0", "--out", str(c.tmp / "b.json")], 2,
         "--repeats: must be at least 1"),
    Case("certificates --days 0", lambda c: ["flower", "certificates", str(c.tmp / "ca"), "--host", "x", "--days", "0"], 2,
         "--days: must be at least 1"),
    # 5. nothing ignored without a word
    Case("train-only task folder", lambda c: ["run", "--out", str(c.tmp / "o"), "--method", "smoe"]
         + causal_overrides(c.llama, _train_only_suite(c)), 2, "hold a train.json but no test.json"),
    Case("evaluation.protocol on classification", lambda c: ["run", "--out", str(c.tmp / "o")]
         + c.overrides(**{"evaluation.protocol": "xyz"}), 2, "evaluation.protocol must be one of generation, loglik"),
    Case("predict record with an unknown task", lambda c: ["predict", "--run", str(c.causal), "--tier", "1", "--input",
                                                           str(c.file("q.jsonl", json.dumps({"instruction": "q?", "task": "quiz"}))),
                                                           "--output", str(c.tmp / "p")], 2, "names the task 'quiz'"),
    # 6. resume: overrides apply to the checkpoint's config
    Case("resume with --out", lambda c: ["run", "--resume", str(c.unfinished()), "--out", str(c.tmp / "o")], 2,
         "--resume continues the run in its own folder: leave out --out and --force"),
    Case("resume with another method", lambda c: ["run", "--resume", str(c.unfinished()), "--method", "ubsmoe"], 2,
         "is one of smoe, not ubsmoe: resume it without --method"),
    Case("resume with another lr", lambda c: ["run", "--resume", str(c.unfinished()), "train.lr=0.5"], 2,
         "differ from the checkpoint's and would change the run's numbers: train.lr;"),
    # 8. (flower run: tests/test_flower_deployment.py) 9. files that are not what they claim
    Case("a .gguf that is not GGUF", lambda c: ["run", "--out", str(c.tmp / "o")]
         + c.overrides(**{"model.backbone": c.file("m.gguf", b"PK\x03\x04 not gguf")}), 2, "is not a GGUF file"),
    Case("pickle-only backbone folder", lambda c: ["run", "--out", str(c.tmp / "o")]
         + c.overrides(**{"model.backbone": _pickle_only(c)}), 2, "only pickle weights (pytorch_model.bin)"),
    Case("non-UTF-8 .txt input", lambda c: ["predict", "--run", str(c.run), "--tier", "1", "--input",
                                            str(c.file("t.txt", "caf\xe9 prices".encode("latin-1"))), "--output",
                                            str(c.tmp / "p")], 2, "is not UTF-8"),
    Case("--output under a file", lambda c: ["predict", "--run", str(c.run), "--tier", "1", "--input",
                                             str(c.file("t.txt", "bank")), "--output", str(c.file("f", "x")) + "/p.jsonl"],
         2, "is a file, not a folder"),
    Case("run --out under a file", lambda c: ["run", "--out", str(c.file("f", "x")) + "/o"] + c.overrides(), 2,
         "cannot write into --out"),
    # 10. messages that point to the fix, before the model loads
    Case("classification evaluate on a folder", lambda c: ["evaluate", "--run", str(c.run), "--data", str(c.tmp)], 2,
         "is a folder: a classification run is evaluated on one labelled data file"),
    Case("causal-lm evaluate on a CSV", lambda c: ["evaluate", "--run", str(c.causal), "--data", str(c.file("d.csv", CSV))],
         2, "is not a commonsense test set"),
    Case("evaluate: other column names", lambda c: ["evaluate", "--run", str(c.run), "--data", str(c.file("d.csv", CSV))],
         2, "--text-column and --label-column"),
    Case("predict: a CSV without the text column", lambda c: ["predict", "--run", str(c.run), "--tier", "1", "--input",
                                                              str(c.file("d.csv", CSV)), "--output", str(c.tmp / "p")],
         2, "has no column 'text'; its columns are ['sentence', 'topic']"),
    Case("predict on an unfinished run", lambda c: ["predict", "--run", str(c.unfinished()), "--tier", "1", "--input",
                                                    str(c.file("t.txt", "x")), "--output", str(c.tmp / "p")], 2,
         "holds an unfinished run"),
    Case("num_experts not dividing the FFN", lambda c: ["run", "--out", str(c.tmp / "o")]
         + c.overrides(**{"model.num_experts": 7}), 2, "cannot split the 64 FFN neurons"),
    Case("a record whose instruction is a number", lambda c: ["predict", "--run", str(c.causal), "--tier", "1", "--input",
                                                              str(c.file("q.jsonl", json.dumps({"instruction": 123}))),
                                                              "--output", str(c.tmp / "p")], 2,
         "input record 1's instruction must be a non-empty text"),
    Case("a task file record counted from 1", lambda c: ["run", "--out", str(c.tmp / "o"), "--method", "smoe"]
         + causal_overrides(c.llama, _suite_with_bad_record(c)), 2, "record 2's instruction must be text"),
]


def _train_only_suite(ctx: Context) -> Path:
    suite = ctx.tmp / "suite"
    shutil.copytree(ctx.suite, suite)
    (suite / "boolq" / "test.json").unlink()
    return suite


def _suite_with_bad_record(ctx: Context) -> Path:
    suite = ctx.tmp / "suite"
    shutil.copytree(ctx.suite, suite)
    records = json.loads((suite / "boolq" / "train.json").read_text())
    records[1]["instruction"] = 123
    (suite / "boolq" / "train.json").write_text(json.dumps(records))
    return suite


def _pickle_only(ctx: Context) -> Path:
    folder = llama_copy(ctx, "pickled")
    for weights in folder.glob("*.safetensors"):
        weights.rename(folder / "pytorch_model.bin")
    return folder


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_gets_one_line_and_exit_code_2(case, finished, causal, tiny_bert, tiny_causal_llama, tiny_task,
                                                 tiny_suite, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    ctx = Context(run, causal, tmp_path / "work", tiny_bert, tiny_causal_llama, tiny_task, tiny_suite)
    ctx.tmp.mkdir()
    argv = case.argv(ctx)
    capsys.readouterr()
    if not case.loads_model:
        import ubsmoe.model.moe_model as moe_model

        monkeypatch.setattr(moe_model, "load_dense_backbone", lambda *a, **k: pytest.fail("the backbone was loaded"))

    code = main(argv)

    err = capsys.readouterr().err
    assert code == case.code, err
    assert case.phrase in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (ctx.tmp / "planted" / "RAN").exists()
    if case.after is not None:
        case.after(ctx)


@pytest.mark.parametrize("stdin", [subprocess.DEVNULL, b"y\ny\ny\n"], ids=["no terminal", "y on standard input"])
def test_a_folders_own_code_never_runs(tiny_causal_llama, tiny_task, tmp_path, stdin):
    ctx = Context(tmp_path, tmp_path, tmp_path, tiny_causal_llama, tiny_causal_llama, tiny_task, tmp_path)
    folder = planted_folder(ctx)

    done = subprocess.run([UBSMOE, "run", "--quiet", "--out", str(tmp_path / "o")]
                          + ctx.overrides(**{"model.backbone": folder}),
                          input=stdin if isinstance(stdin, bytes) else None,
                          stdin=stdin if not isinstance(stdin, bytes) else None, capture_output=True, timeout=300)

    assert done.returncode == 2, done.stderr.decode()
    assert "never runs code from a model folder" in done.stderr.decode()
    assert not (folder / "RAN").exists()


def test_transformers_is_never_allowed_to_run_a_folders_code(tiny_causal_llama, tmp_path, monkeypatch):
    """Past our own check too: every config, tokenizer and model load passes trust_remote_code=False, so a
    "y" typed at transformers' prompt cannot run the folder's file."""
    import builtins

    import ubsmoe.model.backbones as backbones
    from ubsmoe.model import load_tokenizer
    from ubsmoe.model.pretrained import backbone_config, load_dense_backbone

    ctx = Context(tmp_path, tmp_path, tmp_path, tiny_causal_llama, tiny_causal_llama, tmp_path, tmp_path)
    folder = planted_folder(ctx)
    monkeypatch.setattr(backbones, "check_no_custom_code", lambda folder: None)
    monkeypatch.setattr(builtins, "input", lambda *a: "y")

    with pytest.raises(ValueError, match="contains custom code"):  # the config class is the folder's own
        backbone_config(str(folder))
    with pytest.raises(ValueError, match="contains custom code"):
        load_dense_backbone(str(folder))
    load_tokenizer(str(folder))  # its tokenizer is a built-in class: it loads, and runs nothing

    assert not (folder / "RAN").exists()


def test_ctrl_c_says_where_to_resume(tiny_bert, tiny_task, tmp_path, capsys, monkeypatch):
    import ubsmoe.engine.rounds as simulation

    real = simulation.run_client

    def interrupted_in_round_2(runtime, instruction, progress):
        if instruction.round == 2:
            raise KeyboardInterrupt
        return real(runtime, instruction, progress)

    monkeypatch.setattr(simulation, "run_client", interrupted_in_round_2)
    out = tmp_path / "run"

    code = main(["run", "--quiet", "--method", "smoe", "--out", str(out)] + tiny_overrides(tiny_bert, tiny_task))

    err = capsys.readouterr().err.strip()
    assert code == 130
    assert err == (f"ubsmoe: interrupted in round 2; the last checkpoint is round 1: resume with "
                   f"`ubsmoe run --resume {out}`")
    monkeypatch.setattr(simulation, "run_client", real)
    assert main(["run", "--quiet", "--resume", str(out)]) == 0


def test_resume_accepts_settings_that_change_no_number(finished, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "results.json").unlink()
    stored = json.loads((finished / "results.json").read_text())

    assert main(["run", "--quiet", "--resume", str(run), f"threads={stored['config']['threads']}", "threads=1"]) == 0

    assert json.loads((run / "results.json").read_text())["final"]["tier_accuracy"] == stored["final"]["tier_accuracy"]


def test_outputs_are_replaced_with_force_only(finished, tiny_task, tmp_path):
    texts, output = tmp_path / "t.txt", tmp_path / "p.jsonl"
    texts.write_text("bank rates\nfilm music\n")
    output.write_text("earlier\n")
    exported = tmp_path / "e"
    (exported / "tier-1").mkdir(parents=True)
    (exported / "tier-1" / "stale.txt").write_text("x")

    assert main(["predict", "--run", str(finished), "--tier", "1", "--input", str(texts), "--output", str(output),
                 "--force"]) == 0
    assert main(["export", "--run", str(finished), "--out", str(exported), "--tier", "1", "--force"]) == 0

    assert [json.loads(line)["text"] for line in output.read_text().splitlines()] == ["bank rates", "film music"]
    assert sorted(p.name for p in (exported / "tier-1").iterdir()) == sorted(
        p.name for p in (finished / "model").iterdir() if p.suffix in (".safetensors", ".json"))
    assert not list(exported.glob(".*"))  # no temporary folder left


def test_evaluate_reads_other_column_names_when_told(finished, tmp_path):
    rows = [json.loads(line) for line in Path(json.loads((finished / "results.json").read_text())["config"]["data"]
                                                   ["dataset"]).read_text().splitlines()]
    data = tmp_path / "renamed.jsonl"
    data.write_text("".join(json.dumps({"sentence": r["text"], "topic": r["label"]}) + "\n" for r in rows[:30]))

    assert main(["evaluate", "--run", str(finished), "--data", str(data), "--text-column", "sentence",
                 "--label-column", "topic", "--output", str(tmp_path / "s.json")]) == 0

    scores = json.loads((tmp_path / "s.json").read_text())["tiers"]
    assert set(scores) == {"0.5", "1.0"}


def test_a_renamed_option_names_its_new_name_and_stored_configs_read_under_it(tiny_bert, tiny_task, capsys):
    """UB-SMoE's ``lam`` and ``reg`` are ``phi_range_weight`` and ``phi_range`` now: a user who sets the old name
    is told the new one; a run stored with the old names (a finished comparison's) is the same config."""
    from ubsmoe.config import config_from_dict, differing_keys, load_config
    from ubsmoe.engine.experiment import validate
    from ubsmoe.methods import get_method
    from ubsmoe.config import resolve_method_options

    assert main(["run", "--quiet", "method.lam=0.1"] + tiny_overrides(tiny_bert, tiny_task)) == 2
    assert "method.lam is now called method.phi_range_weight" in capsys.readouterr().err

    config = load_config(overrides=tiny_overrides(tiny_bert, tiny_task), method="ubsmoe")
    resolve_method_options(config, get_method("ubsmoe").Options)
    validate(config)
    stored = config.to_dict()
    stored["method"]["lam"] = stored["method"].pop("phi_range_weight")
    stored["method"]["reg"] = stored["method"].pop("phi_range")
    assert differing_keys(stored, config) == []
    assert config_from_dict(stored).method["phi_range_weight"] == config.method["phi_range_weight"]
