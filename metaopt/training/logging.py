"""Run logging: TensorBoard scalars and one ``metrics.jsonl`` line per logged iteration.

Every logged iteration is one flat record ``{"iteration": i, "train/loss": ..., "val/mse": ...}``:
its keys are the TensorBoard tags, and the same record is appended to ``metrics.jsonl`` in the
run directory (non-finite values are written as ``null``). Keys under ``time/`` hold
wall-clock figures, the only ones that differ between two runs of the same config.

On resume, :class:`RunLogger` drops the records and TensorBoard events written after the
checkpoint (``purge_step``), so a resumed run's logs equal an uninterrupted run's.

Example:
    >>> import tempfile
    >>> run = tempfile.mkdtemp()
    >>> with RunLogger(run) as log:
    ...     log.log(1, {"train/loss": 0.5})
    ...     log.log(2, {"train/loss": float("nan")})
    >>> read_metrics(f"{run}/metrics.jsonl")
    [{'iteration': 1, 'train/loss': 0.5}, {'iteration': 2, 'train/loss': None}]
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from metaopt.training.checkpoint import write_text

__all__ = ["METRICS_FILE", "RunLogger", "note", "read_metrics", "truncate_metrics"]

METRICS_FILE = "metrics.jsonl"


def note(message: str) -> None:
    """Tell the user what a long step is doing (``decoding Omniglot...``): a line on stderr, above a progress bar."""
    tqdm.write(message, file=sys.stderr)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file; a torn last line (a killed writer) is ignored."""
    path = Path(path)
    if not path.exists():
        return []
    text = path.read_text()
    lines = text.split("\n")[:-1]  # the piece after the last newline is empty or torn
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {number} is not valid JSON ({err}); the file was edited or "
                             "damaged: delete the line or the run") from err
    return records


def truncate_metrics(path: str | Path, iteration: int) -> None:
    """Keep only the records of iterations ``<= iteration`` (atomically); used on resume."""
    kept = [r for r in read_metrics(path) if r["iteration"] <= iteration]
    write_text(path, "".join(json.dumps(r, allow_nan=False) + "\n" for r in kept))


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _hparam_value(value: Any) -> int | float | str | bool:
    return value if isinstance(value, (int, float, str, bool)) else str(value)


class RunLogger:
    """Writes logged iterations to TensorBoard and ``metrics.jsonl`` (progress: :mod:`metaopt.training.progress`).

    Args:
        run_dir: folder for the event files and ``metrics.jsonl``; ``None`` writes no files.
        start: iterations already done (a resumed run); later records and events are dropped.
    """

    def __init__(self, run_dir: str | Path | None, start: int = 0) -> None:
        self._writer: SummaryWriter | None = None
        self._file = None
        if run_dir is not None:
            path = Path(run_dir) / METRICS_FILE
            truncate_metrics(path, start)
            self._file = open(path, "a")  # noqa: SIM115  (closed in close())
            self._writer = SummaryWriter(str(run_dir), purge_step=start + 1)

    def log(self, iteration: int, metrics: Mapping[str, float]) -> None:
        """Record ``metrics`` (tag -> value) for ``iteration``."""
        if self._writer is not None:
            for tag, value in metrics.items():
                self._writer.add_scalar(tag, value, iteration)
        if self._file is not None:
            record = {"iteration": iteration, **{k: _finite_or_none(v) for k, v in metrics.items()}}
            self._file.write(json.dumps(record, allow_nan=False) + "\n")
            self._file.flush()

    def log_hparams(self, hparams: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        """Record the run's hyper-parameters and final figures for TensorBoard's HParams tab."""
        if self._writer is not None:
            self._writer.add_hparams({k: _hparam_value(v) for k, v in hparams.items()},
                                     {f"hparam/{k}": v for k, v in metrics.items()}, run_name=".")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._file is not None:
            self._file.close()

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
