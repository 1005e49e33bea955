"""Training time of a run: the meta-updates alone (wall and CPU), total wall time, and throughput.

The trainer counts the time of its meta-updates (sampling the problems, the estimate, the step)
as *training time*; periodic validation, checkpoints and logging are left out, so runs that
evaluate more or less often get the same training. Training CPU time counts every thread of
the process, which runs sharing a machine cannot take from each other (equal-budget
comparisons). A resumed run carries the times of its earlier sessions on.

Example:
    >>> clock = Clock()
    >>> with clock.measure(tasks=8):
    ...     pass
    >>> sorted(clock.read()), "time/tasks_per_s" in clock.throughput()
    (['total_s', 'train_cpu_s', 'train_s'], True)
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

__all__ = ["Clock"]


class Clock:
    """Training time (meta-updates only, wall and CPU) and total wall time of a run, and its throughput.

    Args:
        train_s: training wall time already spent (a resumed run).
        total_s: total wall time already spent (a resumed run).
        train_cpu_s: CPU time of this process (all its threads) spent in meta-updates (a resumed run).
    """

    def __init__(self, train_s: float = 0.0, total_s: float = 0.0, train_cpu_s: float = 0.0) -> None:
        self.train_s = train_s
        self.train_cpu_s = train_cpu_s
        self._started = time.perf_counter() - total_s
        self._seconds = 0.0  # meta-update time and tasks since the last throughput reading
        self._tasks = 0

    @property
    def total_s(self) -> float:
        return time.perf_counter() - self._started

    @contextlib.contextmanager
    def measure(self, tasks: int) -> Iterator[None]:
        """Count the time of the block, a meta-update on ``tasks`` tasks, as training time."""
        tic, cpu_tic = time.perf_counter(), time.process_time()
        yield
        seconds = time.perf_counter() - tic
        self.train_s += seconds
        self.train_cpu_s += time.process_time() - cpu_tic
        self._seconds += seconds
        self._tasks += tasks

    def throughput(self) -> dict[str, float]:
        """Tasks per second of the meta-updates since the last call."""
        figures = {"time/tasks_per_s": self._tasks / self._seconds if self._seconds else 0.0}
        self._seconds, self._tasks = 0.0, 0
        return figures

    def read(self) -> dict[str, float]:
        """Training wall time, training CPU time and total wall time so far, in seconds."""
        return {"train_s": self.train_s, "total_s": self.total_s, "train_cpu_s": self.train_cpu_s}

