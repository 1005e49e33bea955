"""ARML against oracles: MAML under fixed gates, torch.nn.GRU, a loop-built super-graph, and loop vs vmap."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from metaopt.algorithms import ARML, MAML
from metaopt.algorithms.arml import ARMLOptions, GatedInitialisation, GRUAutoencoder, KnowledgeGraph, embedding_network
from metaopt.options import ConfigError
from metaopt.problems.episode import Episode
from metaopt.problems.episode_task import EpisodeTask, default_loss
from metaopt.registry import BuildContext, entry
from metaopt.training.config import Section, load_preset
from tests.helpers import meta_grads, tiny_convnet, tiny_mlp, toy_classification_batch, toy_regression_batch

SMALL = {"input_shape": (1, 8, 8), "embedding_dim": 16, "task_dim": 8}


def _arml(ways: int = 3, **kwargs: object) -> ARML:
    """A float64 ARML around tiny_convnet (inner_lr 0.3, two steps unless overridden)."""
    options = {"inner_lr": 0.3, "inner_steps": 2, **SMALL, **kwargs}
    return ARML(tiny_convnet(ways=ways), ways=ways, **options).double()


def _fix_gates(learner: ARML, bias: float | dict[str, torch.Tensor]) -> None:
    """Gate layers with zero weights: every task's gate is ``sigmoid(bias)`` whatever the support set."""
    with torch.no_grad():
        for name, gate in learner.initialiser.gates.items():
            gate.weight.zero_()
            gate.bias.copy_(bias[name] if isinstance(bias, dict) else torch.full_like(gate.bias, bias))


def _torch_gru(gru: nn.Module) -> nn.GRU:
    """``torch.nn.GRU`` with the weights of one of arml.py's GRUs (same r, z, n chunking)."""
    reference = nn.GRU(gru.input_map.in_features, gru.hidden).double()
    with torch.no_grad():
        reference.weight_ih_l0.copy_(gru.input_map.weight)
        reference.weight_hh_l0.copy_(gru.hidden_map.weight)
        reference.bias_ih_l0.copy_(gru.input_map.bias)
        reference.bias_hh_l0.copy_(gru.hidden_map.bias)
    return reference


def _reference_autoencoder(ae: GRUAutoencoder, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean code and reconstruction MSE of ``rows`` computed with torch.nn.GRU."""
    codes, _ = _torch_gru(ae.encoder)(rows)
    decoded, _ = _torch_gru(ae.decoder)(codes)
    reconstruction = decoded @ ae.output.weight.T + ae.output.bias
    return codes.mean(0), (reconstruction - rows).square().mean()


def _reference_adjacency(graph: KnowledgeGraph, prototypes: torch.Tensor) -> torch.Tensor:
    """The row-normalised super-graph ``D⁻¹(A + I)`` over ``[C; H]``, entry by entry."""
    vertices = graph.vertices
    n, v = len(prototypes), len(vertices)
    adjacency = torch.eye(n + v, dtype=prototypes.dtype)

    def edge(layer: nn.Linear, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid((layer.weight[0] * (a - b).abs()).sum() + layer.bias[0])

    for j in range(n):
        for m in range(n):
            if j != m:
                adjacency[j, m] += edge(graph.prototype_edges, prototypes[j], prototypes[m])
        scores = [math.exp(-((prototypes[j] - vertices[k]) ** 2).sum().item() / (2 * graph.sigma ** 2))
                  for k in range(v)]
        for k in range(v):
            adjacency[j, n + k] += scores[k] / sum(scores)
            adjacency[n + k, j] += scores[k] / sum(scores)
    for j in range(v):
        for m in range(v):
            if j != m:
                adjacency[n + j, n + m] += edge(graph.vertex_edges, vertices[j], vertices[m])
    return adjacency / adjacency.sum(1, keepdim=True)


def _reference_modulation(learner: ARML, params: dict, support_x: torch.Tensor, support_y: torch.Tensor,
                          ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Gated θ_0, L_t and L_q of one task, from class means, the loop-built graph and torch.nn.GRU."""
    parts = learner.initialiser
    embedded = parts.embedding(support_x)
    prototypes = torch.stack([embedded[support_y == c].mean(0) for c in range(parts.ways)])
    q, loss_q = _reference_autoencoder(parts.prototype_aggregator,
                                       torch.cat([prototypes, torch.eye(parts.ways, dtype=prototypes.dtype)], 1))
    nodes = torch.cat([prototypes, parts.graph.vertices])
    enriched = torch.tanh(_reference_adjacency(parts.graph, prototypes) @ nodes @ parts.graph.propagate.weight.T)
    t, loss_t = _reference_autoencoder(parts.enriched_aggregator, enriched[:parts.ways])
    gated = {}
    for name, p in params.items():
        gate = parts.gates[name.replace(".", "-")]
        gated[name] = p * torch.sigmoid(gate.weight @ torch.cat([t, q]) + gate.bias).reshape(-1, *[1] * (p.dim() - 1))
    return gated, loss_t, loss_q


def test_gates_fixed_at_one_give_maml_exactly() -> None:
    batch = toy_classification_batch()
    learner = ARML(tiny_convnet(), ways=3, input_shape=(1, 8, 8), inner_lr=0.3, inner_steps=2, loss_weight=0.0).double()
    _fix_gates(learner, 40.0)  # sigmoid(40) == 1.0 in float64
    loss, grads = meta_grads(learner, batch)
    expected_loss, expected = meta_grads(MAML(tiny_convnet(), inner_lr=0.3, inner_steps=2).double(), batch)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-12, atol=0)
    for name, grad in expected.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-12, atol=1e-15, msg=name)


