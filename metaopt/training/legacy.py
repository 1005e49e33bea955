"""Run folders written by metaopt 0.1 (before the one-engine rebuild): read them as today's runs.

A 0.1 few-shot run has a flat ``config.json`` (one ``ExperimentConfig`` of 49 fields, every
algorithm's options side by side) and version-1 checkpoints. :func:`read_run_config` converts the
flat config to a :class:`metaopt.training.config.RunConfig`, keeping exactly the fields that
0.1's builder of the run's algorithm read (the others had no effect), and :func:`convert_state`
maps a version-1 checkpoint onto today's learner (parameters that moved under a part, buffers that
became Python numbers, the estimator state it did not have). Such runs evaluate, compare and
resume; resuming rewrites ``config.json`` in today's format.

Runs of 0.1's ``LearnedOptimizerTrainer`` recorded too little of their problems to be rebuilt;
reading one raises an error that says what still works and how to redo it.

Example:
    >>> config = convert_config({"algorithm": "maml", "dataset": "sinusoid", "shots": 5, "inner_lr": 0.01,
    ...                          "iterations": 100})
    >>> config.algorithm.name, config.algorithm.options.inner_lr, config.data.options.shots, config.model.name
    ('maml', 0.01, 5, 'mlp')
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from metaopt.options import ConfigError
from metaopt.training.config import RunConfig, TrainerConfig

__all__ = ["LEGACY_DEFAULTS", "convert_config", "convert_state", "read_run_config"]

#: The defaults of 0.1's flat ExperimentConfig (fields missing from an old config.json took these).
LEGACY_DEFAULTS: dict[str, Any] = {
    "algorithm": "maml", "dataset": "sinusoid", "ways": None, "shots": 10, "query": 10, "eval_query": None,
    "protocol": "maml", "model": "mlp", "hidden": [40, 40], "filters": 64, "strided": False, "inner_lr": 0.01,
    "inner_steps": 1, "eval_inner_steps": None, "first_order": False, "checkpoint_steps": False, "adapt": "all",
    "strategy": "auto", "bn_policy": "batch", "msl_epochs": None, "second_order_from_epoch": None,
    "per_step_bn_stats": False, "per_step_bn_weights": False, "per_step_lr": False, "metasgd_init": "uniform",
    "mtnet_mask": "unit", "arml_vertices": 4, "arml_sigma": 8.0, "arml_loss_weight": 0.01,
    "metalstm_bn_momentum": 0.9, "meta_batch": 25, "seed": 0, "device": "auto", "data_root": None,
}
_ENGINE = ("eval_inner_steps", "strategy", "bn_policy", "checkpoint_steps")
_SWITCHES = ("msl_epochs", "second_order_from_epoch", "per_step_bn_stats", "per_step_bn_weights", "per_step_lr")
#: What 0.1's builder of each algorithm read: today's option name -> the flat field.
_READ: dict[str, dict[str, str]] = {
    "maml": {k: k for k in ("inner_lr", "inner_steps", "first_order", "adapt", *_ENGINE)},
    "tnet": {k: k for k in ("inner_lr", "inner_steps", "first_order", *_ENGINE)},
    "metasgd": {k: k for k in ("inner_steps", "first_order", "adapt", *_ENGINE)},
    "arml": {**{k: k for k in ("inner_lr", "inner_steps", "first_order", "adapt", *_ENGINE)},
             "vertices": "arml_vertices", "sigma": "arml_sigma", "loss_weight": "arml_loss_weight"},
    "metalstm": {**{k: k for k in ("inner_steps", "eval_inner_steps", "strategy", "bn_policy", "adapt")},
                 "bn_momentum": "metalstm_bn_momentum"},
}
_READ["mamlpp"] = {**_READ["maml"], **{k: k for k in _SWITCHES}}
_READ["mtnet"] = {**_READ["tnet"], "mask": "mtnet_mask"}
_DATA = {"sinusoid": ("shots", "query", "eval_query", "meta_batch"),
         "omniglot": ("ways", "shots", "query", "eval_query", "meta_batch", "protocol", "data_root"),
         "miniimagenet": ("ways", "shots", "query", "eval_query", "meta_batch", "data_root")}
_MODEL = {"mlp": ("hidden",), "conv4": ("filters", "strided")}
_L2L_RUN = ("{path} was written by metaopt 0.1's LearnedOptimizerTrainer, which did not record its problems, so the "
            "run cannot be resumed or evaluated by `metaopt train` / `metaopt eval`. Its rule still works as an "
            "optimizer: LearnedOptimizer(params, checkpoint='{folder}/best.pt'). To score a learned optimizer "
            "against tuned baselines, train it anew: metaopt train --preset l2l-quadratics (or l2l-mnist)")


def _algorithm(flat: Mapping[str, Any]) -> dict[str, Any]:
    name = flat["algorithm"]
    if name not in _READ:
        raise ConfigError(f"algorithm {name!r} of a metaopt 0.1 config is unknown; it cannot be converted")
    if name == "maml" and any(flat[k] != LEGACY_DEFAULTS[k] for k in _SWITCHES):
        name = "mamlpp"  # MAML with MAML++ switches: today they are options of mamlpp only
    if name not in ("maml", "mamlpp") and any(flat[k] is not None for k in _SWITCHES[:2]):
        raise ConfigError(f"this metaopt 0.1 run combined {name} with MAML++'s msl_epochs or "
                          "second_order_from_epoch, which only mamlpp takes now; it cannot be converted")
    section = {"name": name, **{option: flat[field] for option, field in _READ[name].items()}}
    if name == "metasgd":
        section["init"] = flat["metasgd_init"]
        if section["init"] == "constant":
            section["init_lr"] = flat["inner_lr"]
    if section.get("first_order"):
        section.pop("checkpoint_steps", None)  # recomputing first-order steps did nothing
    return section


def convert_config(raw: Mapping[str, Any]) -> RunConfig:
    """The :class:`RunConfig` of a metaopt 0.1 flat config (fields it lacks take 0.1's defaults)."""
    trainer_fields = set(TrainerConfig.field_names())
    known = set(LEGACY_DEFAULTS) | trainer_fields
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"a metaopt 0.1 config has no fields {unknown}; it cannot be converted")
    flat = {**LEGACY_DEFAULTS, **raw}
    if flat["dataset"] not in _DATA or flat["model"] not in _MODEL:
        raise ConfigError(f"dataset {flat['dataset']!r} or model {flat['model']!r} of a metaopt 0.1 config is unknown")
    return RunConfig.from_dict({
        "seed": flat["seed"], "device": flat["device"],
        "trainer": {k: v for k, v in raw.items() if k in trainer_fields},
        "data": {"name": flat["dataset"], **{k: flat[k] for k in _DATA[flat["dataset"]]}},
        "model": {"name": flat["model"], **{k: flat[k] for k in _MODEL[flat["model"]]}},
        "algorithm": _algorithm(flat),
    })


