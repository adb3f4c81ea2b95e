"""The ``ubsmoe`` command line: list methods, run an experiment, run benchmarks."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from ubsmoe.config import ConfigError, MissingFileError, describe, load_config
from ubsmoe.engine.errors import FederationStopped, RunInterrupted


def _methods(args) -> int:
    from ubsmoe.methods import REGISTRY
    from ubsmoe.methods.base import methods_markdown

    if args.markdown:
        print(methods_markdown(), end="")
        return 0
    width = max(len(name) for name in REGISTRY)
    for name in sorted(REGISTRY):
        print(f"{name:<{width}}  {REGISTRY[name].description}")
    return 0


def _tasks(_args) -> int:
    from ubsmoe.tasks import REGISTRY

    width = max(len(name) for name in REGISTRY)
    for name in sorted(REGISTRY):
        print(f"{name:<{width}}  {REGISTRY[name].description}")
    return 0


def _run(args) -> int:
    from ubsmoe.engine.rounds import run_experiment
    from ubsmoe.report.summary import check_output_folder, tier_table, write_results

    if args.help_config:
        for key, default, text in describe():
            print(f"{key:<32} {default:<28} {text}")
        return 0
    resume = None
    if args.resume:
        from ubsmoe.config import config_from_dict
        from ubsmoe.engine.checkpoint import check_resumable, read_checkpoint

        out = Path(args.resume)
        if args.out is not None or args.force:
            raise ConfigError("--resume continues the run in its own folder: leave out --out and --force")
        if (out / "results.json").is_file():
            raise ConfigError(f"{out} holds a finished run (results.json): nothing to resume")
        resume = read_checkpoint(out)  # either engine continues either's checkpoint: they give the same numbers
        method = resume.config.get("method", {}).get("name")
        if args.method is not None and args.method != method:
            raise ConfigError(f"the run in {out} is one of {method}, not {args.method}: resume it without --method")
        # what the command line gives is applied to the checkpoint's config; what differs from it is refused
        # when the run is restored, naming only those keys
        config = load_config(args.config, args.overrides, method=args.method, base=config_from_dict(resume.config))
        check_resumable(resume, resolved(config))  # before anything is built
    else:
        config = load_config(args.config, args.overrides, method=args.method)
        out = Path(args.out or "runs/latest")
        check_output_folder(out, force=args.force)  # before anything is trained: a bad folder loses nothing
    if args.engine == "flower-sim":
        results = _flower_simulation()(config, show_progress=not args.quiet, out=out, resume=resume)
    else:
        results = run_experiment(config, show_progress=not args.quiet, out=out, resume=resume)
    write_results(results, out)
    print(tier_table(results))
    print(f"\nresults: {out / 'results.json'}  summary: {out / 'summary.md'}")
    return 0


def resolved(config):
    """``config`` with its method's options resolved (typed, defaults filled in), as a run stores it."""
    import copy

    from ubsmoe.config import resolve_method_options
    from ubsmoe.methods.base import get_method

    from ubsmoe.engine.experiment import validate

    config = copy.deepcopy(config)
    resolve_method_options(config, get_method(config.method_name).Options)
    validate(config)  # also resolves what the config leaves to the backbone (model.shared_experts=-1)
    return config


def _flower_simulation():
    """``run_flower_simulation``, or a user error naming the extra to install."""
    import importlib

    importlib.import_module("ubsmoe.engine.flower")  # sets Flower's environment before flwr is imported
    try:
        for package in ("flwr", "ray"):
            importlib.import_module(package)
    except ImportError:
        from ubsmoe.config import MissingPackageError

        raise MissingPackageError("--engine flower-sim needs Flower's simulation: pip install 'ubsmoe[flower]' "
                                  "(flwr[simulation]==1.41.0); `make install` installs it") from None
    from ubsmoe.engine.flower.simulation import run_flower_simulation

    return run_flower_simulation


def _flower_certificates(args) -> int:
    _flower_simulation()  # the same packages
    from ubsmoe.engine.flower.certificates import write_certificates

    paths = write_certificates(Path(args.folder), args.host, args.days, force=args.force)
    print("\n".join(f"{name}: {path}" for name, path in paths.items()))
    return 0