def test_reconstruction_losses_are_added_with_their_weight() -> None:
    batch = toy_classification_batch()
    learner = ARML(tiny_convnet(), ways=3, input_shape=(1, 8, 8), inner_lr=0.3, inner_steps=2,
                   loss_weight=0.01).double()
    _fix_gates(learner, 40.0)
    loss, _ = learner.meta_loss(batch)
    maml_loss, _ = MAML(tiny_convnet(), inner_lr=0.3, inner_steps=2).double().meta_loss(batch)
    params = dict(learner.model.named_parameters())
    with torch.no_grad():
        extra = [sum(_reference_modulation(learner, params, task.support_x, task.support_y)[1:])
                 for task in (batch[i] for i in range(len(batch)))]
    assert min(extra) > 0
    torch.testing.assert_close(loss.detach(), maml_loss.detach() + 0.01 * torch.stack(extra).mean(),
                               rtol=1e-12, atol=1e-15)


def test_per_channel_gates_scale_the_initialisation_of_maml() -> None:
    """Fixed gates g (one per output channel): ARML is MAML from g ∘ θ_0, and dL/dθ_0 = g ∘ MAML's gradient."""
    batch = toy_classification_batch()
    learner = _arml(loss_weight=0.0)
    biases = {name: torch.randn(gate.bias.shape, dtype=torch.float64)
              for name, gate in learner.initialiser.gates.items()}
    _fix_gates(learner, biases)
    gates = {name: torch.sigmoid(biases[name.replace(".", "-")]) for name, _ in learner.model.named_parameters()}
    scaled = tiny_convnet()
    with torch.no_grad():
        for name, p in scaled.named_parameters():
            p.mul_(gates[name].reshape(-1, *[1] * (p.dim() - 1)))
    loss, grads = meta_grads(learner, batch)
    maml = MAML(scaled, inner_lr=0.3, inner_steps=2).double()
    expected_loss, expected = meta_grads(maml, batch)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-10, atol=0)
    for name, p in learner.model.named_parameters():
        torch.testing.assert_close(grads["model." + name], gates[name].reshape(-1, *[1] * (p.dim() - 1))
                                   * expected["model." + name], rtol=1e-9, atol=1e-14, msg=name)
    episode = batch[0]  # adapt() starts from the gated initialisation too
    adapted = learner.adapt(episode, steps=1)
    reference = maml.adapt(episode, steps=1)
    for name, value in reference.params.items():
        torch.testing.assert_close(adapted.params[name], value, rtol=1e-10, atol=1e-14, msg=name)


