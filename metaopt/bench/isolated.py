"""Run :func:`metaopt.bench.measure.measure` in a fresh Python process, so that nothing else has lived in it.

A process that has done other work keeps memory in its allocator that hides part of the growth
of the resident set; the peak RSS of a meta-iteration is its own only in a new process. The
protocol with that subprocess (``python -c _CHILD``):

* the parent writes a JSON spec on the child's standard input: the method, the workload's fields,
  the repeats, the intra-op threads and the path of a file for the meta-gradients;
* the child (:func:`_measure_child`) runs :func:`metaopt.bench.measure.measure`, saves the
  meta-gradients to that path with :func:`torch.save` and prints the measurement as JSON, its
  last line of standard output;
* the parent rebuilds the :class:`metaopt.bench.measure.Measurement` from that line and loads
  the meta-gradients; a failing child is a :class:`RuntimeError` ending with its error output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict

import torch

from metaopt.bench.measure import Measurement, measure
from metaopt.bench.workloads import Workload

__all__ = ["measure_isolated"]

_CHILD = "import sys; from metaopt.bench.isolated import _measure_child; _measure_child(sys.stdin.read())"


def _measure_child(spec: str) -> None:
    """Entry point of the subprocess of :func:`measure_isolated`."""
    options = json.loads(spec)
    if options["threads"]:
        torch.set_num_threads(options["threads"])
    measurement, grads = measure(options["method"], Workload(**options["workload"]), options["repeats"])
    torch.save(grads, options["grads"])
    print(json.dumps(asdict(measurement)))


def measure_isolated(method: str, workload: Workload, repeats: int = 3,
                     threads: int | None = None) -> tuple[Measurement, list[torch.Tensor]]:
    """:func:`measure` in a fresh Python process (so that its peak RSS is the meta-iteration's own).

    Args:
        threads: intra-op threads of the subprocess (default: torch's default).

    Raises:
        RuntimeError: the subprocess failed; the message ends with its error output.
    """
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "grads.pt")
        spec = {"method": method, "workload": asdict(workload), "repeats": repeats, "threads": threads,
                "grads": path}
        done = subprocess.run([sys.executable, "-c", _CHILD], input=json.dumps(spec), capture_output=True,
                              text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"measuring {method!r} on {workload} failed in its subprocess:\n{done.stderr[-4000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        grads = torch.load(path)
    return Measurement(**result), grads
