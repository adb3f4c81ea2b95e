"""What each ``ubsmoe`` subcommand does: the functions the parser's subcommands call with their parsed
arguments, each returning the process's exit code."""

from __future__ import annotations

import json
from pathlib import Path

from ubsmoe.config import ConfigError, MissingFileError, describe, load_config


def methods_command(args) -> int:
    from ubsmoe.methods import REGISTRY
    from ubsmoe.methods.base import methods_markdown

    if args.markdown:
        print(methods_markdown(), end="")
        return 0
    width = max(len(name) for name in REGISTRY)
    for name in sorted(REGISTRY):
        print(f"{name:<{width}}  {REGISTRY[name].description}")
    return 0


def tasks_command(_args) -> int:
    from ubsmoe.tasks import REGISTRY

    width = max(len(name) for name in REGISTRY)
    for name in sorted(REGISTRY):
        print(f"{name:<{width}}  {REGISTRY[name].description}")
    return 0


def run_command(args) -> int:
    from ubsmoe.engine.rounds import run_experiment
    from ubsmoe.engine.run_folder import check_output_folder, tier_table

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
    print(tier_table(results))
    print(f"\nresults: {out / 'results.json'}  summary: {out / 'summary.md'}")
    return 0


def resolved(config):
    """``config`` with its method's options resolved (typed, defaults filled in), as a run stores it."""
    import copy

    from ubsmoe.config import resolve_method_options
    from ubsmoe.methods import get_method

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


def flower_certificates_command(args) -> int:
    _flower_simulation()  # the same packages
    from ubsmoe.engine.flower.certificates import write_certificates

    paths = write_certificates(Path(args.folder), args.host, args.days, force=args.force)
    print("\n".join(f"{name}: {path}" for name, path in paths.items()))
    return 0


def flower_run_command(args) -> int:
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


def predict_command(args) -> int:
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
    predictions = loaded.experiment.task.predict(loaded.experiment.model, records, loaded.card["label_names"], args.batch_size)
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


def evaluate_command(args) -> int:
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
        scores[str(budget)] = evaluate(loaded.experiment.model, loaded.experiment.task, data,
                                       args.batch_size).scores_only()
    protocols = [p for p in ("generation", "loglik", "loglik_norm") if p in next(iter(scores.values())).details]
    print("| tier | accuracy | loss |" + "".join(f" {p} |" for p in protocols))
    print("|---|---|---|" + "---|" * len(protocols))
    for budget, score in scores.items():
        print(f"| beta={budget} | {score.accuracy:.4f} | {score.loss:.4f} |"
              + "".join(f" {score.details[p]:.4f} |" for p in protocols))
    if output is not None:
        write_atomically(output, json.dumps({"data": str(args.data),
                                             "tiers": {t: s.to_json() for t, s in scores.items()}}, indent=1))
    return 0


def export_command(args) -> int:
    from ubsmoe.engine.export import check_export, export_tiers
    from ubsmoe.engine.saved_model import load_model, open_model

    saved = open_model(Path(args.run))
    tiers = [args.tier] if args.tier is not None else saved.tiers
    check_export(saved, Path(args.out), tiers, args.force)  # before the model loads: nothing is overwritten unasked
    loaded = load_model(saved)
    folders = export_tiers(loaded, Path(args.out), tiers)
    kind = "PEFT LoRA adapter" if loaded.experiment.model.num_experts == 1 else "saved model for `ubsmoe predict --run`"
    for folder in folders:
        print(f"{folder}: {kind}")
    return 0


def compare_command(args) -> int:
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


def report_command(args) -> int:
    from ubsmoe.report.compare import build_report

    to = Path(args.out) if args.out else Path(args.folder)
    build_report(Path(args.folder), to=to)
    print(f"report: {to / 'report.md'}, {to / 'report.html'}")
    return 0


def bench_command(args) -> int:
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

        run(Path(args.out), backbone=args.backbone or "minilm", batch_size=size(args.batch_size, 16), dropout=args.dropout,
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
        from ubsmoe.bench.memory import run, run_experiment

        if args.backbone is not None:  # an experiment's model, every tier with the attention kept and recomputed
            run_experiment(Path(args.out), args.backbone, batch=size(args.batch_size, 8),
                           length=size(args.max_length, 256), threads=args.threads, overrides=tuple(args.overrides))
        else:
            run(Path(args.out), threads=args.threads, batch=size(args.batch_size, 8),
                length=size(args.max_length, 256), checkpointing=args.activation_checkpointing)
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
