"""The rule language against oracles: numpy formulas entry by entry, torch.optim's Adam, PowerSign and AddSign."""

from __future__ import annotations

import io
import itertools
import math
import random

import numpy as np
import pytest
import torch

from metaopt.algorithms.rule_dsl import (
    BINARY,
    OPERANDS,
    UNARY,
    DSLOptimizer,
    DSLRule,
    Group,
    InvalidUpdateError,
    Rule,
    parse,
    rule_update,
)
from metaopt.algorithms.sign_rules import AddSign, PowerSign, sign_decay
from metaopt.engine.rules import StepInfo

B1, B2, B3 = 0.9, 0.999, 0.999


def numpy_operands(grads: list[np.ndarray], w: np.ndarray, horizon: int) -> dict[str, np.ndarray]:
    """Every deterministic operand after the gradients ``grads`` (one per step), from the paper's definitions."""
    m = v = y = np.zeros_like(w)
    for g in grads:
        m, v, y = B1 * m + (1 - B1) * g, B2 * v + (1 - B2) * g**2, B3 * y + (1 - B3) * g**3
    t = len(grads)
    mh, vh, yh = m / (1 - B1**t), v / (1 - B2**t), y / (1 - B3**t)
    g = grads[-1]
    return {"g": g, "g2": g**2, "g3": g**3, "m": mh, "v": vh, "y": yh, "sign_g": np.sign(g), "sign_m": np.sign(mh),
            "1": np.ones_like(g), "2": 2 * np.ones_like(g), "wd4": 1e-4 * w, "wd3": 1e-3 * w, "wd2": 1e-2 * w,
            "wd1": 1e-1 * w, "adam": mh / (np.sqrt(vh) + 1e-8), "rmsprop": g / (np.sqrt(vh) + 1e-8),
            "ld": np.full_like(g, max(0.0, (horizon - (t - 1)) / horizon)),
            "cd": np.full_like(g, 0.5 * (1 + math.cos(2 * math.pi * 0.5 * min(t - 1, horizon) / horizon))),
            "rd": np.full_like(g, sign_decay("restart", t - 1, horizon))}


NUMPY_UNARY = {"id": lambda x: x, "neg": lambda x: -x, "exp": np.exp, "log": lambda x: np.log(np.abs(x)),
               "sqrt": lambda x: np.sqrt(np.abs(x)), "clip5": lambda x: np.clip(x, -1e-5, 1e-5),
               "clip4": lambda x: np.clip(x, -1e-4, 1e-4), "clip3": lambda x: np.clip(x, -1e-3, 1e-3),
               "sign": np.sign}
NUMPY_BINARY = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "div": lambda x, y: x / (y + 1e-8),
                "pow": np.power, "left": lambda x, y: x}


def moments_after(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    moments = [torch.zeros_like(grads[0]) for _ in range(3)]
    for g in grads:
        moments = [b * m + (1 - b) * g**k for m, b, k in zip(moments, (B1, B2, B3), (1, 2, 3))]
    return moments


@pytest.fixture
def history() -> tuple[list[np.ndarray], np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.normal(size=5) for _ in range(4)], rng.normal(size=5)


@pytest.mark.parametrize("operand", [o for o in OPERANDS if o != "noise"])
def test_every_operand_matches_its_formula(operand: str, history: tuple[list[np.ndarray], np.ndarray]) -> None:
    grads, w = history
    expected = numpy_operands(grads, w, horizon=6)[operand]
    tensors = [torch.from_numpy(g) for g in grads]
    rule = parse(operand)
    got = rule_update(rule, tensors[-1], torch.from_numpy(w), moments_after(tensors), len(grads),
                      6 if rule.uses_decay else None)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(("unary", "binary"), list(itertools.product(NUMPY_UNARY, NUMPY_BINARY)))
def test_unary_and_binary_functions_entry_by_entry(unary: str, binary: str,
                                                   history: tuple[list[np.ndarray], np.ndarray]) -> None:
    grads, w = history
    ops = numpy_operands(grads, w, horizon=6)
    rule = parse(f"{binary}({unary}(m), v)" if binary != "left" else f"{unary}(m)")
    with np.errstate(all="ignore"):
        expected = NUMPY_BINARY[binary](NUMPY_UNARY[unary](ops["m"]), ops["v"])
    tensors = [torch.from_numpy(g) for g in grads]
    got = rule_update(rule, tensors[-1], torch.from_numpy(w), moments_after(tensors), len(grads), None)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=1e-15)


