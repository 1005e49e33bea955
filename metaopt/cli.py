"""Command line: ``metaopt train``, ``metaopt eval``, ``metaopt compare`` and ``metaopt bench``.

``metaopt train`` starts from a preset, a JSON config file, a stopped run or the default
(``maml-sinusoid-10shot``); ``--algorithm``, ``--dataset`` and ``--model`` swap a part for another
(with its default options). Every option of the trainer and of the chosen parts is a flag
(``inner_lr`` is ``--inner-lr``; booleans take ``--first-order`` / ``--no-first-order``; ``none``
clears an optional value); flags override the preset or file. A flag that the chosen algorithm,
dataset or model does not take is an error that lists what it takes.

Examples::

    metaopt train --preset maml-sinusoid-10shot
    metaopt train --preset maml-sinusoid-5shot --inner-lr 0.02 --iterations 1000 --run-dir runs/try
    metaopt train --resume runs/try                  # continue a stopped run exactly
    metaopt train --algorithm metasgd --help         # the options of Meta-SGD
    metaopt train --preset l2l-quadratics            # a learned optimizer, scored against tuned baselines
    metaopt eval --run runs/try --checkpoint best --episodes 600 --steps 10
    metaopt compare runs/maml-* runs/metasgd-* --out runs/compare.png
    metaopt bench --threads 2 > bench.md             # speed, memory and operator counts (README tables)
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import shlex
import signal
import subprocess
import sys
import typing
import warnings
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any, NoReturn

from metaopt.evaluation.compare import RunDirError, UnfinishedRunWarning, markdown_table, plot_runs, read_runs
from metaopt.options import ConfigError, Options, field_help
from metaopt.registry import Kind, entry, load_plugins, names
from metaopt.training.checkpoint import CheckpointError
from metaopt.training.config import RunConfig, Section, TrainerConfig, load_preset, preset_names
from metaopt.training.distributed import DistributedError, launch_command
from metaopt.training.experiment import RunCompleteError, default_run_dir, evaluate_run, train
from metaopt.training.legacy import read_run_config
from metaopt.training.trainer import RESUMABLE_CHANGES, Interrupted, NonFiniteError

__all__ = ["build_parser", "main"]

DEFAULT_PRESET = "maml-sinusoid-10shot"
_SECTIONS: dict[str, Kind] = {"data": "dataset", "model": "model", "algorithm": "algorithm"}  # section -> kind
_FLAG = {"data": "--dataset", "model": "--model", "algorithm": "--algorithm"}


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


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _optional(kind: type) -> Any:
    def parse(text: str) -> Any:
        return None if text.lower() == "none" else kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its errors
    return parse


def _add_options(group: argparse._ArgumentGroup, options: type[Options], prefix: str, current: Options | None,
                 skip: Sequence[str] = ()) -> None:
    """One flag per option of ``options`` (dest ``prefix.name``), its help from the class docstring."""
    hints = typing.get_type_hints(options)
    helps = field_help(options)
    for f in fields(options):
        hint = hints[f.name]
        if f.name in skip or typing.get_origin(hint) is dict:
            continue
        value = getattr(current, f.name) if current is not None else f.default
        shown = list(value) if isinstance(value, tuple) else value
        common = {"dest": f"{prefix}.{f.name}", "default": argparse.SUPPRESS,
                  "help": f"{helps.get(f.name, '')} (now: {shown})".replace("%", "%%")}
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if hint is bool:
            group.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, **common)
        elif typing.get_origin(hint) is tuple:
            group.add_argument(_flag(f.name), nargs="*", type=typing.get_args(hint)[0], metavar="V", **common)
        elif typing.get_origin(hint) is typing.Literal or f.name in options.choices:
            group.add_argument(_flag(f.name), choices=options.choices.get(f.name) or typing.get_args(hint), **common)
        elif type(None) in typing.get_args(hint):
            group.add_argument(_flag(f.name), type=_optional(args[0]), **common)
        else:
            group.add_argument(_flag(f.name), type=hint, **common)


def _listing() -> str:
    load_plugins()
    lines = []
    for kind, title in (("algorithm", "algorithms"), ("dataset", "datasets"), ("model", "models")):
        lines.append(f"{title}:")
        lines.extend(f"  {name:14} {entry(kind, name).summary}" for name in names(kind))
    lines.append(f"presets: {', '.join(preset_names())}")
    lines.append("metaopt train --algorithm NAME --help (or --dataset, --model, --preset) lists the options of a part.")
    return "\n".join(lines)


def _source_parser() -> argparse.ArgumentParser:
    """The flags that choose the run's config; parsed first, so that the parts' own flags can be added."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", help="named preset to start from (see the list above)")
    source.add_argument("--config", type=Path, help="JSON config file to start from")
    source.add_argument("--resume", type=Path, metavar="RUN_DIR",
                        help="continue the run in RUN_DIR from its last checkpoint, with its config.json")
    parser.add_argument("--run-dir", type=Path, help="run directory (default: runs/<algorithm>-<dataset>-<timestamp>)")
    for section, flag in _FLAG.items():
        parser.add_argument(flag, dest=f"choose.{section}", metavar="NAME",
                            help=f"the {_SECTIONS[section]} (with its default options; see the list above)")
    return parser


