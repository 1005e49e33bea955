"""What a running meta-training shows the user: a bar on a terminal, plain lines elsewhere, and a log file.

On a terminal (standard error is one) a tqdm bar moves with every meta-update. When standard
output is not a terminal (``metaopt train ... > log``), a plain line is printed there every
``interval`` seconds and at the end: iteration, loss, tasks per second, elapsed training time and
the time left. Every plain line also goes to ``train.log`` in the run directory, with the
messages of the run (evaluations, interruptions). The time left counts training time, which
validation and checkpoints are not part of: with a time budget it is the budget left (or the
iterations left at the current speed, if less).

Example:
    >>> import io
    >>> out = io.StringIO()
    >>> with Progress(total=4, tasks=8, stream=out, interval=0.0, bar=False) as progress:
    ...     progress.update(2, train_s=1.0, figures={"loss": 0.5})
    >>> print(out.getvalue(), end="")
    iteration 2/4 (50.0%), loss 0.5, 16 tasks/s, training time 0:00:01, left 0:00:01
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import IO

from tqdm.auto import tqdm

__all__ = ["LOG_FILE", "Progress", "duration"]

LOG_FILE = "train.log"


def duration(seconds: float) -> str:
    """``h:mm:ss``."""
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


class Progress:
    """The progress of one session of a run.

    Args:
        total: iterations of the whole run.
        tasks: tasks (problems) per meta-update.
        start: iterations already done (a resumed run).
        train_s: training time already spent (a resumed run).
        budget_s: the run's time budget in seconds of training time (``None``: none).
        log: the log file to append the plain lines and messages to (``None``: none).
        interval: seconds between two plain lines.
        stream: where plain lines go (default: standard output when it is not a terminal, else nowhere).
        bar: show a tqdm bar (default: when standard error is a terminal).
        quiet: show nothing and write no plain lines (the ranks other than 0 of a distributed run).
    """

    def __init__(self, total: int, tasks: int = 1, start: int = 0, train_s: float = 0.0, budget_s: float | None = None,
                 log: str | Path | None = None, interval: float = 30.0, stream: IO[str] | None = None,
                 bar: bool | None = None, quiet: bool = False) -> None:
        self.total, self.tasks, self.start, self.budget_s, self.interval = total, tasks, start, budget_s, interval
        self._start_train_s = train_s
        default = None if sys.stdout.isatty() else sys.stdout
        self._stream = None if quiet else stream if stream is not None else default
        self._log = None if log is None else open(log, "a")  # noqa: SIM115  (closed in close())
        self._last_line, self._line_iteration = -float("inf"), None
        self._iteration, self._train_s, self._figures = start, train_s, {}
        show = not quiet and (sys.stderr.isatty() if bar is None else bar)
        self._bar = tqdm(total=None if budget_s else total, initial=start, desc="meta-train", unit="it",
                         dynamic_ncols=True, disable=not show)

    def left_s(self) -> float | None:
        """Training time left: the iterations left at this session's speed, or the budget left if less."""
        done, spent = self._iteration - self.start, self._train_s - self._start_train_s
        by_iterations = (self.total - self._iteration) * spent / done if done and spent > 0 else None
        by_budget = None if self.budget_s is None else max(0.0, self.budget_s - self._train_s)
        known = [s for s in (by_iterations, by_budget) if s is not None]
        return min(known) if known else None

    def update(self, iteration: int, train_s: float, figures: Mapping[str, float]) -> None:
        """The run reached ``iteration`` after ``train_s`` seconds of training time; ``figures`` go beside it."""
        self._iteration, self._train_s, self._figures = iteration, train_s, dict(figures)
        shown = {k: f"{v:.4g}" for k, v in figures.items()}
        if self.budget_s is not None:
            shown["left"] = duration(self.left_s() or 0.0)
        self._bar.set_postfix(shown, refresh=False)
        self._bar.update(iteration - self._bar.n)
        if time.monotonic() - self._last_line >= self.interval:
            self._plain_line()

    def _plain_line(self) -> None:
        self._last_line, self._line_iteration = time.monotonic(), self._iteration
        done, spent = self._iteration - self.start, self._train_s - self._start_train_s
        parts = [f"iteration {self._iteration}/{self.total} ({100 * self._iteration / self.total:.1f}%)"]
        parts += [f"{k} {v:.4g}" for k, v in self._figures.items()]
        if done and spent > 0:
            parts.append(f"{done * self.tasks / spent:.3g} tasks/s")
        left = self.left_s()
        parts += [f"training time {duration(self._train_s)}", f"left {'?' if left is None else duration(left)}"
                  + (" (time budget)" if self.budget_s is not None else "")]
        self._emit(", ".join(parts), to_bar=False)

    def message(self, text: str) -> None:
        """A line about the run (``evaluating ...``): above the bar, in the plain output and the log."""
        self._emit(text, to_bar=True)

    def _emit(self, text: str, to_bar: bool) -> None:
        if to_bar and not self._bar.disable:
            self._bar.write(text, file=sys.stderr)
        for out in (self._stream, self._log):
            if out is not None:
                out.write(text + "\n")
                out.flush()

    def close(self) -> None:
        if self._iteration > self.start and self._line_iteration != self._iteration:
            self._plain_line()  # the last state, whatever the interval
        self._bar.close()
        if self._log is not None:
            self._log.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