def test_noise_and_drops_are_seeded_and_have_their_statistics() -> None:
    g = torch.ones(20000, dtype=torch.float64)
    moments = moments_after([g])
    draw = [rule_update(parse(text), g, g, moments, 1, None, torch.Generator().manual_seed(3))
            for text in ("noise", "noise", "drop3(g)")]
    assert torch.equal(draw[0], draw[1])
    assert abs(draw[0].var().item() - 0.01) < 5e-4 and abs(draw[0].mean().item()) < 3e-3  # N(0, 0.01)
    assert abs((draw[2] == 0).double().mean().item() - 0.3) < 0.02 and set(draw[2].unique().tolist()) == {0.0, 1.0}


def random_rule(rng: random.Random, groups: int) -> Rule:
    chosen = []
    for k in range(groups):
        operands = (*OPERANDS, *(f"o{i + 1}" for i in range(k)))
        chosen.append(Group(rng.choice(operands), rng.choice(operands), rng.choice(list(UNARY)),
                            rng.choice(list(UNARY)), rng.choice(list(BINARY))))
    return Rule(tuple(chosen))


def test_canonical_strings_parse_back_and_are_fixed_points() -> None:
    rng = random.Random(0)
    for _ in range(300):
        rule = random_rule(rng, rng.randint(1, 4))
        canonical = rule.canonical()
        assert parse(str(canonical)) == canonical
        assert canonical.canonical() == canonical
        assert parse(str(rule)).canonical() == canonical


def test_canonical_form_identifies_rules_equal_by_construction() -> None:
    assert parse("add(g, m)").key == parse("add(m, g)").key
    assert parse("sub(g, m)").key != parse("sub(m, g)").key
    assert parse("left(exp(g), noise)").key == parse("left(exp(g), v)").key == "exp(g)"
    assert parse("sign(v); mul(m, g); add(o2, 1)").key == "mul(g, m); add(1, o1)"  # o1 is dead, o2 renamed
    assert parse("add(sign(adam), sign(sign_g))").key == parse("add(sign_m, sign(g3))").key == "add(sign_g, sign_m)"


def test_signs_the_canonical_form_replaces_are_equal_numerically(history) -> None:
    grads, w = history
    tensors = [torch.from_numpy(g) for g in grads]
    for operand in ("g", "g3", "rmsprop", "m", "adam", "1", "2", "sign_g", "sign_m"):
        rule = parse(f"sign({operand})")
        values = [rule_update(r, tensors[-1], torch.from_numpy(w), moments_after(tensors), len(grads), None)
                  for r in (rule, rule.canonical())]
        assert torch.equal(*values) and str(rule.canonical()) != f"sign({operand})"


@pytest.mark.parametrize(("text", "message"), [
    ("add(g, q)", "unknown operand 'q'"),
    ("add(o1, g)", "unknown operand 'o1' in group 1"),
    ("mul(sign_g, sign_m); add(o2, g)", "group 2 may use o1"),
    ("add(cube(g), g)", "not a unary function"),
    ("add(g, m", "expected ')'"),
    ("pow(g)", "pow takes 2 arguments"),
    ("add(g, m) g", "expected the end of the group"),
])
def test_parse_errors_name_the_problem(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse(text)


def run(optimizer_of, grads: list[torch.Tensor]) -> torch.Tensor:
    w = torch.nn.Parameter(torch.linspace(-1, 1, 6, dtype=torch.float64))
    opt = optimizer_of([w])
    for g in grads:
        w.grad = g.clone()
        opt.step()
    return w.detach()


@pytest.fixture
def grads() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(6, generator=gen, dtype=torch.float64) for _ in range(12)]


