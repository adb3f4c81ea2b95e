"""The ``ubsmoe`` command line: list methods, run an experiment, run benchmarks."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ubsmoe.config import ConfigError, describe, load_config


def _methods(_args) -> int:
    from ubsmoe.methods import REGISTRY

    width = max(len(name) for name in REGISTRY)
    for name in sorted(REGISTRY):
        print(f"{name:<{width}}  {REGISTRY[name].description}")
    return 0


def _run(args) -> int:
    from ubsmoe.engine.simulation import run_experiment
    from ubsmoe.report.summary import tier_table, write_results

    if args.help_config:
        for key, default, text in describe():
            print(f"{key:<32} {default:<28} {text}")
        return 0
    config = load_config(args.config, args.overrides, method=args.method)
    out = Path(args.out)
    results = run_experiment(config, show_progress=not args.quiet)
    write_results(results, out)
    print(tier_table(results))
    print(f"\nresults: {out / 'results.json'}  summary: {out / 'summary.md'}")
    return 0


def _bench(args) -> int:
    if args.name == "moe-layer":
        from ubsmoe.bench.moe_layer import run

        result = run(Path(args.out))
        print(Path(args.out).with_suffix(".md").read_text())
        return 0 if result else 1
    if args.name == "pg-step":
        from ubsmoe.bench.pg_step import run

        run(Path(args.out))
        print(Path(args.out).with_suffix(".md").read_text())
        return 0
    if args.name == "upcycle":
        from ubsmoe.bench.upcycle_fidelity import run

        run(Path(args.out))
        print(Path(args.out).with_suffix(".md").read_text())
        return 0
    raise ConfigError(f"unknown benchmark {args.name!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ubsmoe", description="Resource-adaptive federated fine-tuning with sparse MoE")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("methods", help="list the registered federated methods").set_defaults(func=_methods)

    run = sub.add_parser("run", help="run one federated experiment",
                         description="Run one experiment. Settings: defaults < --config FILE.toml < key=value "
                                     "overrides (see --help-config for every key).")
    run.add_argument("--method", help="registered method name (see `ubsmoe methods`)")
    run.add_argument("--out", default="runs/latest", help="output folder for results.json and summary.md")
    run.add_argument("--config", help="TOML config file")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.add_argument("--help-config", action="store_true", help="list every config key with default and help")
    run.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. federation.rounds=3 model.lora_rank=4")
    run.set_defaults(func=_run)

    bench = sub.add_parser("bench", help="run a benchmark")
    bench.add_argument("name", choices=["moe-layer", "pg-step", "upcycle"])
    bench.add_argument("--out", required=True, help="result JSON path (a .md summary is written beside it)")
    bench.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, KeyError, FileNotFoundError, ValueError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"ubsmoe: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