@pytest.mark.parametrize("ways", [2, 3, 5])
def test_shapes_and_modulation_match_a_loop_built_oracle(ways: int) -> None:
    learner = _arml(ways)
    parts = learner.initialiser
    assert isinstance(parts, GatedInitialisation)
    params = dict(learner.model.named_parameters())
    assert set(parts.gates) == {name.replace(".", "-") for name in params}
    for name, p in params.items():
        gate = parts.gates[name.replace(".", "-")]
        assert (gate.in_features, gate.out_features) == (2 * 8, p.shape[0]), name
    episode = toy_classification_batch(tasks=1, ways=ways)[0]
    gated, extra = parts(params, EpisodeTask(learner.model, default_loss, *episode.tensors()))
    assert {k: v.shape for k, v in gated.items()} == {k: v.shape for k, v in params.items()}
    with torch.no_grad():
        expected, loss_t, loss_q = _reference_modulation(learner, params, episode.support_x, episode.support_y)
    for name in params:
        torch.testing.assert_close(gated[name], expected[name], rtol=1e-10, atol=1e-14, msg=name)
        assert not torch.equal(gated[name], params[name]), name
    torch.testing.assert_close(extra, 0.01 * (loss_t + loss_q), rtol=1e-10, atol=0)
    prototypes = torch.randn(ways, 16, dtype=torch.float64)
    out = parts.graph(prototypes)
    assert out.shape == (ways, 16)
    adjacency = _reference_adjacency(parts.graph, prototypes)
    assert adjacency.shape == (ways + 4, ways + 4) and (adjacency > 0).all()
    torch.testing.assert_close(adjacency.sum(1), torch.ones(ways + 4, dtype=torch.float64))
    nodes = torch.cat([prototypes, parts.graph.vertices])
    torch.testing.assert_close(out, torch.tanh(adjacency @ nodes @ parts.graph.propagate.weight.T)[:ways])


def test_meta_gradients_reach_every_arml_component() -> None:
    learner = _arml()
    loss, _ = learner.meta_loss(toy_classification_batch())
    loss.backward()
    for name, p in learner.named_parameters():
        assert p.grad is not None, name
    nonzero = ["graph.vertices", "graph.prototype_edges.weight", "graph.propagate.weight", "embedding.0.0.weight",
               "embedding.6.weight", "gates.3-weight.weight", "gates.3-bias.bias", "gates.0-0-weight.bias"]
    for module in ("prototype_aggregator", "enriched_aggregator"):
        for part in ("encoder.input_map", "encoder.hidden_map", "decoder.input_map", "decoder.hidden_map", "output"):
            nonzero.append(f"{module}.{part}.weight")
    # (graph.vertex_edges only shapes the vertex rows, which the single propagation layer drops: zero gradient)
    for name in nonzero:
        assert learner.get_parameter(f"initialiser.{name}").grad.abs().sum() > 0, name
    assert all(p.grad.abs().sum() > 0 for p in learner.initialiser.embedding.parameters())
    assert all(gate.weight.grad.abs().sum() > 0 for gate in learner.initialiser.gates.values())