@pytest.mark.parametrize(("text", "reference"), [
    ("adam", lambda p: torch.optim.Adam(p, lr=0.01, eps=1e-8)),
    ("g", lambda p: torch.optim.SGD(p, lr=0.01)),
    ("mul(sign_g, sign_m); mul(exp(o1), g)", lambda p: PowerSign(p, lr=0.01)),
    ("mul(sign_g, sign_m); mul(o1, ld); mul(exp(o2), g)",
     lambda p: PowerSign(p, lr=0.01, sign_decay="linear", decay_steps=8)),
    ("mul(sign_g, sign_m); add(1, o1); mul(o2, g)", lambda p: AddSign(p, lr=0.01)),
    ("mul(sign_g, sign_m); mul(o1, rd); add(1, o2); mul(o3, g)",
     lambda p: AddSign(p, lr=0.01, sign_decay="restart", decay_steps=8)),
])
def test_rules_written_in_the_language_equal_their_optimizers(text: str, reference, grads) -> None:
    rule = parse(text)
    ours = run(lambda p: rule.optimizer(p, lr=0.01, decay_steps=8 if rule.uses_decay else None), grads)
    torch.testing.assert_close(ours, run(reference, grads), rtol=1e-12, atol=1e-14)


def test_functional_rule_equals_the_optimizer(grads) -> None:
    text = "mul(sign_g, sign_m); mul(o1, cd); mul(exp(o2), adam)"
    rule = DSLRule(text, lr=0.05, decay_steps=8)
    params = {"w": torch.linspace(-1, 1, 6, dtype=torch.float64)}
    state = rule.init(params)
    for t, g in enumerate(grads):
        params, state = rule.step(params, {"w": g}, state, StepInfo(t))
    expected = run(lambda p: DSLOptimizer(p, text, lr=0.05, decay_steps=8), grads)
    torch.testing.assert_close(params["w"], expected, rtol=1e-13, atol=1e-15)


def test_non_finite_update_is_an_invalid_rule_and_moves_nothing() -> None:
    w = torch.nn.Parameter(torch.tensor([0.0, 1.0]))
    opt = parse("log(g)").optimizer([w], lr=0.1)
    w.grad = torch.tensor([0.0, 1.0])  # log|0| = -inf
    with pytest.raises(InvalidUpdateError, match=r"update of rule log\(g\) is not finite"):
        opt.step()
    assert w.tolist() == [0.0, 1.0] and not any(opt.state.values())  # no moment moved either


def test_state_dict_round_trip_continues_identically(grads) -> None:
    text = "mul(sign_g, sign_m); mul(o1, ld); add(drop1(adam), noise)"
    w = torch.nn.Parameter(torch.ones(6, dtype=torch.float64))
    opt = DSLOptimizer([w], text, lr=0.1, decay_steps=20, seed=4)
    for g in grads[:5]:
        w.grad = g.clone()
        opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    w2 = torch.nn.Parameter(w.detach().clone())
    opt2 = DSLOptimizer([w2], text, lr=0.1, decay_steps=20, seed=4)
    opt2.load_state_dict(torch.load(buffer))
    for g in grads[5:]:
        for param, optimizer in ((w, opt), (w2, opt2)):
            param.grad = g.clone()
            optimizer.step()
    assert opt2.state[w2]["step"] == len(grads)
    assert torch.equal(w, w2)  # moments, step count and the noise and drop draws carried over


def test_decay_steps_required_by_decay_operands_and_refused_otherwise() -> None:
    w = torch.nn.Parameter(torch.ones(1))
    with pytest.raises(ValueError, match="reads a decay operand and needs decay_steps"):
        parse("mul(g, ld)").optimizer([w], lr=0.1)
    with pytest.raises(ValueError, match="reads none; drop decay_steps"):
        parse("g").optimizer([w], lr=0.1, decay_steps=10)
    with pytest.raises(ValueError, match="lr must be a finite number"):
        DSLOptimizer([w], "g", lr=float("nan"))
