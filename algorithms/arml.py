"""ARML: modulate the initialisation per task from a learned meta-knowledge graph.

    prototypes C = class means of E(support)       relational graph A_R over C
    super-graph [C; H] with knowledge vertices H    one GCN layer -> enriched prototypes Ĉ
    q = GRU-autoencoder(C ⊕ one-hot), t = GRU-autoencoder(Ĉ)   (reconstruction losses L_q, L_t)
    θ_0,i = σ(W_g [t ⊕ q] + b_g) ∘ θ_0              MAML's inner loop from θ_0,i
    meta-loss = L_query + μ1 L_t + μ2 L_q

Components (paper §4.1-4.3 and App. A-B, checked against huaxiuyao/ARML ``maml.py``,
``metadag.py`` and ``task_embedding.py``):

* prototype graph: edge ``A_R[j, m] = sigmoid(w · |c_j - c_m| + b)`` (a dense layer on the
  absolute difference), no self-edges;
* meta-knowledge graph: ``vertices`` learned vectors ``H`` (random init), edges of the same form
  with their own layer;
* super-graph links ``A_S[j, k] = softmax_k(-||c_j - h_k||² / (2σ²))``, the paper's form (the code
  divides by 2σ with σ = 8 for images; our default σ = 8 is therefore a wider kernel);
* propagation: one GCN layer ``tanh(D⁻¹(A + I) X W)`` over ``[C; H]``; the first N rows are Ĉ;
* aggregators: two GRU autoencoders, mean-pooled encodings as task representations;
* gate: a sigmoid of a dense layer of ``[t ⊕ q]``, one per parameter tensor of the model.

Deviations, all documented choices: the gate is *per output channel* (a weight ``[C_out, ...]``
or a bias ``[C_out]`` gets ``C_out`` gates broadcast over the rest) instead of one per element,
whose dense layers would have ``numel`` outputs each; any N-way (the official code hard-codes 5);
the embedding network is two [3×3 conv 32, ReLU, 2×2 max-pool] blocks, a 4×4 average pool and
dense layers 512 → 384 → ``embedding_dim`` (the code: 5×5 kernels with local response
normalisation); the GCN layer has no bias; the GRUs are written from elementary operations so
that tasks batch under vmap, and the decoder reads the code sequence forward from a zero state
(the code decodes in reverse from the encoder's last state). As in the code, the vertex-to-vertex
edges only reach the vertex rows, which the single propagation layer then drops, so their layer
gets no gradient.

References:
    Yao, Wu, Tao, Li, Ding, Li, Li, 2020. Automated Relational Meta-learning. ICLR.
    https://arxiv.org/abs/2001.00745

Results (paper vs ours; commands and protocol in the README):

    ==================  ==============  ==========================================
    benchmark           paper           metaopt
    ==================  ==============  ==========================================
    miniImageNet 5w1s   50.42 ± 1.73    no images here (presets only)
    Omniglot 5w1s       —               see README (CPU time budget)
    ==================  ==============  ==========================================

Example:
    >>> import torch
    >>> from metaopt import Episode
    >>> from metaopt.models import Conv4
    >>> learner = ARML(Conv4(1, 5, hidden=8), ways=5, input_shape=(1, 28, 28), inner_lr=0.4, inner_steps=1)
    >>> x, y = torch.randn(10, 1, 28, 28), torch.arange(5).repeat(2)
    >>> loss, _ = learner.meta_loss(Episode.stack([Episode(x[:5], y[:5], x[5:], y[5:])] * 2))
    >>> loss.backward()
    >>> learner.initialiser.graph.vertices.grad.shape
    torch.Size([4, 64])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from metaopt.engine.functional import Params
from metaopt.engine.initialisers import Initialiser
from metaopt.engine.learner_options import AdaptOptions, InnerLoopOptions, SecondOrderOptions
from metaopt.engine.meta_learner import MetaLearner, adapted_parameter_names, check_model
from metaopt.engine.rules import sgd
from metaopt.options import ConfigError
from metaopt.problems.episode_task import EpisodeTask
from metaopt.registry import BuildContext, register_algorithm

__all__ = ["ARML", "ARMLOptions", "GRUAutoencoder", "GatedInitialisation", "KnowledgeGraph", "build_arml",
           "embedding_network"]


def embedding_network(input_shape: Sequence[int], dim: int) -> nn.Module:
    """The task-embedding network E: convolutional for images ``[C, H, W]``, an MLP for vectors ``[F]``."""
    if len(input_shape) == 3:
        blocks = [nn.Sequential(nn.Conv2d(input_shape[0] if i == 0 else 32, 32, 3, padding=1), nn.ReLU(),
                                nn.MaxPool2d(2)) for i in range(2)]
        return nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(512, 384), nn.ReLU(),
                             nn.Linear(384, dim))
    if len(input_shape) == 1:
        return nn.Sequential(nn.Linear(input_shape[0], 40), nn.ReLU(), nn.Linear(40, dim))
    raise ValueError(f"ARML embeds images [C, H, W] or vectors [F], got input_shape={tuple(input_shape)}")


def _edges(layer: nn.Linear, nodes: torch.Tensor) -> torch.Tensor:
    """``sigmoid(layer(|x_j - x_m|))`` for every pair of rows, zero on the diagonal."""
    weights = torch.sigmoid(layer((nodes[:, None] - nodes[None]).abs())).squeeze(-1)
    return weights * (1 - torch.eye(len(nodes), dtype=nodes.dtype, device=nodes.device))


class KnowledgeGraph(nn.Module):
    """The meta-knowledge graph and the super-graph propagation of ARML (§4.1-4.2).

    Args:
        dim: prototype and vertex dimension D.
        vertices: knowledge vertices G (the code's default: 4).
        sigma: bandwidth of the Gaussian prototype-to-vertex links (images: 8).
    """

    def __init__(self, dim: int, vertices: int = 4, sigma: float = 8.0) -> None:
        super().__init__()
        if vertices < 1:
            raise ValueError(f"the knowledge graph needs at least one vertex, got {vertices}")
        self.sigma = sigma
        self.vertices = nn.Parameter(torch.randn(vertices, dim))
        self.prototype_edges = nn.Linear(dim, 1)
        self.vertex_edges = nn.Linear(dim, 1)
        self.propagate = nn.Linear(dim, dim, bias=False)

    def forward(self, prototypes: torch.Tensor) -> torch.Tensor:
        """The enriched prototypes Ĉ ``[N, D]`` of prototypes C ``[N, D]``."""
        n = len(prototypes)
        vertices = self.vertices.to(prototypes.dtype)
        links = torch.softmax(-torch.cdist(prototypes, vertices).square() / (2 * self.sigma ** 2), dim=1)
        adjacency = torch.cat([torch.cat([_edges(self.prototype_edges, prototypes), links], 1),
                               torch.cat([links.T, _edges(self.vertex_edges, vertices)], 1)], 0)
        adjacency = adjacency + torch.eye(len(adjacency), dtype=adjacency.dtype, device=adjacency.device)
        adjacency = adjacency / adjacency.sum(1, keepdim=True)
        return torch.tanh(self.propagate(adjacency @ torch.cat([prototypes, vertices], 0)))[:n]


class _GRU(nn.Module):
    """A one-layer GRU over a sequence ``[L, in]`` from elementary operations (batches under vmap)."""

    def __init__(self, inputs: int, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.input_map = nn.Linear(inputs, 3 * hidden)
        self.hidden_map = nn.Linear(hidden, 3 * hidden)

    def forward(self, sequence: torch.Tensor) -> torch.Tensor:
        h = sequence.new_zeros(self.hidden)
        states = []
        for x in sequence:
            xr, xz, xn = self.input_map(x).chunk(3)
            hr, hz, hn = self.hidden_map(h).chunk(3)
            r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
            h = (1 - z) * torch.tanh(xn + r * hn) + z * h
            states.append(h)
        return torch.stack(states)


class GRUAutoencoder(nn.Module):
    """ARML's aggregator (§4.3): encode a set of rows with a GRU, mean-pool, reconstruct with a second GRU.

    Returns the task representation (the mean encoding) and the mean squared reconstruction error.
    """

    def __init__(self, inputs: int, hidden: int) -> None:
        super().__init__()
        self.encoder = _GRU(inputs, hidden)
        self.decoder = _GRU(hidden, hidden)
        self.output = nn.Linear(hidden, inputs)

    def forward(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        codes = self.encoder(rows)
        reconstruction = self.output(self.decoder(codes))
        return codes.mean(0), F.mse_loss(reconstruction, rows)


class GatedInitialisation(Initialiser):
    """ARML's per-task initialisation (§4.1-4.3): θ_0 gated by a task representation, plus reconstruction losses.

    Args:
        shapes: the shapes of the parameters to gate, by name (one gate per output channel each).
        ways: classes per task N (fixed: the prototype aggregator reads one-hot class ids).
        embedding: the task-embedding network E, ``[N, ...] -> [N, embedding_dim]``.
        embedding_dim: prototype dimension D.
        vertices, sigma: the knowledge graph's vertices and link bandwidth (:class:`KnowledgeGraph`).
        task_dim: size of each aggregator's task representation.
        loss_weight: μ1 = μ2, the weight of the reconstruction losses.
    """

    def __init__(self, shapes: dict[str, torch.Size], ways: int, embedding: nn.Module, embedding_dim: int = 64,
                 vertices: int = 4, sigma: float = 8.0, task_dim: int = 64, loss_weight: float = 0.01) -> None:
        super().__init__()
        self.ways = ways
        self.loss_weight = loss_weight
        self.embedding = embedding
        self.graph = KnowledgeGraph(embedding_dim, vertices, sigma)
        self.prototype_aggregator = GRUAutoencoder(embedding_dim + ways, task_dim)
        self.enriched_aggregator = GRUAutoencoder(embedding_dim, task_dim)
        self.gated = list(shapes)
        self.gates = nn.ModuleDict({name.replace(".", "-"): nn.Linear(2 * task_dim, shape[0])
                                    for name, shape in shapes.items()})

    def forward(self, params: Params, task: EpisodeTask) -> tuple[Params, torch.Tensor]:
        """θ_0 gated for one task, and its reconstruction loss μ (L_t + L_q)."""
        support_x, support_y = task.support_x, task.support_y
        onehot = F.one_hot(support_y, self.ways).to(support_x.dtype)
        embedded = self.embedding(support_x)
        prototypes = onehot.T @ embedded / onehot.sum(0).clamp_min(1)[:, None]
        q, loss_q = self.prototype_aggregator(torch.cat([prototypes, torch.eye(self.ways, dtype=prototypes.dtype,
                                                                               device=prototypes.device)], 1))
        t, loss_t = self.enriched_aggregator(self.graph(prototypes))
        representation = torch.cat([t, q])
        gated = dict(params)
        for name in self.gated:
            gate = torch.sigmoid(self.gates[name.replace(".", "-")](representation))
            gated[name] = params[name] * gate.reshape(gate.shape + (1,) * (params[name].dim() - 1))
        return gated, self.loss_weight * (loss_t + loss_q)


class ARML(MetaLearner):
    """Automated Relational Meta-Learning (Yao et al. 2020): MAML from a task-gated initialisation.

    Args:
        model: the network whose initialisation is meta-learned and gated per task.
        ways: classes per task N.
        input_shape: shape of one example (``[C, H, W]`` or ``[F]``) for the default embedding.
        inner_lr: MAML's inner step size (official: 0.01 on images).
        inner_steps: inner steps during meta-training (official: 5).
        embedding: the task-embedding network E (default: :func:`embedding_network`).
        embedding_dim: prototype dimension D (default embedding only).
        vertices: knowledge-graph vertices (official default: 4).
        sigma: Gaussian link bandwidth (official: 8 for images).
        task_dim: size of each aggregator's task representation.
        loss_weight: μ1 = μ2, the weight of the reconstruction losses (official: 0.01).
        adapt: the parameters the inner loop adapts, which are also the ones gated.
        **kwargs: engine options of :class:`metaopt.engine.meta_learner.MetaLearner` (``eval_inner_steps``,
            ``strategy``, ``bn_policy``...).
    """

    def __init__(self, model: nn.Module, ways: int, input_shape: Sequence[int], inner_lr: float = 0.01,
                 inner_steps: int = 5, embedding: nn.Module | None = None, embedding_dim: int = 64,
                 vertices: int = 4, sigma: float = 8.0, task_dim: int = 64, loss_weight: float = 0.01,
                 adapt: str | Sequence[str] = "all", **kwargs: Any) -> None:
        if ways < 2:
            raise ValueError(f"ARML needs ways >= 2, got {ways}")
        shapes = {name: p.shape for name, p in check_model(model).named_parameters()}
        gated = adapted_parameter_names(model, adapt) or list(shapes)
        embedding = embedding if embedding is not None else embedding_network(input_shape, embedding_dim)
        initialiser = GatedInitialisation({name: shapes[name] for name in gated}, ways, embedding, embedding_dim,
                                          vertices, sigma, task_dim, loss_weight)
        super().__init__(model, sgd(inner_lr), inner_steps=inner_steps, adapt=adapt, initialiser=initialiser,
                         **kwargs)


@dataclass(frozen=True)
class ARMLOptions(InnerLoopOptions, SecondOrderOptions, AdaptOptions):
    """ARML's options (Yao et al. 2020; the official code's defaults).

    Args:
        inner_lr: MAML's inner step size.
        vertices: meta-knowledge graph vertices.
        sigma: the prototype-to-vertex Gaussian bandwidth.
        loss_weight: the weight μ of the two reconstruction losses.
        embedding_dim: prototype dimension D of the task embedding.
        task_dim: size of each aggregator's task representation.
    """

    positive = ("inner_lr", "vertices", "sigma", "embedding_dim", "task_dim", *InnerLoopOptions.positive)
    inner_lr: float = 0.01
    inner_steps: int = 5
    vertices: int = 4
    sigma: float = 8.0
    loss_weight: float = 0.01
    embedding_dim: int = 64
    task_dim: int = 64

    def check(self) -> None:
        super().check()
        if self.loss_weight < 0:
            raise ConfigError(f"option 'loss_weight' must be >= 0, got {self.loss_weight}")


def _input_shape(model: nn.Module) -> tuple[int, ...]:
    """The example shape ARML's default embedding needs: ``(channels, 0, 0)`` for a convnet (its pooling is
    adaptive, so the image side does not matter), ``(features,)`` for an MLP."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return (module.in_channels, 0, 0)
        if isinstance(module, nn.Linear):
            return (module.in_features,)
    raise ConfigError("ARML's embedding needs a model that starts with a Conv2d or a Linear layer")


@register_algorithm("arml", ARMLOptions)
def build_arml(options: ARMLOptions, context: BuildContext) -> ARML:
    """ARML (Yao et al. 2020): MAML from an initialisation gated per task by a meta-knowledge graph."""
    if not context.example.is_classification:
        raise ConfigError("ARML builds class prototypes: it needs classification tasks (a dataset with ways)")
    return ARML(context.model, ways=context.example.ways, input_shape=_input_shape(context.model),
                **options.to_dict())
