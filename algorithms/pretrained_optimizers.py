"""Pretrained learned optimizers shipped with the package: the file format, the folder, reading and writing.

A pretrained optimizer is one ``NAME.pt`` file in ``metaopt/algorithms/pretrained/`` (package data),
loaded by name and offline: ``LearnedOptimizer(params, pretrained="l2l-mnist")`` or
``LSTMOptimizerRule.pretrained("l2l-mnist")`` (:mod:`metaopt.algorithms.lstm_optimizer`). The
file is a tensors-only torch file (read with ``torch.load(weights_only=True)``: no code runs) holding
one dict, format version 1:

=============  ==============================================================================
entry          content
=============  ==============================================================================
``format``     ``"metaopt-pretrained-optimizer"``
``version``    ``1``
``rule``       the rule's class name, ``"LSTMOptimizerRule"``
``settings``   the rule's constructor arguments (``preprocessing``, ``p``, ``output_scale``,
               ``hidden``, ``layers``)
``weights``    the rule's ``state_dict()`` (CPU tensors)
``provenance`` where it comes from: ``preset`` (or ``None``), ``iterations`` (meta-updates of the
               checkpoint), ``best_val_loss`` and ``best`` (the trainer's best validation record),
               ``metaopt_version``, ``torch_version``, ``checkpoint`` (the file it was exported
               from) and ``config`` (the run's config)
=============  ==============================================================================

``scripts/export_pretrained.py RUN_DIR NAME`` writes such a file from a trained ``l2l`` run
(:func:`metaopt.algorithms.lstm_optimizer.export_pretrained`). A name is looked up in
:func:`pretrained_folder`; anything that looks like a path (a :class:`~pathlib.Path`, or a string
with a slash or ending in ``.pt``) is read as that file.

Example:
    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> path = Path(tempfile.mkdtemp()) / "toy.pt"
    >>> write_pretrained(path, "LSTMOptimizerRule", {"hidden": 4}, {"w": torch.zeros(2)}, {"preset": None})
    >>> read_pretrained(path).settings
    {'hidden': 4}
    >>> read_pretrained("no-such-optimizer")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
        ...
    ValueError: no pretrained optimizer named 'no-such-optimizer'; available: ...
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from metaopt.training.checkpoint import CheckpointError, save_atomic

__all__ = ["FORMAT", "VERSION", "PretrainedFile", "available_pretrained", "check_name", "pretrained_folder",
           "read_pretrained", "resolve_pretrained", "write_pretrained"]

FORMAT = "metaopt-pretrained-optimizer"
VERSION = 1
#: The folder of the shipped files (package data); :func:`pretrained_folder` reads it at every call.
FOLDER = Path(__file__).resolve().parent / "pretrained"
_ENTRIES = ("rule", "settings", "weights", "provenance")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_EXPORT = "python scripts/export_pretrained.py RUN_DIR NAME"


@dataclass(frozen=True)
class PretrainedFile:
    """The content of a pretrained optimizer file (see the module docs for each entry)."""

    path: Path
    rule: str
    settings: dict[str, Any]
    weights: dict[str, torch.Tensor]
    provenance: dict[str, Any]


def pretrained_folder() -> Path:
    """Where names are looked up: the ``pretrained`` folder of the installed ``metaopt.algorithms``."""
    return FOLDER


def available_pretrained() -> list[str]:
    """Names of the pretrained optimizers shipped (the ``.pt`` files of :func:`pretrained_folder`), sorted."""
    folder = pretrained_folder()
    return sorted(p.stem for p in folder.glob("*.pt")) if folder.is_dir() else []


def check_name(name: str) -> str:
    """``name``, checked to be usable as a file name in the folder (letters, digits, ``.``, ``_``, ``-``)."""
    if not _NAME.fullmatch(name) or name.endswith(".pt"):
        raise ValueError(f"a pretrained optimizer's name is letters, digits, '.', '_' and '-' (no folder, no .pt), "
                         f"got {name!r}; e.g. 'l2l-mnist'")
    return name


def resolve_pretrained(name_or_path: str | Path) -> Path:
    """The file of a shipped name, or ``name_or_path`` itself when it is a path.

    Raises:
        ValueError: an unknown name, listing the available ones.
    """
    if isinstance(name_or_path, Path) or "/" in name_or_path or os.sep in name_or_path \
            or name_or_path.endswith(".pt"):
        return Path(name_or_path)
    path = pretrained_folder() / f"{check_name(name_or_path)}.pt"
    if not path.is_file():
        names = available_pretrained()
        listed = ", ".join(repr(n) for n in names) if names else f"none (no .pt file in {pretrained_folder()})"
        raise ValueError(f"no pretrained optimizer named {name_or_path!r}; available: {listed}. Pass one of them, "
                         f"or the path of a file written by {_EXPORT}")
    return path


def read_pretrained(name_or_path: str | Path) -> PretrainedFile:
    """Read a pretrained optimizer file onto the CPU, by shipped name or by path.

    Raises:
        ValueError: an unknown name (the message lists the available ones).
        CheckpointError: naming the file: missing, corrupt or truncated, not a pretrained optimizer
            file, of a newer format version, or lacking an entry.
    """
    path = resolve_pretrained(name_or_path)
    if not path.is_file():
        raise CheckpointError(f"pretrained optimizer file {path} does not exist; check the path, or pass a shipped "
                              f"name ({', '.join(map(repr, available_pretrained())) or 'none shipped'})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load fails with many types (zip, pickle, EOF, runtime errors)
        reason = str(err).strip().split(". ")[0].splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"pretrained optimizer file {path} cannot be read: it is corrupt, truncated or not a "
                              f"tensors-only torch file ({reason}); export it again: {_EXPORT}") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a pretrained optimizer file (no 'format': {FORMAT!r} entry); a run's "
                              "best.pt or last.pt loads with checkpoint= (LSTMOptimizerRule.from_checkpoint), or "
                              f"export it: {_EXPORT}")
    if state.get("version") != VERSION:
        raise CheckpointError(f"pretrained optimizer file {path} has format version {state.get('version')!r}, this "
                              f"metaopt reads version {VERSION}; load it with the metaopt release that wrote it")
    missing = [key for key in _ENTRIES if key not in state]
    if missing:
        raise CheckpointError(f"pretrained optimizer file {path} lacks the entries {missing}; export it again: "
                              f"{_EXPORT}")
    return PretrainedFile(path, state["rule"], dict(state["settings"]), dict(state["weights"]),
                          dict(state["provenance"]))


def write_pretrained(path: str | Path, rule: str, settings: dict[str, Any], weights: dict[str, torch.Tensor],
                     provenance: dict[str, Any]) -> None:
    """Write a pretrained optimizer file atomically (a reader sees the old file or the new one, never a torn one).

    Args:
        path: the file to write (its folder is created).
        rule: the rule's class name.
        settings: the rule's constructor arguments.
        weights: the rule's ``state_dict()``; stored on the CPU.
        provenance: where the weights come from (see the module docs): JSON values only.

    Raises:
        ValueError: a setting or provenance value is not a JSON value (it could not be read back
            with ``weights_only=True``).
    """
    path = Path(path)
    try:  # plain dicts, lists, strings and numbers: what a weights-only load accepts
        settings, provenance = json.loads(json.dumps([dict(settings), dict(provenance)]))
    except TypeError as err:
        raise ValueError(f"the settings and provenance of a pretrained optimizer must be JSON values ({err}); "
                         "convert the offending value, e.g. str(torch.__version__)") from err
    save_atomic(path, {"format": FORMAT, "version": VERSION, "rule": rule, "settings": settings,
                       "weights": {k: v.detach().cpu().clone() for k, v in weights.items()}, "provenance": provenance})