def _chosen(args: argparse.Namespace) -> dict[str, Any]:
    """The config the flags start from (a dict), with the parts ``--algorithm``, ``--dataset``, ``--model`` chose."""
    if args.resume is not None:
        raw = read_run_config(args.resume / "config.json").to_dict()
    elif args.config is not None:
        raw = RunConfig.from_json(args.config).to_dict()
    else:
        raw = load_preset(args.preset or DEFAULT_PRESET).to_dict()
    for section, kind in _SECTIONS.items():
        chosen = getattr(args, f"choose.{section}")
        if chosen is not None and chosen != (raw.get(section) or {}).get("name"):
            raw[section] = None if chosen == "none" else {"name": entry(kind, chosen).name}
    algorithm = raw["algorithm"]["name"]
    if entry("algorithm", algorithm).problems != "episodes" and getattr(args, "choose.model") is None:
        raw["model"] = None  # learned optimizers and rule searches train on problems that define their networks
    return {k: v for k, v in raw.items() if v is not None}


def _parts(raw: dict[str, Any]) -> dict[str, Section | None]:
    """The sections of ``raw``, each checked on its own (for help on a combination that is not a valid run)."""
    return {section: Section.from_dict(kind, raw[section]) if section in raw else None
            for section, kind in _SECTIONS.items()}


def _reference_point(text: str) -> tuple[int, float]:
    """``ITERATION=VALUE`` as ``(iteration, value)``."""
    try:
        iteration, value = text.split("=")
        return int(iteration), float(value)
    except ValueError:
        message = f"a reference point is ITERATION=VALUE, e.g. 1000=0.976; got {text!r}"
        raise argparse.ArgumentTypeError(message) from None


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


#: The other commands: one-line help, description, and their arguments as (flags, add_argument settings).
_COMMANDS: dict[str, tuple[str, str, list[tuple[tuple[str, ...], dict[str, Any]]]]] = {
    "eval": ("evaluate a run's checkpoint on held-out problems",
             "Evaluate a checkpoint of a run; prints mean ± 95%% CI with the protocol (and, for a learned optimizer, "
             "the table against tuned baselines) and writes RUN_DIR/eval.json.", [
                 (("--run",), {"type": Path, "required": True, "metavar": "RUN_DIR", "help": "run directory"}),
                 (("--checkpoint",), {"choices": ("best", "last"), "default": "best",
                                      "help": "best validation checkpoint or the last one (default: best)"}),
                 (("--episodes",), {"type": _positive, "help": "problems to evaluate on (default: the run's "
                                                               "test_episodes or eval_episodes)"}),
                 (("--steps",), {"type": _positive, "help": "inner steps (default: the learner's evaluation steps)"}),
                 (("--split",), {"choices": ("test", "val"), "default": "test",
                                 "help": "problem split (default: test)"}),
                 (("--threads",), {"type": _positive, "help": "intra-op CPU threads (default: the run's)"}),
             ]),
    "compare": ("compare runs: a table of their results, a chart of their curves",
                "Print a Markdown table with one row per run (config, result ± 95%% CI with its protocol from "
                "final.json or eval.json, training time, tasks/s, iterations) and write a PNG chart of the validation "
                "metric by iteration and by training time, and of the training loss.", [
                    (("runs",), {"nargs": "+", "type": Path, "metavar": "RUN_DIR",
                                 "help": "run directories to compare"}),
                    (("--out",), {"type": Path, "default": Path("compare.png"), "metavar": "PNG",
                                  "help": "chart file to write (default: compare.png)"}),
                    (("--metric",), {"help": "validation figure to plot, e.g. val/accuracy (default: the first run's, "
                                             "val/mse or val/accuracy)"}),
                    (("--reference",), {"nargs": "+", "type": _reference_point, "metavar": "ITERATION=VALUE",
                                        "help": "published values of the metric to mark on the chart, e.g. "
                                                "100=1.906 300=1.344 1000=0.976"}),
                ]),
    "bench": ("measure meta-training speed, memory and operator counts",
              "Markdown tables of tasks/s and peak memory (loop, vmap, higher, learn2learn when importable, against a "
              "plain loop), ATen operators per meta-iteration, and second-order memory with stored versus recomputed "
              "inner steps (metaopt.bench).", [
                  (("--tasks",), {"type": _positive, "default": 16,
                                  "help": "tasks per meta-batch of the throughput table (default: 16)"}),
                  (("--repeats",), {"type": _positive, "default": 3, "help": "timed meta-iterations per measurement, "
                                                                          "the median is reported (default: 3)"}),
                  (("--threads",), {"type": _positive, "help": "intra-op threads (default: torch's; 1 with --quick)"}),
                  (("--sweep-tasks",), {"type": _positive, "default": 4,
                                        "help": "tasks per meta-batch of the inner-steps memory sweep (default: 4)"}),
                  (("--quick",), {"action": "store_true", "help": "tiny sizes and fewer rows: a smoke run"}),
              ]),
}


