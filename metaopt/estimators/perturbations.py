"""Counter-based perturbations: the Gaussian noise of ES and PES as a pure function of a key.

Evolution-strategies estimators (:mod:`metaopt.estimators.es`, :mod:`metaopt.estimators.pes`)
perturb the meta-parameters φ by ε = σ z with z ~ N(0, I). Here z is a pure function of the key
``(seed, step, task, pair)`` (run seed, meta-update, inner problem, antithetic pair): the key is
hashed by :class:`numpy.random.SeedSequence` into the seed of a CPU :class:`torch.Generator`, which
draws one tensor per entry of the parameter dict, in the dict's order. Any process that knows the
key and the shapes regenerates the same z, whatever it drew before and on whatever device its
parameters live, so workers only need to exchange loss differences (as google/learned_optimization's
distributed ES does; Salimans et al. 2017, "Evolution Strategies as a Scalable Alternative to
Reinforcement Learning", https://arxiv.org/abs/1703.03864, §2.1 "shared random seeds").

:func:`key_seed` is that hash, for other counter-based draws: a draw of another kind passes its
own ``stream`` (the :class:`numpy.random.SeedSequence` spawn key), so its seeds never coincide with
the perturbations' (the run lengths of :mod:`metaopt.estimators.runs` use stream ``(1,)``).

Example:
    >>> import torch
    >>> params = {"w": torch.zeros(2, 3), "b": torch.zeros(())}
    >>> z = perturbation((0, 5, 1, 2), params)
    >>> {name: tuple(t.shape) for name, t in z.items()}
    {'w': (2, 3), 'b': ()}
    >>> all(torch.equal(z[k], perturbation((0, 5, 1, 2), params)[k]) for k in z)
    True
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from metaopt.engine.functional import Params

__all__ = ["Key", "key_seed", "perturbation"]

#: ``(seed, step, task, pair)``: run seed, meta-update, inner problem of the meta-batch, antithetic pair.
Key = tuple[int, int, int, int]


def key_seed(key: Sequence[int], stream: tuple[int, ...] = ()) -> int:
    """A 63-bit generator seed, a pure function of ``key`` and ``stream`` (the hash of the module docs).

    Args:
        key: integers >= 0 (the perturbations': ``(seed, step, task, pair)``).
        stream: the kind of draw, kept apart from the others by :class:`numpy.random.SeedSequence`'s
            spawn key; ``()`` for the perturbations.
    """
    (state,) = np.random.SeedSequence(list(key), spawn_key=stream).generate_state(1, np.uint64)
    return int(state) >> 1  # 63 bits: torch.Generator.manual_seed takes a signed 64-bit int


def perturbation(key: Key, params: Params) -> Params:
    """Unit Gaussian noise z ~ N(0, I) shaped like ``params`` (dtype and device too), a pure function of ``key``.

    Args:
        key: four integers ``(seed, step, task, pair)``, each >= 0.
        params: the tensors to perturb, by name; only their shapes, dtypes and devices are read.

    Raises:
        ValueError: a key that is not four non-negative integers.
    """
    if len(key) != 4 or any(not isinstance(k, int) or k < 0 for k in key):
        raise ValueError(f"a perturbation key is four integers >= 0 (seed, step, task, pair), got {key!r}")
    generator = torch.Generator().manual_seed(key_seed(key))
    return {name: torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device)
            for name, p in params.items()}
