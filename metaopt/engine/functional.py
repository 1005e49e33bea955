"""Parameters as dicts of tensors, and the gradients of a loss with respect to such a dict.

Models are never mutated by adaptation: adapted parameters live in a plain ``dict`` and the model
runs on them through :func:`torch.func.functional_call`.

Example:
    >>> import torch
    >>> model = torch.nn.Linear(3, 1)
    >>> params = named_params(model)
    >>> loss = model_call(model, params, torch.ones(2, 3)).sum()
    >>> sorted(grads(loss, params, create_graph=False))
    ['bias', 'weight']
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["Params", "grads", "map_tensors", "model_call", "named_params", "select"]

Params = dict[str, torch.Tensor]


def named_params(model: nn.Module) -> Params:
    """The model's trainable parameters as an ordered dict (the tensors themselves, not copies)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def model_call(model: nn.Module, params: Params, *args: object) -> torch.Tensor:
    """Run ``model`` with ``params`` in place of its own parameters (buffers stay the model's)."""
    return torch.func.functional_call(model, params, args, strict=False, tie_weights=True)


def select(params: Params, names: Iterable[str]) -> Params:
    """The entries of ``params`` named in ``names``, in ``params``' order."""
    keep = set(names)
    return {k: v for k, v in params.items() if k in keep}


def grads(loss: torch.Tensor, params: Params, create_graph: bool, retain_graph: bool | None = None) -> Params:
    """Gradients of a scalar ``loss`` with respect to every tensor in ``params``.

    ``create_graph=True`` keeps the graph of the gradient computation (second-order
    meta-gradients); ``False`` treats the gradients as constants (first-order). ``retain_graph``
    keeps the graph of ``loss`` for a later backward pass through it (default: ``create_graph``).

    Raises:
        ValueError: a parameter received no gradient, naming it and the fix.
    """
    values = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph, retain_graph=retain_graph,
                                 allow_unused=True)
    for name, g in zip(params, values):
        if g is None:
            raise ValueError(f"parameter {name!r} received no gradient from the inner loss; leave it out of the "
                             "adapted set (adapt=...) or make the loss depend on it")
    return dict(zip(params, values))


def map_tensors(fn: Callable[[torch.Tensor], torch.Tensor], tree: Any) -> Any:
    """``tree`` (tensors in lists, tuples and dicts, e.g. a rule's state) with ``fn`` applied to every tensor."""
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if isinstance(tree, (list, tuple)):
        return type(tree)(map_tensors(fn, x) for x in tree)
    if isinstance(tree, dict):
        return {k: map_tensors(fn, v) for k, v in tree.items()}
    return tree