def _flower_run(args) -> int:
    _flower_simulation()  # the same packages
    from ubsmoe.engine.flower.deployment import run_deployment
    from ubsmoe.engine.experiment import validate

    config = load_config(args.config, args.overrides)
    validate(config)  # before anything is sent: a bad value loses nothing
    out = Path(args.out)
    if not out.is_absolute():
        raise ConfigError(f"--out {out} must be an absolute path: the server writes it on the SuperLink's machine")
    run_deployment(args.superlink, out, args.config, args.overrides,
                   Path(args.root_certificates) if args.root_certificates else None, args.insecure, args.force,
                   args.round_timeout, args.node_wait, resume=args.resume)
    where = "" if (out / "results.json").is_file() else " (on the SuperLink's machine; the server's log above says how it went)"
    print(f"results: {out / 'results.json'}{where}")
    return 0


def _predict(args) -> int:
    from ubsmoe.data.text_files import read_records
    from ubsmoe.engine.saved_model import load_model, open_model
    from ubsmoe.storage import check_output, write_atomically

    source, output = Path(args.input), Path(args.output)
    if not source.is_file():
        raise MissingFileError(f"--input {source} does not exist" + (" as a file (it is a folder)" if source.is_dir() else ""))
    saved = open_model(Path(args.run))
    saved.check_tier(args.tier)
    check_output("--output", output, [("--input", source), ("--run", saved.folder)], args.force)
    records = read_text_lines(source) if source.suffix.lower() == ".txt" else read_records(source)
    if not records:
        raise ConfigError(f"--input {source} holds no texts")
    saved.task().check_records(records, source, saved.card["label_names"])
    loaded = load_model(saved)
    loaded.setup_tier(args.tier)
    predictions = loaded.exp.task.predict(loaded.exp.model, records, loaded.card["label_names"], args.batch_size)
    write_atomically(output, "".join(json.dumps(p) + "\n" for p in predictions))
    print(f"{len(predictions)} predictions of tier {args.tier:g}: {output}")
    return 0


def read_text_lines(source: Path) -> list[dict]:
    """A .txt input: one record ``{"text": line}`` per non-empty line."""
    try:
        lines = source.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as error:
        raise ConfigError(f"--input {source} is not UTF-8 ({error.reason} at byte {error.start}): convert it, e.g. "
                          f"`iconv -f latin1 -t utf-8 {source.name} > utf8-{source.name}`") from None
    return [{"text": line} for line in lines if line.strip()]


def _evaluate(args) -> int:
    from dataclasses import replace

    from ubsmoe.engine.evaluation import evaluate
    from ubsmoe.engine.saved_model import load_model, open_model
    from ubsmoe.storage import check_output, write_atomically

    data_path = Path(args.data)
    if not data_path.exists():
        raise MissingFileError(f"--data {data_path} does not exist")
    saved = open_model(Path(args.run))
    if args.tier is not None:
        saved.check_tier(args.tier)
    output = Path(args.output) if args.output else None
    if output is not None:
        check_output("--output", output, [("--data", data_path), ("--run", saved.folder)], args.force)
    config = saved.config()
    columns = {k: v for k, v in (("text_column", args.text_column), ("label_column", args.label_column)) if v}
    if columns:
        config = replace(config, data=replace(config.data, **columns))
    data = saved.task(config).labelled(data_path, saved.card["label_names"])  # bad data refused before the model loads
    loaded = load_model(saved)
    tiers = [args.tier] if args.tier is not None else loaded.tiers
    scores = {}
    for budget in tiers:
        loaded.setup_tier(budget)
        scores[str(budget)] = {k: v for k, v in evaluate(loaded.exp.model, loaded.exp.task, data, args.batch_size).items()
                               if k in ("accuracy", "loss", "details")}
    protocols = [p for p in ("generation", "loglik", "loglik_norm") if p in next(iter(scores.values())).get("details", {})]
    print("| tier | accuracy | loss |" + "".join(f" {p} |" for p in protocols))
    print("|---|---|---|" + "---|" * len(protocols))
    for budget, result in scores.items():
        print(f"| beta={budget} | {result['accuracy']:.4f} | {result['loss']:.4f} |"
              + "".join(f" {result['details'][p]:.4f} |" for p in protocols))
    if output is not None:
        write_atomically(output, json.dumps({"data": str(args.data), "tiers": scores}, indent=1))
    return 0


