"""The ``ubsmoe`` command line's argument parser: its subcommands, their options, and the argparse types
that check counts and durations."""

from __future__ import annotations

import argparse

from ubsmoe import cli_commands as commands


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
    methods.set_defaults(func=commands.methods_command)
    sub.add_parser("tasks", help="list the registered tasks (the config's `task`)").set_defaults(func=commands.tasks_command)

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
    run.set_defaults(func=commands.run_command)

    predict = sub.add_parser("predict", help="predict with the model a run saved (OUT/model), as a client of one tier")
    predict.add_argument("--run", required=True, help="the run's --out folder")
    predict.add_argument("--tier", type=float, required=True, help="the budget tier whose model predicts, e.g. 0.25")
    predict.add_argument("--input", required=True, help="a .txt file (one text per line) or a data file: classification reads its 'text' column, "
                              "causal-lm its 'instruction' (and optional 'input') or 'text' column")
    predict.add_argument("--output", required=True, help="predictions, one JSON object per line")
    predict.add_argument("--batch-size", type=count, default=32, help="texts per forward pass")
    predict.add_argument("--force", action="store_true", help="replace an existing --output")
    predict.set_defaults(func=commands.predict_command)

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
    evaluate.set_defaults(func=commands.evaluate_command)

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
    export.set_defaults(func=commands.export_command)

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
    compare.set_defaults(func=commands.compare_command)

    flower = sub.add_parser("flower", help="run on a Flower deployment (a SuperLink and one SuperNode per client)")
    flower_sub = flower.add_subparsers(dest="flower_command", metavar="command", required=True)
    certificates = flower_sub.add_parser("certificates", help="write a CA and a SuperLink certificate for TLS")
    certificates.add_argument("folder", help="where ca.crt, ca.key, superlink.crt and superlink.key go")
    certificates.add_argument("--host", action="append", required=True,
                              help="a name or IP address the SuperNodes reach the SuperLink by (repeatable)")
    certificates.add_argument("--days", type=count, default=365, help="validity in days")
    certificates.add_argument("--force", action="store_true", help="replace the certificates and keys in the folder")
    certificates.set_defaults(func=commands.flower_certificates_command)
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
    flower_run.set_defaults(func=commands.flower_run_command)

    report = sub.add_parser("report", help="rebuild a comparison report from its saved results")
    report.add_argument("folder", help="a comparison folder (written by `ubsmoe compare`)")
    report.add_argument("--out", help="write the report here instead of into the comparison folder")
    report.set_defaults(func=commands.report_command)

    bench = sub.add_parser("bench", help="run a benchmark")
    bench.add_argument("name", choices=["moe-layer", "pg-step", "tiers", "upcycle", "dmr-reach", "flower-overhead",
                                          "native-load", "memory", "pg-fidelity"])
    bench.add_argument("--out", required=True, help="result JSON path (a .md summary is written beside it)")
    bench.add_argument("--dropout", type=float, default=-1.0,
                       help="tiers only: backbone dropout probability (-1 keeps the checkpoint's)")
    bench.add_argument("--backbone", default=None,
                       help="tiers: the backbone (built-in name, checkpoint folder or .gguf file; default minilm); "
                            "memory: measure this backbone's experiment, every tier with the attention kept and "
                            "recomputed, instead of the OLMoE-shaped model")
    bench.add_argument("--batch-size", type=count, default=None,
                       help="tiers and memory: texts in the timed batch (default 16 for tiers, 8 for memory)")
    bench.add_argument("--max-length", type=count, default=None,
                       help="tiers and memory: tokens per text of the timed batch "
                            "(default 128 for tiers, 256 for memory)")
    bench.add_argument("--activation-checkpointing", action="store_true",
                       help="memory only: recompute every attention block in the backward (train.activation_checkpointing)")
    bench.add_argument("--repeats", type=count, default=11, help="tiers only: timed turns per tier")
    bench.add_argument("--part-repeats", type=count, default=5,
                       help="tiers only: turns per tier with timing hooks (where a step's time goes)")
    bench.add_argument("--threads", type=count, default=2,
                       help="CPU threads torch may use in the timed benchmarks (moe-layer, pg-step, tiers, flower-overhead)")
    bench.add_argument("overrides", nargs="*", metavar="key=value",
                       help="tiers, memory --backbone and flower-overhead: config settings, e.g. task=causal-lm "
                            "data.dataset=commonsense:PATH")
    bench.set_defaults(func=commands.bench_command)
    return parser
