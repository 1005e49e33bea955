"""``torchrun`` for ``metaopt train --nproc``: torch's launcher, which exits quietly when a signal stops the run.

On SIGINT or SIGTERM, ``torch.distributed.run`` forwards the signal to its processes, waits for
them and then raises ``SignalException`` out of its ``main``, which prints a traceback of torch's
internals under the ranks' own report (``interrupted at iteration N; resume with ...``). Here that
exception is the exit status ``128 + signal``, as a signal-stopped command's is, and nothing more
is printed; a rank that fails still gets torchrun's report naming it.

Example:
    >>> from torch.distributed.elastic.multiprocessing.api import SignalException
    >>> def stopped(argv):
    ...     raise SignalException("Process 1 got signal: 2", sigval=signal.SIGINT)
    >>> run(["--standalone"], launcher=stopped)
    130
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable, Sequence

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.run import main as torch_main

__all__ = ["run"]


def run(argv: Sequence[str], launcher: Callable[[list[str]], object] = torch_main) -> int:
    """Run ``launcher`` (torchrun's ``main``) on ``argv``: its exit status, ``128 + signal`` if a signal stopped it."""
    try:
        launcher(list(argv))
    except SignalException as stop:
        return 128 + signal.Signals(stop.sigval).value
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
