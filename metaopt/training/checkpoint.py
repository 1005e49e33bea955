"""Checkpoints: atomic writes, safe loads, and the random states that make a resumed run exact.

Files are written to a temporary file in the target's folder, flushed to disk with ``fsync``
and moved over the target with :func:`os.replace`, so a crash (even ``SIGKILL``) leaves either
the old file or the new one, never a torn one. Loading uses ``torch.load(weights_only=True)``
(no arbitrary code runs) and every failure is a :class:`CheckpointError` naming the file and
what is wrong with it.

Example:
    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> path = Path(tempfile.mkdtemp()) / "last.pt"
    >>> save_checkpoint(path, {"iteration": 3, "model": torch.nn.Linear(2, 1).state_dict()})
    >>> load_checkpoint(path, required=["iteration", "model"])["iteration"]
    3
    >>> load_checkpoint(path, required=["optimizer"])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
        ...
    metaopt.training.checkpoint.CheckpointError: checkpoint .../last.pt lacks the entries ['optimizer']; ...
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "READABLE_VERSIONS",
    "VERSION",
    "CheckpointError",
    "capture_rng_state",
    "load_checkpoint",
    "load_module_state",
    "remove_stale_temporaries",
    "restore_rng_state",
    "save_checkpoint",
    "write_json",
    "write_text",
]

FORMAT = "metaopt-checkpoint"
VERSION = 2
#: Versions :func:`load_checkpoint` reads: 1 was written before the one-engine rebuild (no estimator state);
#: :mod:`metaopt.training.legacy` converts its runs.
READABLE_VERSIONS = (1, 2)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or does not fit the run; the message names the file."""


def _atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` through ``write(file)`` so that readers see the old or the new content only."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if os.name == "posix":  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files that writes killed in ``folder`` left (``.name.<pid>.tmp`` of other processes).

    Returns the files removed. This process's own temporary files (a write under way) are kept.
    """
    removed = []
    for tmp in Path(folder).glob(".*.tmp"):
        pid = tmp.name.rsplit(".", 2)[-2]
        if pid.isdigit() and int(pid) != os.getpid():
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
                removed.append(tmp)
    return removed


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    _atomic_write(path, lambda f: f.write(text.encode()))


def _json_ready(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Mapping):
        return {k: _json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_ready(v) for v in obj]
    return obj


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically (results are never half-written; NaN becomes null)."""
    write_text(path, json.dumps(_json_ready(obj), indent=2, allow_nan=False, ensure_ascii=False) + "\n")


def save_atomic(path: str | Path, obj: Any) -> None:
    """``torch.save(obj, path)``, atomically: a reader (or a killed writer) sees the old file or the new one."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def save_checkpoint(path: str | Path, state: Mapping[str, Any]) -> None:
    """Atomically write ``state`` (tensors, numbers, strings, containers of them) to ``path``."""
    save_atomic(path, {"format": FORMAT, "version": VERSION, **state})


def load_checkpoint(path: str | Path, required: Iterable[str] = ()) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` onto the CPU.

    Args:
        path: the checkpoint file.
        required: entries the caller needs; a checkpoint lacking one is an error.

    Raises:
        CheckpointError: the file is missing, corrupt or truncated, not a metaopt checkpoint, of
            another format version, or lacks a required entry.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; check the path (a run keeps last.pt and, once "
                              "it has been evaluated, best.pt)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load fails with many types (zip, pickle, EOF, runtime errors)
        reason = str(err).strip().split(". ")[0].splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint {path} cannot be read: it is corrupt, truncated or not a tensors-only "
                              f"torch file ({reason}); use another checkpoint of the run (last.pt or best.pt) or "
                              "start a new run") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a metaopt checkpoint (no 'format': {FORMAT!r} entry); pass a "
                              "last.pt or best.pt written by metaopt")
    if state.get("version") not in READABLE_VERSIONS:
        raise CheckpointError(f"checkpoint {path} has format version {state.get('version')!r}, this metaopt reads "
                              f"versions {READABLE_VERSIONS}; load it with the metaopt release that wrote it")
    missing = [key for key in required if key not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks the entries {missing}; it was not written by this trainer "
                              "or is incomplete")
    return state


def load_module_state(module: nn.Module, state: Mapping[str, Any], path: str | Path) -> None:
    """Load ``state`` into ``module`` after checking that names and shapes match exactly.

    Raises:
        CheckpointError: naming ``path``, the missing and unexpected entries and the shape mismatches.
    """
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [f"{k} (checkpoint {tuple(state[k].shape)}, model {tuple(own[k].shape)})" for k in own
                  if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != own[k].shape]
    problems = [f"{what} {names}" for what, names in (("missing entries", missing), ("unexpected entries", unexpected),
                                                       ("shape mismatches", mismatched)) if names]
    if problems:
        raise CheckpointError(f"checkpoint {path} does not fit this {type(module).__name__}: {'; '.join(problems)}. "
                              "It was written for another model or config; use the config.json of its run")
    module.load_state_dict(state)


def capture_rng_state() -> dict[str, Any]:
    """The states of every global random generator: torch CPU and CUDA, numpy, Python ``random``."""
    np_state = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"bit_generator": np_state["bit_generator"],
                  "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "python": random.getstate(),
    }


def restore_rng_state(state: Mapping[str, Any], path: str | Path = "the checkpoint") -> None:
    """Set every global random generator to ``state`` (from :func:`capture_rng_state`).

    A state without CUDA generators (written where CUDA was not used) leaves them as they are.

    Raises:
        CheckpointError: naming ``path``, when a generator's state is missing or malformed.
    """
    missing = sorted({"torch", "numpy", "python"} - set(state))
    if missing:
        raise CheckpointError(f"{path}: the random states lack {missing} (an older or foreign layout), so the run "
                              "cannot resume exactly; start a new run, or evaluate the checkpoint with metaopt eval")
    torch.set_rng_state(state["torch"])
    cuda = list(state.get("cuda", []))
    if cuda and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            warnings.warn(f"the checkpoint holds the random states of {len(cuda)} CUDA devices but "
                          f"{torch.cuda.device_count()} are visible; CUDA random streams start afresh",
                          stacklevel=2)
    np_state = state["numpy"]
    np.random.set_state({"bit_generator": np_state["bit_generator"],
                         "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
                         "has_gauss": np_state["has_gauss"], "gauss": np_state["gauss"]})
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