def read_run_config(path: str | Path) -> RunConfig:
    """The run config in ``path`` (a ``config.json``), today's format or metaopt 0.1's; errors name the file."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"cannot read config file {path}: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a JSON object, got {type(raw).__name__}")
    if "rule_hparams" in raw:
        raise ConfigError(_L2L_RUN.format(path=path, folder=path.parent))
    try:
        return convert_config(raw) if isinstance(raw.get("algorithm"), str) else RunConfig.from_dict(raw)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def convert_state(state: dict[str, Any], learner: nn.Module) -> dict[str, Any]:
    """A trainer checkpoint as today's trainer reads it (version-1 checkpoints of 0.1 are mapped onto ``learner``).

    Parameters that moved under a part of the learner (ARML's gate under ``initialiser.``, a higher
    rule's hyper-parameters under ``rule.``) are renamed, fixed learning rates that were buffers
    (``rule.lr``) are dropped, and the stateless estimator of 0.1's few-shot runs is filled in.
    """
    if state.get("version", 2) >= 2:
        return state
    own = learner.state_dict()
    model = {}
    for key, value in state["model"].items():
        moved = next((f"{part}.{key}" for part in ("initialiser", "rule") if f"{part}.{key}" in own), None)
        if key in own or moved is not None:
            model[moved or key] = value
        elif key != "rule.lr":
            model[key] = value  # left for load_module_state to report
    algorithm = state["algorithm"]
    if algorithm == "MAML" and type(learner).__name__ == "MAMLPlusPlus":  # see _algorithm: switches moved to mamlpp
        algorithm = "MAMLPlusPlus"
    return {**state, "model": model, "algorithm": algorithm,
            "estimator": {"name": "Backprop", "settings": {}, "state": {}}}
