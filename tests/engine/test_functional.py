"""Parameters as dicts: selection, functional calls that leave the model untouched, gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from metaopt.engine.functional import grads, map_tensors, model_call, named_params, select


def linear() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(3, 2).double()


def test_named_params_are_the_trainable_tensors_themselves() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    model[0].bias.requires_grad_(False)
    params = named_params(model)
    assert list(params) == ["0.weight", "1.weight", "1.bias"]
    assert params["0.weight"] is model[0].weight


def test_model_call_uses_the_given_params_and_leaves_the_model_alone() -> None:
    model = linear()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    w, b = torch.ones(2, 3, dtype=torch.float64), torch.tensor([1.0, -1.0], dtype=torch.float64)
    x = torch.arange(6, dtype=torch.float64).reshape(2, 3)
    torch.testing.assert_close(model_call(model, {"weight": w, "bias": b}, x), x @ w.T + b)
    torch.testing.assert_close(model_call(model, {"bias": b}, x), x @ model.weight.T + b)  # missing: the model's
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_select_keeps_the_params_order() -> None:
    params = {"a": torch.zeros(1), "b": torch.ones(1), "c": torch.ones(2)}
    assert list(select(params, ["c", "a", "z"])) == ["a", "c"]


@pytest.mark.parametrize("create_graph", [True, False])
def test_grads_are_the_autograd_gradients(create_graph: bool) -> None:
    model = linear()
    params = named_params(model)
    x = torch.arange(6, dtype=torch.float64).reshape(2, 3)
    loss = model_call(model, params, x).pow(2).sum()
    g = grads(loss, params, create_graph=create_graph)
    out = x @ model.weight.T + model.bias
    torch.testing.assert_close(g["weight"], 2 * out.T @ x)
    torch.testing.assert_close(g["bias"], 2 * out.sum(0))
    assert g["weight"].requires_grad is create_graph  # second order needs the graph of the gradient


def test_grads_name_a_parameter_without_gradient() -> None:
    model = linear()
    params = {**named_params(model), "unused": torch.zeros(1, requires_grad=True)}
    loss = model_call(model, params, torch.ones(1, 3, dtype=torch.float64)).sum()
    with pytest.raises(ValueError, match="parameter 'unused' received no gradient"):
        grads(loss, params, create_graph=False)


def test_grads_keep_the_graph_of_the_loss_only_when_asked() -> None:
    model = linear()
    params = named_params(model)
    loss = model_call(model, params, torch.ones(1, 3, dtype=torch.float64)).pow(2).sum()
    kept = grads(loss, params, create_graph=False, retain_graph=True)
    again = grads(loss, params, create_graph=False)  # the graph of the loss was kept for this second pass
    for name in params:
        torch.testing.assert_close(again[name], kept[name])
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        grads(loss, params, create_graph=False)  # ... and freed by default without create_graph

def test_map_tensors_applies_to_every_tensor_and_keeps_the_structure() -> None:
    state = {"lstm": [(torch.ones(2), torch.zeros(2))], "t": 3, "name": "rule"}
    doubled = map_tensors(lambda t: t * 2 + 1, state)
    assert doubled.keys() == state.keys() and doubled["t"] == 3 and doubled["name"] == "rule"
    assert isinstance(doubled["lstm"], list) and isinstance(doubled["lstm"][0], tuple)
    torch.testing.assert_close(doubled["lstm"][0][0], torch.full((2,), 3.0))
    torch.testing.assert_close(doubled["lstm"][0][1], torch.ones(2))
    torch.testing.assert_close(state["lstm"][0][0], torch.ones(2))  # the input is left alone