def build_parser(config: RunConfig | None = None, parts: dict[str, Section | None] | None = None,
                 ) -> argparse.ArgumentParser:
    """The ``metaopt`` parser; ``train`` takes the flags of ``config`` (seed, device, trainer options) and the
    options of ``parts`` (the config's algorithm, dataset and model by default; ``{}`` for none)."""
    parser = _Parser(prog="metaopt", allow_abbrev=False,
                     description="Optimization-based meta-learning: train, evaluate and compare runs.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train_parser = commands.add_parser(
        "train", allow_abbrev=False, parents=[_source_parser()], formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="metaopt train [--preset NAME | --config FILE | --resume RUN_DIR] [--algorithm NAME] [--dataset NAME] "
              "[--model NAME] [options]",
        help="meta-train from a preset, a config file or a stopped run",
        description="Meta-train, checkpoint and log into a run directory; at the end, score the best checkpoint "
                    "on the test problems (final.json; learned optimizers against tuned baselines). Validation and "
                    "test time are not part of --time-budget, which counts training time only.\n\n" + _listing())
    if config is not None:
        common = train_parser.add_argument_group("run options")
        common.add_argument("--seed", type=int, dest="run.seed", default=argparse.SUPPRESS,
                            help=f"fixes the initialisation and the problem streams (now: {config.seed})")
        common.add_argument("--device", dest="run.device", default=argparse.SUPPRESS,
                            help=f"'auto' (CUDA when available), 'cpu', 'cuda:0'... (now: {config.device})")
        common.add_argument("--threads", dest="run.threads", type=_optional(int), default=argparse.SUPPRESS,
                            help=f"intra-op CPU threads; none: torch's default (now: {config.threads})")
        common.add_argument("--nproc", type=_positive, default=argparse.SUPPRESS, metavar="N",
                            help="meta-train on N processes of this machine (torchrun --nproc-per-node N); with "
                                 "torchrun itself, on several machines: torchrun --nnodes M --nproc-per-node N "
                                 "--rdzv-backend c10d --rdzv-endpoint HOST:PORT -m metaopt train ...")
        _add_options(common, TrainerConfig, "trainer", config.trainer)
        parts = {section: getattr(config, section) for section in _SECTIONS} if parts is None else parts
        for section, kind in _SECTIONS.items():
            part = parts.get(section)
            if part is not None:
                group = train_parser.add_argument_group(f"options of {kind} {part.name!r}")
                try:
                    _add_options(group, type(part.options), section, part.options)
                except argparse.ArgumentError as err:
                    raise ConfigError(f"{err}: two parts of this run take an option of the same name") from None
    train_parser.set_defaults(subparser=train_parser)

    for name, (summary, description, arguments) in _COMMANDS.items():
        sub = commands.add_parser(name, allow_abbrev=False, help=summary, description=description)
        for flags, settings in arguments:
            sub.add_argument(*flags, **settings)
        sub.set_defaults(subparser=sub)
    return parser