def test_gru_equals_torch_gru() -> None:
    ae = GRUAutoencoder(5, 7).double()
    sequence = torch.randn(6, 5, dtype=torch.float64)
    for gru, inputs in ((ae.encoder, sequence), (ae.decoder, torch.randn(6, 7, dtype=torch.float64))):
        expected, last = _torch_gru(gru)(inputs)
        states = gru(inputs)
        assert states.shape == (6, 7)
        torch.testing.assert_close(states, expected, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(states[-1], last[0], rtol=1e-12, atol=1e-14)
    code, loss = ae(sequence)
    expected_code, expected_loss = _reference_autoencoder(ae, sequence)
    torch.testing.assert_close(code, expected_code, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-12, atol=1e-14)


def test_loop_and_vmap_agree() -> None:
    batch = toy_classification_batch()
    loop = meta_grads(_arml(strategy="loop"), batch)
    vmap = meta_grads(_arml(strategy="vmap"), batch)
    torch.testing.assert_close(vmap[0], loop[0], rtol=1e-9, atol=1e-12)
    assert vmap[1].keys() == loop[1].keys()
    for name in loop[1]:
        torch.testing.assert_close(vmap[1][name], loop[1][name], rtol=1e-9, atol=1e-12, msg=name)


def test_invalid_options_are_refused() -> None:
    with pytest.raises(TypeError, match="unexpected keyword argument 'driver'"):  # torch.func only
        ARML(tiny_convnet(), ways=3, input_shape=(1, 8, 8), driver="higher")
    with pytest.raises(ValueError, match="ways >= 2"):
        ARML(tiny_convnet(ways=1), ways=1, input_shape=(1, 8, 8))
    with pytest.raises(ValueError, match="input_shape"):
        embedding_network((8, 8), 16)
    with pytest.raises(ValueError, match="at least one vertex"):
        KnowledgeGraph(16, vertices=0)


ARML_OPTIONS = ("adapt", "first_order", "checkpoint_steps", "inner_steps", "eval_inner_steps", "strategy", "bn_policy",
                "inner_lr", "vertices", "sigma", "loss_weight", "embedding_dim", "task_dim")


def test_registered_builder_needs_classification_tasks_and_refuses_other_options() -> None:
    found = entry("algorithm", "arml")
    assert found.options is ARMLOptions and tuple(ARMLOptions.field_names()) == ARML_OPTIONS
    with pytest.raises(ConfigError, match="ways"):
        found.build(ARMLOptions(), BuildContext(tiny_mlp(), toy_regression_batch()))
    options = ARMLOptions(inner_lr=0.3, inner_steps=2, vertices=3, sigma=2.0, loss_weight=0.5)
    batch = toy_classification_batch(tasks=2, dtype=torch.float32)
    learner = found.build(options, BuildContext(tiny_convnet().float(), batch))
    parts = learner.initialiser
    assert isinstance(learner, ARML) and parts.ways == 3 and parts.loss_weight == 0.5
    assert learner.inner_steps == 2 and learner.rule.lr == 0.3
    assert tuple(parts.graph.vertices.shape) == (3, 64) and parts.graph.sigma == 2.0
    assert parts.embedding[0][0].in_channels == 1
    loss, _ = learner.meta_loss(batch)
    assert torch.isfinite(loss)
    x = torch.randn(1, 12, 4)
    y = torch.arange(3).repeat(4)[None]
    vector_batch = Episode(x[:, :6], y[:, :6], x[:, 6:], y[:, 6:], batched=True)
    vectors = found.build(options, BuildContext(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)),
                                                vector_batch))
    assert vectors.initialiser.embedding[0].in_features == 4
    assert torch.isfinite(vectors.meta_loss(vector_batch)[0])
    listed = ", ".join(ARML_OPTIONS)
    for option in ("arml_vertices", "mask", "driver"):
        with pytest.raises(ConfigError, match=rf"^'{option}'( \(did you mean '\w+'\?\))? is not an option of "
                                              rf"algorithm 'arml'; its options are {listed}$"):
            Section.from_dict("algorithm", {"name": "arml", option: 1})
    with pytest.raises(ConfigError, match="'loss_weight' must be >= 0"):
        ARMLOptions(loss_weight=-0.1)


@pytest.mark.parametrize(("name", "shots"), [("arml-miniimagenet-5w1s", 1), ("arml-miniimagenet-5w5s", 5)])
def test_miniimagenet_presets(name: str, shots: int) -> None:
    config = load_preset(name)
    algorithm, data = config.algorithm.options, config.data.options
    assert config.algorithm.name == "arml" and config.data.name == "miniimagenet" and not algorithm.first_order
    assert (data.ways, data.shots, algorithm.inner_steps, algorithm.eval_inner_steps, algorithm.inner_lr,
            data.meta_batch, data.query) == (5, shots, 5, 20, 0.01, 4, 10)
    assert (algorithm.vertices, algorithm.sigma, algorithm.loss_weight) == (4, 8.0, 0.01)


def test_omniglot_preset() -> None:
    config = load_preset("arml-omniglot-5w1s")
    algorithm, data = config.algorithm.options, config.data.options
    assert config.algorithm.name == "arml" and config.data.name == "omniglot"
    assert (data.ways, data.shots, algorithm.inner_lr, algorithm.inner_steps) == (5, 1, 0.4, 1)
    assert (algorithm.vertices, algorithm.sigma, algorithm.loss_weight) == (4, 8.0, 0.01)
