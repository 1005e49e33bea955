"""Compare runs side by side: a Markdown table of their results and a chart of their learning curves.

A run directory written by :func:`metaopt.training.experiment.train` (``metaopt train``) tells what
was trained (``config.json``: algorithm, first-order or not, dataset, ways, shots), how well it did (``final.json``: the
best checkpoint on the test tasks, or else ``eval.json`` from ``metaopt eval``), and how training
went (``metrics.jsonl``: curves, training time, tasks per second, iterations). The chart has three
panels: the validation metric (with its 95% interval) against iteration and against training
time (the wall time of the meta-updates alone, see :mod:`metaopt.training.clock`), and the training
loss against iteration.

A run without a result yet (training under way or stopped before its end) is no error for
:func:`read_runs`, which reads a glob of run directories: it leaves such a run out with an
:class:`UnfinishedRunWarning` naming it and why, and fails only when no run is left.

The tasks/s column is the run's tasks over its training time: tasks per meta-update x
meta-updates / ``time/train_s``. The tasks per meta-update are read off the log, not the
config, since configs do not say it alike (a few-shot dataset's ``meta_batch`` is it; an
optimizee family's ``batch`` counts functions per problem, and a meta-update trains on one
problem): each logged ``time/tasks_per_s`` is the tasks of the meta-updates since the previous
one over their training time (:meth:`metaopt.training.clock.Clock.throughput`), so rate x window
time / window meta-updates is the tasks per meta-update, and the value that holds for most
meta-updates is taken (a window across a resume is inexact: its rate counts the meta-updates
after the resume only). Averaging the window rates instead would weigh a short window as much
as a long one, e.g. the first, which holds the slow first meta-updates.

Example:
    >>> import contextlib, io, tempfile
    >>> from metaopt.training.config import load_preset
    >>> from metaopt.training.experiment import train
    >>> config = load_preset("maml-sinusoid-10shot").replace(trainer={"iterations": 4, "eval_every": 2,
    ...     "eval_episodes": 4}, data={"meta_batch": 2}, model={"hidden": [8]})
    >>> with contextlib.redirect_stdout(io.StringIO()):  # the trainer's progress lines
    ...     run = read_run(train(config, tempfile.mkdtemp())["run_dir"])
    >>> run.iterations, run.evaluation_file, run.val_metrics(), run.tasks_per_update, run.tasks
    (4, 'final.json', ['val/mse'], 2, 8)
    >>> markdown_table([run]).splitlines()[2].split(" | ")[1:5]  # header, separator, then one row per run
    ['maml', 'sinusoid', '-', '10']
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from metaopt.options import ConfigError
from metaopt.training.config import RunConfig
from metaopt.training.legacy import read_run_config
from metaopt.training.logging import METRICS_FILE, read_metrics

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["RESULT_FILES", "Run", "RunDirError", "UnfinishedRunError", "UnfinishedRunWarning", "read_run", "read_runs",
           "markdown_table", "plot_runs", "tasks_per_update"]

RESULT_FILES = ("final.json", "eval.json")  # where a run's result is read from: the newer of the two
_COLUMNS = ("run", "algorithm", "dataset", "ways", "shots", "result (95% CI; protocol)", "evaluated", "train time",
            "tasks/s", "iterations")
_NUMERIC = {"ways", "shots", "train time", "tasks/s", "iterations"}  # right-aligned


class RunDirError(RuntimeError):
    """A run directory lacks a file or a figure that the comparison needs; the message names both."""


class UnfinishedRunError(RunDirError):
    """A run directory holds a run without a result yet (neither ``final.json`` nor ``eval.json``)."""


class UnfinishedRunWarning(UserWarning):
    """:func:`read_runs` left out a run without a result; the message names the run and how to finish it."""


@dataclass(frozen=True)
class Run:
    """What a comparison reads from one run directory (:func:`read_run`).

    Args:
        path: the run directory; its name is the run's name.
        config: the run's config (``config.json``).
        evaluation: the record of ``final.json`` or ``eval.json``: ``result``, ``summary`` (the
            figure ± 95% interval with its protocol), ``split``, ``checkpoint``, ``checkpoint_iteration``.
        evaluation_file: the file ``evaluation`` comes from.
        records: the records of ``metrics.jsonl``, one per logged iteration.
    """

    path: Path
    config: RunConfig
    evaluation: Mapping[str, Any]
    evaluation_file: str
    records: Sequence[Mapping[str, Any]]

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def iterations(self) -> int:
        """Meta-updates done (the last logged iteration: the trainer always logs its last one)."""
        return int(self.records[-1]["iteration"])

    @property
    def train_s(self) -> float:
        """Training time in seconds: the wall time of the meta-updates, without validation and checkpoints."""
        return float(self.records[-1]["time/train_s"])

    @property
    def tasks_per_update(self) -> int:
        """Tasks per meta-update, read off the logged throughputs (:func:`tasks_per_update`)."""
        return tasks_per_update(self.records, self.path)

    @property
    def tasks(self) -> int:
        """Tasks meta-trained on: tasks per meta-update x meta-updates."""
        return self.tasks_per_update * self.iterations

    @property
    def tasks_per_s(self) -> float:
        """Meta-training throughput: :attr:`tasks` over the training time :attr:`train_s` (0 without training time)."""
        return self.tasks / self.train_s if self.train_s > 0 else 0.0

    def val_metrics(self) -> list[str]:
        """The validation figures the run logged (``val/mse``, ``val/accuracy``...), sorted."""
        return sorted({k for r in self.records for k in r if k.startswith("val/") and not k.endswith("_ci95")})


def tasks_per_update(records: Sequence[Mapping[str, Any]], run: str | Path) -> int:
    """Tasks per meta-update of the run ``run`` that logged ``records`` (see the module docstring).

    Each record with ``time/tasks_per_s`` closes a window of meta-updates that starts at the
    previous such record (at iteration 0 and no training time for the first one); records of
    validation figures alone do not. Each window estimates ``rate x window time / window
    iterations``, rounded; the estimate of most meta-updates wins (ties: the earliest window's).

    Example:
        >>> tasks_per_update([{"iteration": 2, "time/tasks_per_s": 0.8, "time/train_s": 10.0},   # 8 tasks in 10 s
        ...                   {"iteration": 3, "val/mse": 0.5, "time/train_s": 11.0},
        ...                   {"iteration": 4, "time/tasks_per_s": 4.0, "time/train_s": 12.0}], "runs/x")
        4

    Raises:
        RunDirError: no window with meta-updates, training time and a positive rate.
    """
    weights: dict[int, int] = {}
    iteration, train_s = 0, 0.0
    for record in records:
        if record.get("time/tasks_per_s") is None or record.get("time/train_s") is None:
            continue
        updates, seconds = int(record["iteration"]) - iteration, float(record["time/train_s"]) - train_s
        estimate = round(float(record["time/tasks_per_s"]) * seconds / updates) if updates > 0 else 0
        if estimate >= 1:
            weights[estimate] = weights.get(estimate, 0) + updates
        iteration, train_s = int(record["iteration"]), float(record["time/train_s"])
    if not weights:
        raise RunDirError(f"run {run}: the records of {METRICS_FILE} give no tasks per meta-update (no window of "
                          "meta-updates with training time and a positive 'time/tasks_per_s'); compare reads run "
                          "directories written by `metaopt train`")
    return max(weights, key=weights.__getitem__)


def _read_json(path: Path, run: Path) -> dict[str, Any]:
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise RunDirError(f"run {run}: {path.name} is not valid JSON ({err}); the file was damaged or edited, "
                          "write it again or leave the run out") from err
    if not isinstance(content, dict):
        raise RunDirError(f"run {run}: {path.name} must hold a JSON object, got {type(content).__name__}")
    return content


def _require(mapping: Mapping[str, Any], keys: Sequence[str], file: str, run: Path) -> None:
    missing = [key for key in keys if key not in mapping]
    if missing:
        raise RunDirError(f"run {run}: {file} lacks {missing}; compare reads run directories written by "
                          "`metaopt train` (metaopt.training.experiment.train) with this metaopt version")


def read_run(run_dir: str | Path) -> Run:
    """Read ``config.json``, the run's result and ``metrics.jsonl`` of a run directory.

    The result is the newer of ``final.json`` (written at the end of training) and ``eval.json``
    (written by a later ``metaopt eval``, e.g. with more test tasks).

    Raises:
        UnfinishedRunError: the run has no result yet (a :class:`RunDirError`).
        RunDirError: naming the run and the file that is missing, unreadable or incomplete.
    """
    path = Path(run_dir)
    if not path.is_dir():
        raise RunDirError(f"run {path}: no such directory; pass run directories written by `metaopt train`")
    if not (path / "config.json").is_file():
        raise RunDirError(f"run {path}: config.json is missing; pass a run directory written by `metaopt train`")
    try:
        config = read_run_config(path / "config.json")
    except ConfigError as err:
        raise RunDirError(f"run {path}: {err}") from err

    written = [name for name in RESULT_FILES if (path / name).is_file()]
    if not written:
        raise UnfinishedRunError(f"run {path}: neither final.json nor eval.json exists (the run has no result yet); "
                          f"finish it with `metaopt train --resume {path}` or evaluate a checkpoint with "
                          f"`metaopt eval --run {path}`")
    evaluation_file = max(written, key=lambda name: (path / name).stat().st_mtime_ns)
    evaluation = _read_json(path / evaluation_file, path)
    _require(evaluation, ("summary", "split", "checkpoint", "checkpoint_iteration"), evaluation_file, path)

    if not (path / METRICS_FILE).is_file():
        raise RunDirError(f"run {path}: {METRICS_FILE} is missing; compare needs the training log that "
                          "`metaopt train` writes into the run directory")
    try:
        records = read_metrics(path / METRICS_FILE)
    except ValueError as err:
        raise RunDirError(f"run {path}: {err}") from err
    if not records:
        raise RunDirError(f"run {path}: {METRICS_FILE} holds no record; the run logged no iteration, train it first")
    _require(records[-1], ("iteration", "time/train_s"), f"the last record of {METRICS_FILE}", path)
    if not any(r.get("time/tasks_per_s") is not None for r in records):
        raise RunDirError(f"run {path}: {METRICS_FILE} holds no 'time/tasks_per_s'; compare reads run directories "
                          "written by `metaopt train`")
    tasks_per_update(records, path)  # refused here, with the other damage, rather than when the table is drawn
    return Run(path, config, evaluation, evaluation_file, records)


def read_runs(run_dirs: Iterable[str | Path]) -> list[Run]:
    """:func:`read_run` of each directory, leaving out the runs without a result yet (e.g. a glob over ``runs/``).

    Warns:
        UnfinishedRunWarning: once per run left out, naming it and why.

    Raises:
        ValueError: no directory given.
        RunDirError: no run is left, or a run directory is missing, damaged or not written by ``metaopt train``.
    """
    paths = [Path(run_dir) for run_dir in run_dirs]
    if not paths:
        raise ValueError("no runs to compare; pass at least one run directory")
    runs = []
    for path in paths:
        try:
            runs.append(read_run(path))
        except UnfinishedRunError as err:
            warnings.warn(f"{err}; left out of the comparison", UnfinishedRunWarning, stacklevel=2)
    if not runs:
        raise RunDirError(f"no run to compare: none of the {len(paths)} run directories given has a result yet "
                          "(final.json or eval.json); finish a run with `metaopt train --resume RUN_DIR` or evaluate "
                          "a checkpoint with `metaopt eval --run RUN_DIR`")
    return runs


def _cell(value: Any) -> str:
    return "-" if value is None else str(value).replace("|", "\\|")


def _duration(seconds: float) -> str:
    """``h:mm:ss.s``."""
    minutes, secs = divmod(round(seconds, 1), 60)
    return f"{int(minutes // 60)}:{int(minutes % 60):02d}:{secs:04.1f}"


def markdown_table(runs: Sequence[Run]) -> str:
    """One Markdown row per run: name, config, result ± 95% interval with protocol, training time, throughput.

    The ``evaluated`` column tells the file, split and checkpoint the result comes from.
    """
    lines = ["| " + " | ".join(_COLUMNS) + " |",
             "| " + " | ".join("---:" if column in _NUMERIC else "---" for column in _COLUMNS) + " |"]
    for run in runs:
        config, evaluation = run.config, run.evaluation
        evaluated = (f"{run.evaluation_file}: {evaluation['split']}, {evaluation['checkpoint']} "
                     f"(iteration {evaluation['checkpoint_iteration']})")
        options, data = config.algorithm.options.to_dict(), config.data.options.to_dict()
        algorithm = f"{config.algorithm.name}{', first-order' if options.get('first_order') else ''}"
        cells = (run.name, algorithm, config.data.name, data.get("ways"), data.get("shots"),
                 evaluation["summary"], evaluated, _duration(run.train_s), f"{run.tasks_per_s:.0f}", run.iterations)
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def _chosen_metric(runs: Sequence[Run], metric: str | None) -> str:
    """``metric``, or the first run's first validation figure; every run must have logged it."""
    if not runs:
        raise ValueError("no runs to compare; pass at least one run directory")
    if metric is None:
        logged = runs[0].val_metrics()
        if not logged:
            raise RunDirError(f"run {runs[0].path}: {METRICS_FILE} holds no validation figure (val/...); "
                              "train with validation tasks, or leave the run out")
        metric = logged[0]
    for run in runs:
        if metric not in run.val_metrics():
            raise RunDirError(f"run {run.path}: {METRICS_FILE} holds no {metric!r} (its validation figures: "
                              f"{run.val_metrics()}); compare by one of those (--metric)")
    return metric


def plot_runs(runs: Sequence[Run], out: str | Path, metric: str | None = None, clock: str = "wall",
              reference: Mapping[int, float] | None = None, reference_label: str = "reference") -> Figure:
    """Draw the runs' curves and write the chart to ``out`` as a PNG (rendered by Agg, without pyplot).

    Args:
        runs: the runs, one colour each.
        out: the PNG file to write (its folder is created).
        metric: validation figure to plot, e.g. ``"val/accuracy"`` (default: the first run's).
        clock: the time axis: ``"wall"`` training time, or ``"cpu"`` training CPU time (for runs
            that shared a machine under CPU-time budgets).
        reference: published values of ``metric`` by iteration, drawn as points on the by-iteration panel.
        reference_label: their legend entry.

    Returns:
        The figure: validation ``metric`` against iteration (shaded: 95% interval) and against
        training time in minutes, and the training loss against iteration.

    Raises:
        RunDirError: a run did not log ``metric``.
    """
    # matplotlib takes about half a second to import: only charts need it, not the rest of the CLI
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metric = _chosen_metric(runs, metric)
    if clock not in ("wall", "cpu"):
        raise ValueError(f"clock must be 'wall' or 'cpu', got {clock!r}")
    time_key = "time/train_cpu_s" if clock == "cpu" else "time/train_s"
    figure = Figure(figsize=(15, 4.5), layout="constrained")
    FigureCanvasAgg(figure)  # the Agg canvas renders it, whatever matplotlib's default backend is
    by_iteration, by_time, by_loss = figure.subplots(1, 3)
    for run in runs:
        val = [r for r in run.records if r.get(metric) is not None]
        iterations = [r["iteration"] for r in val]
        means = [r[metric] for r in val]
        half_widths = [math.nan if r.get(f"{metric}_ci95") is None else r[f"{metric}_ci95"] for r in val]
        (line,) = by_iteration.plot(iterations, means, marker=".", label=run.name)
        colour = line.get_color()
        by_iteration.fill_between(iterations, [m - h for m, h in zip(means, half_widths)],
                                  [m + h for m, h in zip(means, half_widths)], color=colour, alpha=0.2, linewidth=0)
        timed = [r for r in val if r.get(time_key) is not None]
        by_time.plot([r[time_key] / 60 for r in timed], [r[metric] for r in timed], marker=".", color=colour)
        losses = [r for r in run.records if r.get("train/loss") is not None]
        by_loss.plot([r["iteration"] for r in losses], [r["train/loss"] for r in losses], color=colour)
    if reference:
        by_iteration.plot(list(reference), list(reference.values()), "k*", markersize=10, label=reference_label)
    by_iteration.set(xlabel="iteration", ylabel=metric, title=f"{metric} (95% interval) by iteration")
    label = "training CPU time" if clock == "cpu" else "training time"
    by_time.set(xlabel=f"{label} (min)", ylabel=metric, title=f"{metric} by {label}")
    by_loss.set(xlabel="iteration", ylabel="train/loss", title="training loss")
    by_iteration.legend(fontsize="small")
    for axes in (by_iteration, by_time, by_loss):
        axes.grid(alpha=0.3)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, format="png", dpi=100)
    return figure
