"""metaopt.training.torchrun: torch's launcher whose signal stop is an exit status, and whose failures stay failures."""

from __future__ import annotations

import signal

import pytest
from torch.distributed.elastic.multiprocessing.api import SignalException

from metaopt.training.torchrun import run


def test_the_arguments_reach_the_launcher_and_success_is_status_0() -> None:
    seen = []
    assert run(("--standalone", "-m", "metaopt"), launcher=seen.append) == 0
    assert seen == [["--standalone", "-m", "metaopt"]]


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stop_is_128_plus_the_signal(signum: signal.Signals, status: int) -> None:
    def stopped(argv: list[str]) -> None:
        raise SignalException(f"Process 1 got signal: {int(signum)}", sigval=signum)

    assert run([], launcher=stopped) == status


def test_any_other_failure_propagates_to_torchruns_report() -> None:
    def failed(argv: list[str]) -> None:
        raise RuntimeError("rank 1 failed")

    with pytest.raises(RuntimeError, match="rank 1 failed"):
        run([], launcher=failed)
