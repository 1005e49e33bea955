"""Settings for every test and doctest: a fixed global seed, and one intra-op thread.

The tensors in these tests are tiny, so extra threads only add synchronisation; on shared
cores an OpenMP thread that loses its core makes every parallel op wait for it (the sinusoid
learning test ran 30x slower with two threads next to one busy process).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _seeded_single_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)