def _export(args) -> int:
    from ubsmoe.engine.export import check_export, export_tiers
    from ubsmoe.engine.saved_model import load_model, open_model

    saved = open_model(Path(args.run))
    tiers = [args.tier] if args.tier is not None else saved.tiers
    check_export(saved, Path(args.out), tiers, args.force)  # before the model loads: nothing is overwritten unasked
    loaded = load_model(saved)
    folders = export_tiers(loaded, Path(args.out), tiers)
    kind = "PEFT LoRA adapter" if loaded.exp.model.num_experts == 1 else "saved model for `ubsmoe predict --run`"
    for folder in folders:
        print(f"{folder}: {kind}")
    return 0


def _compare(args) -> int:
    from ubsmoe.report.compare import run_comparison
    from ubsmoe.report.variants import parse_variants

    if (args.methods is None) == (args.variants is None):
        raise ConfigError("give either --methods (ubsmoe,smoe,hetlora) or --variants (ubsmoe,ubsmoe:pg=false, "
                          "or a .toml file), not both")
    variants = parse_variants(args.methods if args.methods is not None else args.variants)
    try:
        seeds = [int(s) for s in args.seeds.split(",")] if "," in args.seeds else list(range(int(args.seeds)))
    except ValueError:
        raise ConfigError(f"--seeds must be a count (3) or a list (0,1,2), got {args.seeds!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds must be a count of at least 1 (3 = 0,1,2) or a list of distinct seeds, "
                          f"got {args.seeds!r}")
    out = Path(args.out)
    run_comparison(variants, seeds, out, args.config, args.overrides, show_progress=not args.quiet, jobs=args.jobs)
    print((out / "report.md").read_text().split("## Plots")[0])
    print(f"report: {out / 'report.html'}  data: {out / 'compare.json'}")
    return 0


def _report(args) -> int:
    from ubsmoe.report.compare import build_report

    to = Path(args.out) if args.out else Path(args.folder)
    build_report(Path(args.folder), to=to)
    print(f"report: {to / 'report.md'}, {to / 'report.html'}")
    return 0


def _bench(args) -> int:
    def size(value: int | None, default: int) -> int:
        return default if value is None else value

    if args.name == "moe-layer":
        from ubsmoe.bench.moe_layer import run

        result = run(Path(args.out), threads=args.threads)
        print(Path(args.out).with_suffix(".md").read_text())
        return 0 if result else 1
    if args.name == "pg-step":
        from ubsmoe.bench.pg_step import run

        run(Path(args.out), threads=args.threads)
        print(Path(args.out).with_suffix(".md").read_text())
        return 0
    if args.name == "tiers":
        from ubsmoe.bench.tiers import run

        run(Path(args.out), backbone=args.backbone, batch_size=size(args.batch_size, 16), dropout=args.dropout,
            max_length=size(args.max_length, 128), threads=args.threads, repeats=args.repeats,
            part_repeats=args.part_repeats, overrides=tuple(args.overrides))
        print(Path(args.out).with_suffix(".md").read_text())
        return 0
    if args.name == "dmr-reach":
        from ubsmoe.bench.dmr_reach import run

        run(Path(args.out), threads=args.threads)
        print(Path(args.out).with_suffix(".md").read_text())
        return 0
    if args.name == "flower-overhead":
        from ubsmoe.bench.flower_overhead import run

        _flower_simulation()  # the flower extra, or a user error
        run(Path(args.out), threads=args.threads, overrides=tuple(args.overrides))
        print(Path(args.out).with_suffix(".md").read_text())
        return 0
    if args.name == "memory":
        from ubsmoe.bench.memory import run

        run(Path(args.out), threads=args.threads, batch=size(args.batch_size, 8), length=size(args.max_length, 256))
        print(Path(args.out).with_suffix(".md").read_text())
        return 0
    if args.name == "native-load":
        from ubsmoe.bench.native_load import run

        run(Path(args.out))
        print(Path(args.out).with_suffix(".md").read_text())
        return 0
    if args.name == "pg-fidelity":
        from ubsmoe.bench.pg_fidelity import run

        run(Path(args.out), threads=args.threads, commonsense=commonsense_path(args.overrides, "pg-fidelity"))
        print(Path(args.out).with_suffix(".md").read_text())
        return 0
    if args.name == "upcycle":
        from ubsmoe.bench.upcycle_fidelity import run

        run(Path(args.out), threads=args.threads, commonsense=commonsense_path(args.overrides, "upcycle"))
        print(Path(args.out).with_suffix(".md").read_text())
        return 0
    raise ConfigError(f"unknown benchmark {args.name!r}")