def _misplaced(parser: argparse.ArgumentParser, config: RunConfig, unknown: Sequence[str]) -> NoReturn:
    """Reject flags the run's parts do not take, naming the part and what it takes."""
    for token in unknown:
        name = token.split("=", 1)[0].removeprefix("--").removeprefix("no-").replace("-", "_")
        for section, kind in _SECTIONS.items():
            part: Section | None = getattr(config, section)
            others = [n for n in names(kind) if name in entry(kind, n).options.field_names()]
            if part is None and others:
                parser.error(f"{token.split('=', 1)[0]} is an option of {kind} {', '.join(others)}, but this run has "
                             f"no {kind} (algorithm {config.algorithm.name!r} trains on problems that define their "
                             "own networks)")
            if part is not None and others and name not in part.options.field_names():
                takes = ", ".join(_flag(n) for n in part.options.field_names()) or "none"
                parser.error(f"{token.split('=', 1)[0]} is not an option of {kind} {part.name!r}; its options are "
                             f"{takes} (it is an option of {', '.join(others)})")
    parser.error(f"unrecognized arguments: {' '.join(unknown)}")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The flags given, as :meth:`RunConfig.replace` takes them."""
    changes: dict[str, Any] = {}
    for dest, value in vars(args).items():
        section, _, name = dest.partition(".")
        if section == "run":
            changes[name] = value
        elif section in ("trainer", *_SECTIONS):
            changes.setdefault(section, {})[name] = value
    return changes


def _launched(argv: Sequence[str]) -> tuple[int | None, list[str]]:
    """The ``--nproc N`` of ``argv`` (``None`` when absent) and the other arguments."""
    rest, nproc, tokens = [], None, list(argv)
    while tokens:
        token = tokens.pop(0)
        if token == "--nproc" or token.startswith("--nproc="):
            value = token.partition("=")[2] if "=" in token else (tokens.pop(0) if tokens else "")
            try:
                nproc = _positive(value)
            except argparse.ArgumentTypeError as err:
                raise ConfigError(f"--nproc: {err}") from None
        else:
            rest.append(token)
    return nproc, rest


def _launch(nproc: int, argv: Sequence[str]) -> int:
    """Run ``metaopt train argv`` on ``nproc`` processes of this machine through ``torchrun``; its exit status.

    The launcher runs in its own session, so a Ctrl-C reaches the ranks once, forwarded by this
    process, as does a SIGTERM sent to it; the ranks then stop after their meta-update
    and rank 0 says how to resume (exit status ``128 + signal``, nothing more printed here).
    """
    if "WORLD_SIZE" in os.environ:
        raise ConfigError("--nproc starts torchrun itself, but this process already runs under torchrun "
                          f"(WORLD_SIZE={os.environ['WORLD_SIZE']}): drop --nproc")
    print(f"starting {nproc} processes: {shlex.join(launch_command(nproc, argv))}", flush=True)
    child = subprocess.Popen(launch_command(nproc, argv), start_new_session=True)
    # set, not inherited: a launcher started in the background of a script inherits SIGINT ignored
    previous = {signum: signal.signal(signum, lambda signum, frame: child.send_signal(signum))
                for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        status = child.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if status not in (0, 128 + signal.SIGINT, 128 + signal.SIGTERM):
        # a rank that crashed in native code (gloo aborts) prints nothing: torchrun's report names it
        print(f"metaopt train: error: a process of the run failed (torchrun exit status {status}; its report above "
              "names the rank under 'Root Cause'); the last checkpoint is intact: restart the whole run with "
              f"metaopt train --nproc {nproc} --resume RUN_DIR", file=sys.stderr, flush=True)
    return status


def _train(argv: Sequence[str]) -> int:
    nproc, argv = _launched(argv)
    if nproc is not None and nproc > 1:
        return _launch(nproc, argv)
    source, _ = _source_parser().parse_known_args(argv)
    chosen = [section for section in _SECTIONS if getattr(source, f"choose.{section}") is not None]
    raw = _chosen(source)
    if {"-h", "--help"} & set(argv):  # the options of the parts named, even if they do not make a valid run
        named = chosen or source.preset or source.config or source.resume
        build_parser(RunConfig.from_dict(load_preset(DEFAULT_PRESET).to_dict() | {"trainer": raw.get("trainer", {})}),
                     _parts(raw) if named else {}).parse_args(["train", *argv])
    config = RunConfig.from_dict(raw)
    parser = build_parser(config)
    args, unknown = parser.parse_known_args(["train", *argv])
    if unknown:
        _misplaced(args.subparser, config, unknown)
    changes = _overrides(args)
    if args.resume is not None:
        if args.run_dir is not None:
            args.subparser.error("--resume RUN_DIR names the run directory already; drop --run-dir")
        given = [f"{k}.{n}" for k, v in changes.items() if isinstance(v, dict) for n in v]
        given += [k for k, v in changes.items() if not isinstance(v, dict)] + [_FLAG[s] for s in chosen]
        fixed = sorted(_flag(name.rpartition(".")[2]) if "." in name else name
                       for name in given if name not in RESUMABLE_CHANGES)
        if fixed:
            allowed = ", ".join(_flag(name.rpartition(".")[2]) for name in RESUMABLE_CHANGES)
            args.subparser.error(f"a resumed run keeps its config.json; {', '.join(fixed)} cannot change (only "
                                 f"{allowed} may)")
    config = config.replace(**changes)
    run_dir = args.resume or args.run_dir or default_run_dir(config)
    leader = int(os.environ.get("RANK", "0")) == 0
    if leader:
        print(f"run directory: {run_dir}", flush=True)
    try:
        final = train(config, run_dir, resume=args.resume is not None)
    except Interrupted as stop:
        kept = "" if stop.saved == stop.iteration else f" (last.pt holds iteration {stop.saved}: the meta-updates " \
                                                         "since were not finite)"
        if leader:
            world = int(os.environ.get("WORLD_SIZE", "1"))
            launch = f"--nproc {world} " if world > 1 else ""
            print(f"interrupted at iteration {stop.iteration}{kept}; resume with: metaopt train {launch}--resume "
                  f"{run_dir}", file=sys.stderr)
        return 128 + stop.signum
    except RunCompleteError as done:
        if leader:
            print(done)
        return 0
    if leader:
        _report(final, Path(run_dir) / "final.json")
    return 0


def _report(record: dict[str, Any], path: Path) -> None:
    """Print an evaluation record: the checkpoint, the result with its protocol, and a learned optimizer's table."""
    print(f"{record['split']} problems, checkpoint {record['checkpoint']} (iteration {record['checkpoint_iteration']})")
    print(record["summary"])
    if "baselines" in record:
        print(record["baselines"]["table"])
    print(f"written to {path}")


