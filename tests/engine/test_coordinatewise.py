"""Coordinate-wise LSTM and preprocessing against the paper's formula and torch's own LSTM."""

from __future__ import annotations

import math

import pytest
import torch

from metaopt.engine.coordinatewise import CHUNK, CoordinateLSTM, by_chunks, flatten, preprocess, unflatten


@pytest.mark.parametrize("p", [10.0, 5.0])
def test_preprocessing_is_the_papers_piecewise_formula(p: float) -> None:
    """Andrychowicz et al. 2016, Appendix A, written out entry by entry."""
    values = [3.0, -0.5, 1e-3, -1e-3, 2e-5, -4e-6, 1e-9, 0.0, math.exp(-p), -math.exp(-p) * 0.999]
    x = torch.tensor(values, dtype=torch.float64)
    expected = []
    for v in values:
        if abs(v) >= math.exp(-p):
            expected.append([math.log(abs(v)) / p, math.copysign(1.0, v)])
        else:
            expected.append([-1.0, math.exp(p) * v])
    torch.testing.assert_close(preprocess(x, p), torch.tensor(expected, dtype=torch.float64))


def test_preprocessing_keeps_shape_and_has_finite_gradients() -> None:
    x = torch.tensor([[0.0, 1e-8], [2.0, -3.0]], requires_grad=True)
    features = preprocess(x)
    assert features.shape == (2, 2, 2)
    features.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_flatten_and_unflatten_are_inverse() -> None:
    tensors = {"a": torch.randn(2, 3), "b": torch.randn(4)}
    vector = flatten(tensors)
    assert vector.shape == (10,)
    for name, t in unflatten(vector, tensors).items():
        assert torch.equal(t, tensors[name])
    with pytest.raises(ValueError, match="does not split"):
        unflatten(torch.zeros(11), tensors)


def test_coordinate_lstm_equals_torch_lstm_run_per_coordinate() -> None:
    """Each coordinate is an independent sequence: the same as nn.LSTM with the coordinates as the batch."""
    torch.manual_seed(0)
    lstm = CoordinateLSTM(3, hidden=5, layers=2).double()
    reference = torch.nn.LSTM(3, 5, num_layers=2).double()
    with torch.no_grad():
        for layer, cell in enumerate(lstm.cells):
            for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(reference, f"{kind}_l{layer}").copy_(getattr(cell, kind))
    inputs = torch.randn(4, 7, 3, dtype=torch.float64)  # 4 steps, 7 coordinates
    state = lstm.init_state(7, torch.float64)
    outputs = []
    for x in inputs:
        out, state = lstm(x, state)
        outputs.append(out)
    expected, _ = reference(inputs)
    torch.testing.assert_close(torch.stack(outputs), expected)


def test_without_autograd_the_in_place_step_is_the_same_bit_for_bit() -> None:
    """A learned optimizer's step (no autograd) computes the gates in place; the inputs' states stay as they were."""
    torch.manual_seed(0)
    lstm = CoordinateLSTM(2, hidden=20, layers=2)
    state = [(torch.randn(50, 20), torch.randn(50, 20)) for _ in range(2)]
    kept = [(h.clone(), c.clone()) for h, c in state]
    x = torch.randn(50, 2)
    out, new = lstm(x, state)
    with torch.no_grad():
        out_in_place, new_in_place = lstm(x, state)
    assert out.requires_grad and not out_in_place.requires_grad
    assert torch.equal(out, out_in_place)
    assert all(torch.equal(a, b) for pair, other in zip(new, new_in_place) for a, b in zip(pair, other))
    assert all(torch.equal(a, b) for pair, other in zip(state, kept) for a, b in zip(pair, other))


def test_coordinate_lstm_needs_a_layer() -> None:
    with pytest.raises(ValueError, match="at least one layer"):
        CoordinateLSTM(2, layers=0)


def test_by_chunks_runs_a_rowwise_network_in_chunks_without_autograd_and_gives_its_rows() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
    rows = torch.randn(2 * CHUNK + 11, 5)
    calls = []

    def counted(x: torch.Tensor) -> torch.Tensor:
        calls.append(len(x))
        return net(x)

    at_once = by_chunks(counted, rows)
    assert calls == [len(rows)] and at_once.requires_grad  # with autograd: one call, the graph kept
    with torch.no_grad():
        chunked = by_chunks(counted, rows)
    assert calls[1:] == [CHUNK, CHUNK, 11]
    torch.testing.assert_close(chunked, at_once.detach(), rtol=1e-6, atol=1e-7)
