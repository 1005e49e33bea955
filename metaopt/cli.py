"""Command line: ``metaopt train``, ``metaopt eval``, ``metaopt bench``, ``metaopt compare`` and ``metaopt optbench``.

Every field of :class:`metaopt.config.ExperimentConfig` is an option (``inner_lr`` is
``--inner-lr``; booleans take ``--first-order`` / ``--no-first-order``; ``none`` clears an
optional value). Options override a preset or a JSON config file, which override the defaults.
Unknown or abbreviated options are rejected with the closest valid one.

Examples::

    metaopt train --preset maml-sinusoid-10shot
    metaopt train --preset maml-sinusoid-5shot --inner-lr 0.02 --iterations 1000 --run-dir runs/try
    metaopt train --resume runs/try                  # continue a stopped run exactly
    metaopt train --preset maml-sinusoid-10shot --time-budget 30   # stop after 30 minutes of training
    metaopt eval --run runs/try --checkpoint best --episodes 600 --steps 10
    metaopt compare runs/maml-* runs/fomaml-* --out runs/compare.png   # table of results, chart of curves
    metaopt bench --threads 2 > bench.md             # speed, memory and operator counts (README tables)
    metaopt optbench --preset l2l-quadratics --out runs/l2l-quadratics   # learned optimizer vs tuned baselines
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import re
import sys
import typing
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any, NoReturn

from metaopt.checkpoint import CheckpointError
from metaopt.compare import RunDirError, load_run, markdown_table, plot_runs
from metaopt.config import ConfigError, ExperimentConfig, TrainerConfig, load_preset, preset_names
from metaopt.experiment import default_run_dir, evaluate_run, train
from metaopt.optimizer_benchmark import OPTIMIZER_PRESETS
from metaopt.optimizer_benchmark import main as run_optimizer_benchmark_main
from metaopt.profiling import run_benchmark
from metaopt.trainer import RESUMABLE_CHANGES, NonFiniteError

__all__ = ["build_parser", "main"]


class _Parser(argparse.ArgumentParser):
    """An argument parser whose "unrecognized arguments" error names the closest valid option."""

    def error(self, message: str) -> NoReturn:
        unknown = re.fullmatch(r"unrecognized arguments: (.*)", message)
        if unknown:
            valid = [option for action in self._actions for option in action.option_strings]
            hints = []
            for token in unknown.group(1).split():
                option = token.split("=", 1)[0]
                if option.startswith("-"):
                    close = difflib.get_close_matches(option, valid, n=1, cutoff=0.6)
                    hints.append(f"{option} (did you mean {close[0]}?)" if close else option)
            message = f"unknown option{'s' if len(hints) > 1 else ''} {', '.join(hints)}; see {self.prog} --help"
        super().error(message)


def _field_help() -> dict[str, str]:
    """One help line per config field, taken from the ``Args`` sections of the config docstrings."""
    helps: dict[str, str] = {}
    for cls in (TrainerConfig, ExperimentConfig):
        name = None
        for line in (inspect.getdoc(cls) or "").partition("Args:\n")[2].splitlines():
            match = re.fullmatch(r" {4}(\w+): (.*)", line)
            if match:
                name, helps[match.group(1)] = match.group(1), match.group(2)
            elif name and line.startswith(" " * 8):
                helps[name] += " " + line.strip()
    return {k: v.replace("``", "").rstrip(".").replace("%", "%%") for k, v in helps.items()}


def _optional(kind: type) -> Any:
    def parse(text: str) -> Any:
        return None if text.lower() == "none" else kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its errors
    return parse


def _add_field_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("config fields (override the defaults, the preset or the config file)")
    hints = typing.get_type_hints(ExperimentConfig)
    helps = _field_help()
    for f in fields(ExperimentConfig):
        hint = hints[f.name]
        args = typing.get_args(hint)
        option = "--" + f.name.replace("_", "-")
        default = list(f.default) if isinstance(f.default, tuple) else f.default
        common = {"dest": f.name, "default": argparse.SUPPRESS, "help": f"{helps.get(f.name, '')} (default: {default})"}
        if hint is bool:
            group.add_argument(option, action=argparse.BooleanOptionalAction, **common)
        elif typing.get_origin(hint) is tuple:
            group.add_argument(option, nargs="*", type=int, metavar="N", **common)
        elif type(None) in args:
            group.add_argument(option, type=_optional(next(a for a in args if a is not type(None))), **common)
        else:
            group.add_argument(option, type=hint, **common)


def build_parser() -> argparse.ArgumentParser:
    """The ``metaopt`` argument parser (subcommands ``train``, ``eval``, ``bench``, ``compare`` and ``optbench``)."""
    parser = _Parser(prog="metaopt", allow_abbrev=False,
                     description="Optimization-based meta-learning: train, evaluate and compare runs.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train_parser = commands.add_parser(
        "train", allow_abbrev=False, help="meta-train from a preset, a config file or a stopped run",
        description="Meta-train, checkpoint and log into a run directory; at the end, score the best checkpoint "
                    f"on the test tasks (final.json). Presets: {', '.join(preset_names())}.")
    source = train_parser.add_mutually_exclusive_group()
    source.add_argument("--preset", help="named preset to start from (see the list above)")
    source.add_argument("--config", type=Path, help="JSON config file to start from")
    source.add_argument("--resume", type=Path, metavar="RUN_DIR",
                        help="continue the run in RUN_DIR from its last checkpoint, with its config.json")
    train_parser.add_argument("--run-dir", type=Path,
                              help="run directory (default: runs/<algorithm>-<dataset>-<shots>-<timestamp>)")
    _add_field_options(train_parser)
    train_parser.set_defaults(subparser=train_parser)

    eval_parser = commands.add_parser(
        "eval", allow_abbrev=False, help="evaluate a run's checkpoint on held-out tasks",
        description="Evaluate a checkpoint of a run; prints mean ± 95%% CI with the protocol and writes "
                    "RUN_DIR/eval.json.")
    eval_parser.add_argument("--run", type=Path, required=True, metavar="RUN_DIR", help="run directory")
    eval_parser.add_argument("--checkpoint", choices=("best", "last"), default="best",
                             help="best validation checkpoint or the last one (default: best)")
    eval_parser.add_argument("--episodes", type=int, help="tasks to evaluate on (default: the run's eval_episodes)")
    eval_parser.add_argument("--steps", type=int, help="inner steps (default: the run's eval_inner_steps)")
    eval_parser.add_argument("--split", choices=("test", "val"), default="test", help="task split (default: test)")
    eval_parser.set_defaults(subparser=eval_parser)

    compare_parser = commands.add_parser(
        "compare", allow_abbrev=False, help="compare runs: a table of their results, a chart of their curves",
        description="Print a Markdown table with one row per run (config, result ± 95%% CI with its protocol from "
                    "final.json or eval.json, training time, tasks/s, iterations) and write a PNG chart of the "
                    "validation metric by iteration and by training time, and of the training loss.")
    compare_parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="run directories to compare")
    compare_parser.add_argument("--out", type=Path, default=Path("compare.png"), metavar="PNG",
                                help="chart file to write (default: compare.png)")
    compare_parser.add_argument("--metric", help="validation figure to plot, e.g. val/accuracy (default: the first "
                                                 "run's, val/mse or val/accuracy)")
    compare_parser.set_defaults(subparser=compare_parser)

    bench_parser = commands.add_parser(
        "bench", allow_abbrev=False, help="measure meta-training speed, memory and operator counts",
        description="Markdown tables of tasks/s and peak memory (loop, vmap, higher, learn2learn when importable, "
                    "against a plain loop), ATen operators per meta-iteration, and second-order memory with "
                    "stored versus recomputed inner steps (metaopt.profiling.run_benchmark).")
    bench_parser.add_argument("--tasks", type=_positive, default=16,
                              help="tasks per meta-batch of the throughput table (default: 16)")
    bench_parser.add_argument("--repeats", type=_positive, default=3,
                              help="timed meta-iterations per measurement, the median is reported (default: 3)")
    bench_parser.add_argument("--threads", type=_positive, help="intra-op threads (default: torch's; 1 with --quick)")
    bench_parser.add_argument("--sweep-tasks", type=_positive, default=4,
                              help="tasks per meta-batch of the inner-steps memory sweep (default: 4)")
    bench_parser.add_argument("--quick", action="store_true", help="tiny sizes and fewer rows: a smoke run")
    bench_parser.set_defaults(subparser=bench_parser)

    optbench = commands.add_parser(
        "optbench", allow_abbrev=False, help="train a learned optimizer and score it against tuned baselines",
        description="Meta-train (or resume) a learned optimizer preset in OUT/train, tune the baselines' learning "
                    "rates, and write OUT/results.{json,md} and OUT/curves.png (metaopt.optimizer_benchmark).")
    optbench.add_argument("--preset", required=True, choices=sorted(OPTIMIZER_PRESETS))
    optbench.add_argument("--out", type=Path, required=True, help="output folder (resumed when it holds a run)")
    optbench.add_argument("--epochs", type=_positive, help="training problems (default: the preset's)")
    optbench.add_argument("--test-problems", type=_positive, help="held-out problems (default: the preset's)")
    optbench.set_defaults(subparser=optbench)
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def _train(args: argparse.Namespace) -> int:
    overrides = {f.name: getattr(args, f.name) for f in fields(ExperimentConfig) if hasattr(args, f.name)}
    if args.resume is not None:
        if args.run_dir is not None:
            args.subparser.error("--resume RUN_DIR names the run directory already; drop --run-dir")
        fixed = sorted(set(overrides) - set(RESUMABLE_CHANGES))
        if fixed:
            allowed = ", ".join("--" + name.replace("_", "-") for name in RESUMABLE_CHANGES)
            args.subparser.error(f"a resumed run keeps its config.json; "
                                 f"{', '.join('--' + n.replace('_', '-') for n in fixed)} cannot change "
                                 f"(only {allowed} may)")
        config, run_dir = ExperimentConfig.from_json(args.resume / "config.json"), args.resume
    else:
        config = (load_preset(args.preset) if args.preset else
                  ExperimentConfig.from_json(args.config) if args.config else ExperimentConfig())
        run_dir = args.run_dir
    config = config.replace(**overrides)
    run_dir = run_dir if run_dir is not None else default_run_dir(config)
    print(f"run directory: {run_dir}", flush=True)
    final = train(config, run_dir, resume=args.resume is not None)
    print(final["summary"])
    print(f"test result written to {run_dir / 'final.json'}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    result = evaluate_run(args.run, args.checkpoint, episodes=args.episodes, steps=args.steps, split=args.split)
    print(result)
    print(f"written to {args.run / 'eval.json'}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    runs = [load_run(path) for path in args.runs]
    plot_runs(runs, args.out, args.metric)
    print(markdown_table(runs))
    print(f"chart written to {args.out}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    run_benchmark(tasks=args.tasks, repeats=args.repeats, threads=args.threads, quick=args.quick,
                  sweep_tasks=args.sweep_tasks, write=lambda text: print(text, flush=True))
    return 0


def _optbench(args: argparse.Namespace) -> int:
    run_optimizer_benchmark_main(args.preset, str(args.out), args.epochs, args.test_problems)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        args.subparser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        commands = {"train": _train, "eval": _eval, "compare": _compare, "bench": _bench, "optbench": _optbench}
        return commands[args.command](args)
    except ConfigError as err:
        print(f"metaopt {args.command}: error: {err}", file=sys.stderr)
        return 2
    except (CheckpointError, NonFiniteError, RunDirError) as err:
        print(f"metaopt {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