def commonsense_path(overrides: list[str], bench: str) -> str:
    """The commonsense folder a benchmark reads: ``data.dataset=commonsense:PATH`` or ../shared/data/commonsense."""
    settings = dict(item.split("=", 1) for item in overrides)
    unknown = sorted(set(settings) - {"data.dataset"})
    if unknown:
        raise ConfigError(f"bench {bench} takes only data.dataset=commonsense:PATH, got {', '.join(unknown)}")
    return settings.get("data.dataset", "commonsense:../shared/data/commonsense").removeprefix("commonsense:")


def count(text: str) -> int:
    """An argparse type: a whole number of at least 1 (a count of texts, turns, jobs, days, threads)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def seconds(text: str) -> float:
    """An argparse type: a duration in seconds, above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds above 0, got {text}")
    return value


class Parser(argparse.ArgumentParser):
    """argparse, with a bad option reported as one line (and exit code 2), like every other user error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="ubsmoe", description="Resource-adaptive federated fine-tuning with sparse MoE")
    sub = parser.add_subparsers(dest="command", required=True)
    methods = sub.add_parser("methods", help="list the registered federated methods")
    methods.add_argument("--markdown", action="store_true", help="the README's table of methods, with their kinds")
    methods.set_defaults(func=_methods)
    sub.add_parser("tasks", help="list the registered tasks (the config's `task`)").set_defaults(func=_tasks)

    run = sub.add_parser("run", help="run one federated experiment",
                         description="Run one experiment. Settings: defaults < --config FILE.toml < key=value "
                                     "overrides (see --help-config for every key).")
    run.add_argument("--method", help="registered method name (see `ubsmoe methods`)")
    run.add_argument("--out", help="output folder for results.json and summary.md (default runs/latest)")
    run.add_argument("--config", help="TOML config file")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.add_argument("--force", action="store_true", help="replace a finished or unfinished run in --out")
    run.add_argument("--resume", metavar="OUT", help="continue the unfinished run in OUT from its last checkpoint "
                                                     "(with its config; a config given too must equal it)")
    run.add_argument("--engine", choices=("inprocess", "flower-sim"), default="inprocess",
                     help="inprocess (every client in turn on one model) or flower-sim (Flower's simulation: "
                          "one SuperNode per client, ClientApps in worker processes); the same results")
    run.add_argument("--help-config", action="store_true", help="list every config key with default and help")
    run.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. federation.rounds=3 model.lora_rank=4")
    run.set_defaults(func=_run)

    predict = sub.add_parser("predict", help="predict with the model a run saved (OUT/model), as a client of one tier")
    predict.add_argument("--run", required=True, help="the run's --out folder")
    predict.add_argument("--tier", type=float, required=True, help="the budget tier whose model predicts, e.g. 0.25")
    predict.add_argument("--input", required=True, help="a .txt file (one text per line) or a data file: classification reads its 'text' column, "
                              "causal-lm its 'instruction' (and optional 'input') or 'text' column")
    predict.add_argument("--output", required=True, help="predictions, one JSON object per line")
    predict.add_argument("--batch-size", type=count, default=32, help="texts per forward pass")
    predict.add_argument("--force", action="store_true", help="replace an existing --output")
    predict.set_defaults(func=_predict)

    evaluate = sub.add_parser("evaluate", help="score the model a run saved on a labelled file, per tier")
    evaluate.add_argument("--run", required=True, help="the run's --out folder")
    evaluate.add_argument("--data", required=True, help="classification: a labelled data file (the run's text and label columns); causal-lm: a "
                               "commonsense folder or one task's test.json")
    evaluate.add_argument("--tier", type=float, help="one tier only (default: every tier of the run)")
    evaluate.add_argument("--batch-size", type=count, default=64, help="texts per forward pass")
    evaluate.add_argument("--output", help="write the scores as JSON here too")
    evaluate.add_argument("--force", action="store_true", help="replace an existing --output")
    evaluate.add_argument("--text-column", help="classification: the data file's text column (default: the run's "
                                                "data.text_column)")
    evaluate.add_argument("--label-column", help="classification: the data file's label column (default: the run's "
                                                 "data.label_column)")
    evaluate.set_defaults(func=_evaluate)

    export = sub.add_parser("export", help="export a saved model per tier: PEFT LoRA adapters (dense methods) "
                                           "or ubsmoe model folders (sparse methods)",
                            description="Write OUT/tier-<budget>/ for every tier (or --tier). Dense-model methods "
                                        "(kind dense in `ubsmoe methods --markdown`) give a PEFT LoRA adapter (adapter_config.json, "
                                        "adapter_model.safetensors) for the backbone; sparse methods give a folder "
                                        "that `ubsmoe predict --run` and `ubsmoe evaluate --run` load.")
    export.add_argument("--run", required=True, help="the run's --out folder")
    export.add_argument("--out", required=True, help="where the tier folders go")
    export.add_argument("--tier", type=float, help="one tier only (default: every tier of the run)")
    export.add_argument("--force", action="store_true", help="replace tier folders that exist in --out")
    export.set_defaults(func=_export)

    compare = sub.add_parser("compare", help="run several methods over seeds and write a comparison report",
                             description="Run every method with the same config and seeds (finished runs in OUT are "
                                         "skipped, so an interrupted comparison resumes), then write OUT/compare.json, "
                                         "OUT/report.md and OUT/report.html.")
    compare.add_argument("--methods", help="comma-separated method names, e.g. ubsmoe,smoe,hetlora")
    compare.add_argument("--variants", help="comma-separated variants method[:key=value...], e.g. "
                                            "ubsmoe,ubsmoe:pg=false,ubsmoe:dmr=false (a bare key is a method option), "
                                            "or a .toml file with a `variants` list")
    compare.add_argument("--jobs", type=count, default=1,
                         help="runs at a time, each in its own process (set threads=1 with jobs=2 on 2 cores)")
    compare.add_argument("--seeds", default="1", help="a number of seeds (3 = 0,1,2) or a list (0,5,7)")
    compare.add_argument("--out", required=True, help="comparison folder")
    compare.add_argument("--config", help="TOML config file")
    compare.add_argument("--quiet", action="store_true", help="no progress bars")
    compare.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every run")
    compare.set_defaults(func=_compare)

    flower = sub.add_parser("flower", help="run on a Flower deployment (a SuperLink and one SuperNode per client)")
    flower_sub = flower.add_subparsers(dest="flower_command", metavar="command", required=True)
    certificates = flower_sub.add_parser("certificates", help="write a CA and a SuperLink certificate for TLS")
    certificates.add_argument("folder", help="where ca.crt, ca.key, superlink.crt and superlink.key go")
    certificates.add_argument("--host", action="append", required=True,
                              help="a name or IP address the SuperNodes reach the SuperLink by (repeatable)")
    certificates.add_argument("--days", type=count, default=365, help="validity in days")
    certificates.add_argument("--force", action="store_true", help="replace the certificates and keys in the folder")
    certificates.set_defaults(func=_flower_certificates)
    flower_run = flower_sub.add_parser("run", help="run one experiment on the deployment; the server writes --out",
                                       description="Submit the experiment (--config and key=value overrides, as for "
                                                   "`ubsmoe run`) to a running SuperLink and stream its log until "
                                                   "it ends. Every machine needs ubsmoe installed.")
    flower_run.add_argument("--superlink", required=True, help="HOST:PORT of the SuperLink (its --port, 8000 by default)")
    flower_run.add_argument("--root-certificates", help="the CA certificate the SuperLink's certificate is signed by")
    flower_run.add_argument("--insecure", action="store_true", help="no TLS (only for a SuperLink started with --insecure)")
    flower_run.add_argument("--out", required=True, help="results folder (absolute path on the SuperLink's machine)")
    flower_run.add_argument("--config", help="TOML config file (on the SuperLink's machine)")
    flower_run.add_argument("--force", action="store_true", help="replace a finished run in --out")
    flower_run.add_argument("--resume", action="store_true", help="continue the unfinished run in --out from its last "
                                                                  "checkpoint (settings given apply to its config)")
    flower_run.add_argument("--round-timeout", type=seconds, default=86400.0,
                            help="seconds a round waits for its clients; then it goes on with those that answered")
    flower_run.add_argument("--node-wait", type=seconds, default=300.0,
                            help="seconds to wait for one SuperNode per client before the first round")
    flower_run.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    flower_run.set_defaults(func=_flower_run)

    report = sub.add_parser("report", help="rebuild a comparison report from its saved results")
    report.add_argument("folder", help="a comparison folder (written by `ubsmoe compare`)")
    report.add_argument("--out", help="write the report here instead of into the comparison folder")
    report.set_defaults(func=_report)

    bench = sub.add_parser("bench", help="run a benchmark")
    bench.add_argument("name", choices=["moe-layer", "pg-step", "tiers", "upcycle", "dmr-reach", "flower-overhead",
                                          "native-load", "memory", "pg-fidelity"])
    bench.add_argument("--out", required=True, help="result JSON path (a .md summary is written beside it)")
    bench.add_argument("--dropout", type=float, default=-1.0,
                       help="tiers only: backbone dropout probability (-1 keeps the checkpoint's)")
    bench.add_argument("--backbone", default="minilm",
                       help="tiers only: the backbone (built-in name, checkpoint folder or .gguf file)")
    bench.add_argument("--batch-size", type=count, default=None,
                       help="tiers and memory: texts in the timed batch (default 16 for tiers, 8 for memory)")
    bench.add_argument("--max-length", type=count, default=None,
                       help="tiers and memory: tokens per text of the timed batch "
                            "(default 128 for tiers, 256 for memory)")
    bench.add_argument("--repeats", type=count, default=11, help="tiers only: timed turns per tier")
    bench.add_argument("--part-repeats", type=count, default=5,
                       help="tiers only: turns per tier with timing hooks (where a step's time goes)")
    bench.add_argument("--threads", type=count, default=2,
                       help="CPU threads torch may use in the timed benchmarks (moe-layer, pg-step, tiers, flower-overhead)")
    bench.add_argument("overrides", nargs="*", metavar="key=value",
                       help="tiers and flower-overhead: config settings, e.g. task=causal-lm data.dataset=commonsense:PATH")
    bench.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # key=value settings after the options land here (argparse fills nargs="*" at the first positional)
            if hasattr(args, "overrides") and all("=" in item and not item.startswith("-") for item in extra):
                args.overrides = list(args.overrides or []) + extra
            else:
                parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as done:  # --help (0) or a bad option (2, one line already printed)
        return done.code if isinstance(done.code, int) else 2
    try:
        return args.func(args)
    except ConfigError as error:  # user errors only: a bug keeps its traceback
        print(f"ubsmoe: error: {error}", file=sys.stderr)
        return 2
    except FederationStopped as error:  # not a bug either: the clients did not answer
        out = getattr(args, "resume", None) or getattr(args, "out", None) or "runs/latest"
        resume = f"; `ubsmoe run --resume {out}` continues from its last checkpoint" if args.command == "run" else ""
        print(f"ubsmoe: the run stopped: {error}{resume}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as interrupt:  # Ctrl-C: one line saying what is kept, and the shell's code 130
        print(f"\nubsmoe: {interrupted(args, interrupt)}", file=sys.stderr)
        return 130


def interrupted(args, interrupt: KeyboardInterrupt) -> str:
    """What an interrupted command leaves, and how to go on."""
    if isinstance(interrupt, RunInterrupted):
        out = getattr(args, "resume", None) or getattr(args, "out", None) or "runs/latest"
        if interrupt.checkpoint_round == 0 or out is None:
            return f"interrupted in round {interrupt.round_index}, before any checkpoint: start the run again"
        return (f"interrupted in round {interrupt.round_index}; the last checkpoint is round "
                f"{interrupt.checkpoint_round}: resume with `ubsmoe run --resume {out}`")
    if args.command == "compare":
        return "interrupted: finished runs are kept; the same `ubsmoe compare` command resumes the rest"
    return "interrupted"


if __name__ == "__main__":
    sys.exit(main())