def _eval(args: argparse.Namespace) -> int:
    record = evaluate_run(args.run, args.checkpoint, episodes=args.episodes, steps=args.steps, split=args.split,
                          threads=args.threads)
    _report(record, args.run / "eval.json")
    return 0


def _compare(args: argparse.Namespace) -> int:
    with warnings.catch_warnings(record=True) as left_out:
        warnings.simplefilter("always", UnfinishedRunWarning)
        try:
            runs = read_runs(args.runs)
        finally:  # before the error that no run is left
            for warning in left_out:
                print(f"metaopt compare: warning: {warning.message}", file=sys.stderr)
    plot_runs(runs, args.out, args.metric, reference=dict(args.reference or ()))
    print(markdown_table(runs))
    print(f"chart written to {args.out}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from metaopt.bench.report import run_benchmark

    run_benchmark(tasks=args.tasks, repeats=args.repeats, threads=args.threads, quick=args.quick,
                  sweep_tasks=args.sweep_tasks, write=lambda text: print(text, flush=True))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["optbench"]:
        print("metaopt optbench: a learned optimizer is now an ordinary run whose evaluation scores it against tuned "
              "baselines: metaopt train --preset l2l-quadratics --run-dir DIR, then metaopt eval --run DIR",
              file=sys.stderr)
        return 2
    command = argv[0] if argv else None
    try:
        if command == "train":
            return _train(argv[1:])
        args, unknown = build_parser().parse_known_args(argv)
        if unknown:
            args.subparser.error(f"unrecognized arguments: {' '.join(unknown)}")
        commands = {"eval": _eval, "compare": _compare, "bench": _bench}
        return commands[args.command](args)
    except (ConfigError, FileNotFoundError) as err:  # the user's input, or data that is not where it should be
        print(f"metaopt {command}: error: {err}", file=sys.stderr)
        return 2
    except (CheckpointError, NonFiniteError, RunDirError, DistributedError) as err:
        print(f"metaopt {command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training started
        print(f"metaopt {command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
