"""The update-rule language of Neural Optimizer Search (Bello et al. 2017, §3): rules as strings, parsed and compiled.

A rule is a list of groups of 5 tokens ``(op1, op2, u1, u2, b)``; a group computes
``b(u1(op1), u2(op2))`` and the last group's value is the update ``Δ``, applied as
``θ ← θ - λ · Δ`` (so ``g`` alone is SGD). Group ``k`` may use the outputs ``o1 … o(k-1)`` of the
groups before it as operands, which gives deeper rules. The tables (paper §3.1, Appendix):

* **operands** (:data:`OPERANDS`): ``g``, ``g2``, ``g3`` (g², g³); ``m``, ``v``, ``y``, the
  bias-corrected running averages of g, g², g³ (β = 0.9, 0.999, 0.999); ``sign_g``, ``sign_m``;
  the constants ``1``, ``2``; ``noise`` ~ N(0, 0.01) (variance 0.01); the weight-decay terms
  ``wd4`` … ``wd1`` = 10⁻⁴w … 10⁻¹w; ``adam`` = m̂/(√v̂ + ε) and ``rmsprop`` = g/(√v̂ + ε), the
  whole Adam and RMSProp updates; ``ld``, ``cd``, ``rd``, the linear, cosine and restart decays of
  :func:`metaopt.algorithms.sign_rules.sign_decay` at the step (the paper's §5 decay operands);
* **unary** (:data:`UNARY`): ``id``, ``neg``, ``exp``, ``log`` (log|x|), ``sqrt`` (√|x|),
  ``clip5`` / ``clip4`` / ``clip3`` (clip to ±1e-5 / ±1e-4 / ±1e-3), ``drop1`` / ``drop3`` /
  ``drop5`` (zero each entry with probability 0.1 / 0.3 / 0.5, no rescaling), ``sign``;
* **binary** (:data:`BINARY`): ``add``, ``sub``, ``mul``, ``div`` (x / (y + δ), δ = 1e-8),
  ``pow`` (x^y), ``left`` (keep x).

A rule's **canonical string** writes each group as ``b(u1(op1), u2(op2))`` without ``id``, joined
by ``"; "`` (a ``left`` group is its bare first term): PowerSign is
``"mul(sign_g, sign_m); mul(exp(o1), g)"``, Adam is ``"adam"``. :meth:`Rule.canonical`
makes rules that compute the same thing by construction equal: the arguments of ``add`` and
``mul`` sorted, the ignored argument of ``left`` dropped, groups the update never reads removed
(and the rest renumbered), and the sign of an operand whose sign is an operand written as that
operand (``sign(adam)`` is ``sign_m``, ``sign(g3)`` is ``sign_g``: :data:`SIGN_OF`).
:func:`parse` reads the string back. A rule compiles into an :class:`DSLRule` (the engine's
pure ``init``/``step`` update rule) and a :class:`DSLOptimizer` (``torch.optim``); both evaluate
:func:`rule_update`. An update that is not finite (``exp`` overflow, ``pow`` of a negative base,
``log`` of 0 ...) raises :class:`InvalidUpdateError`: a search scores such a rule with the
minimum reward instead of crashing.

Reference:
    Bello, Zoph, Vasudevan, Le, 2017. Neural Optimizer Search with Reinforcement Learning. ICML.
    https://arxiv.org/abs/1709.07417 (§3 the DSL, §5 decay operands).

Example:
    >>> rule = parse("mul(sign_g, sign_m); mul(exp(o1), g)")       # PowerSign without decay
    >>> rule.canonical() == parse("mul(sign_m, sign_g); mul(g, exp(o1))").canonical()
    True
    >>> w = torch.nn.Parameter(torch.tensor([1.0]))
    >>> opt = rule.optimizer([w], lr=0.1)
    >>> w.grad = torch.tensor([1.0]); opt.step()                  # g, m agree: step e·g
    >>> round(w.item(), 4)
    0.7282
    >>> str(parse("left(g, noise)")), parse("sub(g, g); exp(g)").key                # a dead group goes
    ('g', 'exp(g)')
    >>> rule.formula()
    'exp(sign(g)·sign(m̂))·g'

"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from metaopt.algorithms.sign_rules import sign_decay
from metaopt.engine.functional import Params
from metaopt.engine.rule_optimizer import closure_loss
from metaopt.engine.rules import StepInfo, UpdateRule

__all__ = ["BINARY", "OPERANDS", "UNARY", "DSLOptimizer", "DSLRule", "Group", "InvalidUpdateError", "Rule", "parse",
           "rule_update"]

DELTA = 1e-8
EPS = 1e-8
BETAS = (0.9, 0.999, 0.999)
#: The base operands, in the controller's order (group outputs o1, o2 ... follow them).
OPERANDS = ("g", "g2", "g3", "m", "v", "y", "sign_g", "sign_m", "1", "2", "noise", "wd4", "wd3", "wd2", "wd1",
            "adam", "rmsprop", "ld", "cd", "rd")
DECAY_OPERANDS = {"ld": "linear", "cd": "cosine", "rd": "restart"}
#: The operands that read each running average m, v, y.
_MOMENT_READERS = (("m", "sign_m", "adam"), ("v", "adam", "rmsprop"), ("y",))
UNARY: dict[str, Callable[[torch.Tensor, torch.Generator | None], torch.Tensor]] = {
    "id": lambda x, gen: x,
    "neg": lambda x, gen: -x,
    "exp": lambda x, gen: torch.exp(x),
    "log": lambda x, gen: torch.log(torch.abs(x)),
    "sqrt": lambda x, gen: torch.sqrt(torch.abs(x)),
    "clip5": lambda x, gen: torch.clamp(x, -1e-5, 1e-5),
    "clip4": lambda x, gen: torch.clamp(x, -1e-4, 1e-4),
    "clip3": lambda x, gen: torch.clamp(x, -1e-3, 1e-3),
    "drop1": lambda x, gen: _drop(x, 0.1, gen),
    "drop3": lambda x, gen: _drop(x, 0.3, gen),
    "drop5": lambda x, gen: _drop(x, 0.5, gen),
    "sign": lambda x, gen: torch.sign(x),
}
BINARY: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "add": torch.add,
    "sub": torch.sub,
    "mul": torch.mul,
    "div": lambda x, y: x / (y + DELTA),
    "pow": torch.pow,
    "left": lambda x, y: x,
}
COMMUTATIVE = ("add", "mul")
#: sign(x) of the operands whose sign is an operand: sign(m̂/(√v̂+ε)) = sign(m̂), sign(g³) = sign(g) ...
SIGN_OF = {"g": "sign_g", "g3": "sign_g", "rmsprop": "sign_g", "sign_g": "sign_g", "m": "sign_m", "adam": "sign_m",
           "sign_m": "sign_m", "1": "1", "2": "1"}
#: How :meth:`Rule.formula` writes operands, unary functions ({} is the argument) and binary functions.
SYMBOLS = {"g": "g", "g2": "g²", "g3": "g³", "m": "m̂", "v": "v̂", "y": "ŷ", "sign_g": "sign(g)", "sign_m": "sign(m̂)",
           "1": "1", "2": "2", "noise": "ε", "wd4": "1e-4·w", "wd3": "1e-3·w", "wd2": "1e-2·w", "wd1": "1e-1·w",
           "adam": "m̂/(√v̂+ε)", "rmsprop": "g/(√v̂+ε)", "ld": "ld(t)", "cd": "cd(t)", "rd": "rd(t)"}
UNARY_FORMULAS = {"id": "{}", "neg": "-{}", "exp": "exp({})", "log": "log|{}|", "sqrt": "√|{}|",
                  "clip5": "clip({}, 1e-5)", "clip4": "clip({}, 1e-4)", "clip3": "clip({}, 1e-3)",
                  "drop1": "drop({}, 0.1)", "drop3": "drop({}, 0.3)", "drop5": "drop({}, 0.5)", "sign": "sign({})"}
BINARY_FORMULAS = {"add": "({} + {})", "sub": "({} - {})", "mul": "{}·{}", "div": "{}/({} + δ)", "pow": "{}^{}",
                   "left": "{}"}


class InvalidUpdateError(FloatingPointError):
    """A rule's update is not finite (a search gives the rule the minimum reward)."""


def _drop(x: torch.Tensor, p: float, generator: torch.Generator | None) -> torch.Tensor:
    keep = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) >= p
    return x * keep


@dataclass(frozen=True)
class Group:
    """One group ``b(u1(op1), u2(op2))`` of a rule (operands may be ``o1``, ``o2`` ... of earlier groups)."""

    op1: str
    op2: str
    u1: str
    u2: str
    b: str

    def tokens(self) -> tuple[str, str, str, str, str]:
        return (self.op1, self.op2, self.u1, self.u2, self.b)

    def arguments(self) -> tuple[str, ...]:
        """The operands the group reads (``left`` reads its first one only)."""
        return (self.op1,) if self.b == "left" else (self.op1, self.op2)

    def __str__(self) -> str:
        first, second = _term(self.u1, self.op1), _term(self.u2, self.op2)
        return first if self.b == "left" else f"{self.b}({first}, {second})"


def _signed(unary: str, operand: str) -> tuple[str, str]:
    """``(unary, operand)``, with ``sign`` of an operand whose sign is an operand replaced by that operand."""
    return ("id", SIGN_OF[operand]) if unary == "sign" and operand in SIGN_OF else (unary, operand)


def _term(unary: str, operand: str) -> str:
    return operand if unary == "id" else f"{unary}({operand})"


@dataclass(frozen=True)
class Rule:
    """An update rule of the language: its groups, the last one giving the update (see the module docs)."""

    groups: tuple[Group, ...]

    def __post_init__(self) -> None:
        if not self.groups:
            raise ValueError("a rule needs at least one group")
        for k, group in enumerate(self.groups):
            earlier = tuple(f"o{i + 1}" for i in range(k))
            for operand in (group.op1, group.op2):
                if operand not in OPERANDS and operand not in earlier:
                    where = f"; group {k + 1} may use {', '.join(earlier)}" if earlier else ""
                    raise ValueError(f"unknown operand {operand!r} in group {k + 1} of a rule; the operands are "
                                     f"{', '.join(OPERANDS)}{where}")
            for unary in (group.u1, group.u2):
                if unary not in UNARY:
                    raise ValueError(f"unknown unary function {unary!r}; choose one of {', '.join(UNARY)}")
            if group.b not in BINARY:
                raise ValueError(f"unknown binary function {group.b!r}; choose one of {', '.join(BINARY)}")

    @classmethod
    def from_tokens(cls, tokens: Sequence[str]) -> Rule:
        """The rule of a flat token list, 5 tokens a group (op1, op2, u1, u2, b)."""
        if not tokens or len(tokens) % 5:
            raise ValueError(f"a rule is groups of 5 tokens (op1, op2, u1, u2, b); got {len(tokens)} tokens")
        return cls(tuple(Group(*tokens[i:i + 5]) for i in range(0, len(tokens), 5)))

    def canonical(self) -> Rule:
        """The rule with commutative arguments sorted, ``left``'s ignored argument dropped, dead groups removed, signs
        of operands with a sign operand replaced (module docs)."""
        live = {len(self.groups) - 1}
        for k in range(len(self.groups) - 1, -1, -1):
            if k in live:
                live.update(int(a[1:]) - 1 for a in self.groups[k].arguments() if a.startswith("o"))
        kept = sorted(live)
        rename = {f"o{old + 1}": f"o{new + 1}" for new, old in enumerate(kept)}
        groups = []
        for k in kept:
            group = self.groups[k]
            op1, op2 = rename.get(group.op1, group.op1), rename.get(group.op2, group.op2)
            first, second = (_signed(group.u1, op1), _signed(group.u2, op2))
            if group.b == "left":
                second = ("id", "1")
            elif group.b in COMMUTATIVE and _term(*second) < _term(*first):
                first, second = second, first
            groups.append(Group(first[1], second[1], first[0], second[0], group.b))
        return Rule(tuple(groups))

    @property
    def key(self) -> str:
        """The canonical string: equal for rules equal by construction (a reward cache's key)."""
        return str(self.canonical())

    @property
    def uses_decay(self) -> bool:
        """Whether the rule reads a decay operand (``ld``, ``cd``, ``rd``), which needs a decay horizon."""
        return any(operand in DECAY_OPERANDS for g in self.groups for operand in g.arguments())

    def __str__(self) -> str:
        return "; ".join(str(group) for group in self.groups)

    def formula(self) -> str:
        """The update written out as one formula, group outputs substituted (e.g. ``exp(sign(g)·sign(m̂))·g``)."""
        outputs: dict[str, str] = {}
        for k, group in enumerate(self.groups):
            terms = [UNARY_FORMULAS[u].format(outputs.get(op, SYMBOLS.get(op, op)))
                     for u, op in ((group.u1, group.op1), (group.u2, group.op2))]
            outputs[f"o{k + 1}"] = BINARY_FORMULAS[group.b].format(*terms[:1 if group.b == "left" else 2])
        return outputs[f"o{len(self.groups)}"]

    def reads(self, *operands: str) -> bool:
        """Whether the update reads every operand of ``operands`` (through the groups it uses)."""
        live = {operand for group in self.canonical().groups for operand in group.arguments()}
        return set(operands) <= live

    @functools.cached_property
    def moments_read(self) -> tuple[bool, bool, bool]:
        """Whether the update reads each running average m, v, y (an unread one need not be kept up to date)."""
        return tuple(any(self.reads(op) for op in ops) for ops in _MOMENT_READERS)

    def optimizer(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], lr: float,
                  decay_steps: int | None = None, seed: int = 0) -> DSLOptimizer:
        """This rule as a ``torch.optim`` optimizer with step size λ = ``lr`` (:class:`DSLOptimizer`)."""
        return DSLOptimizer(params, self, lr=lr, decay_steps=decay_steps, seed=seed)


def parse(text: str) -> Rule:
    """The rule written ``text`` (the canonical string format of the module docs; ``id`` may be written or not).

    Raises:
        ValueError: naming the position and what was expected.
    """
    groups = []
    for k, part in enumerate(text.split(";")):
        reader = _Reader(part.strip(), k + 1)
        name, args = reader.call()
        if name not in BINARY:
            # a group written as a bare term, e.g. "exp(o1)" or "g": keep-left of it
            args, name = [(name, args)], "left"
        if len(args) != (1 if name == "left" else 2) and not (name == "left" and len(args) == 2):
            raise ValueError(f"group {k + 1} of {text!r}: {name} takes {1 if name == 'left' else 2} arguments, "
                             f"got {len(args)}")
        terms = [reader.term(arg) for arg in args] + ([("id", "1")] if len(args) == 1 else [])
        (u1, op1), (u2, op2) = terms
        groups.append(Group(op1, op2, u1, u2, name))
    return Rule(tuple(groups))


class _Reader:
    """A recursive-descent reader of one group: ``name`` or ``name(arg, arg)``."""

    def __init__(self, text: str, group: int) -> None:
        self.text, self.pos, self.group = text.replace(" ", ""), 0, group

    def fail(self, expected: str) -> ValueError:
        return ValueError(f"group {self.group} of a rule, {self.text!r}: expected {expected} at character {self.pos}")

    def call(self) -> tuple[str, list[Any]]:
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] not in "(),":
            self.pos += 1
        name = self.text[start:self.pos]
        if not name:
            raise self.fail("a name")
        args: list[Any] = []
        if self.pos < len(self.text) and self.text[self.pos] == "(":
            self.pos += 1
            args.append(self.call())
            while self.pos < len(self.text) and self.text[self.pos] == ",":
                self.pos += 1
                args.append(self.call())
            if self.pos >= len(self.text) or self.text[self.pos] != ")":
                raise self.fail("')'")
            self.pos += 1
        if self.group and start == 0 and self.pos != len(self.text):
            raise self.fail("the end of the group")
        return name, args

    def term(self, arg: tuple[str, list[Any]]) -> tuple[str, str]:
        """``(unary, operand)`` of ``operand`` or ``unary(operand)``."""
        name, args = arg
        if not args:
            return "id", name
        if len(args) == 1 and not args[0][1] and name in UNARY:
            return name, args[0][0]
        raise ValueError(f"group {self.group} of a rule, {self.text!r}: {name}(...) is not a unary function of an "
                         f"operand; the unary functions are {', '.join(UNARY)}")


def rule_update(rule: Rule, grad: torch.Tensor, param: torch.Tensor, moments: Sequence[torch.Tensor], t: int,
                decay_steps: int | None, generator: torch.Generator | None = None) -> torch.Tensor:
    """The update Δ of ``rule`` for one tensor at its step ``t`` (1 at the first), after the moments were updated.

    Args:
        rule: the rule.
        grad: the gradient g.
        param: the parameter w (for the weight-decay operands).
        moments: the running averages of g, g², g³ (not bias-corrected), already updated with ``grad``.
        t: the number of updates of the moments so far (their bias corrections).
        decay_steps: T of the decay operands (``None`` if the rule reads none).
        generator: random numbers of ``noise`` and the drops.
    """
    cache: dict[str, torch.Tensor] = {}

    def operand(name: str) -> torch.Tensor:
        if name not in cache:
            cache[name] = _operand(name, grad, param, moments, t, decay_steps, generator, operand)
        return cache[name]

    for k, group in enumerate(rule.groups):
        first = UNARY[group.u1](operand(group.op1), generator)
        second = UNARY[group.u2](operand(group.op2), generator) if group.b != "left" else first
        cache[f"o{k + 1}"] = BINARY[group.b](first, second).expand_as(grad)
    return cache[f"o{len(rule.groups)}"]


def _operand(name: str, g: torch.Tensor, w: torch.Tensor, moments: Sequence[torch.Tensor], t: int,
             decay_steps: int | None, generator: torch.Generator | None,
             operand: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """The operand ``name``; ``operand`` gives the others it is made of (each computed once per update)."""
    if name in ("m", "v", "y"):  # bias-corrected
        index = "mvy".index(name)
        return moments[index] / (1 - BETAS[index] ** t)
    table: dict[str, Callable[[], torch.Tensor]] = {
        "g": lambda: g, "g2": lambda: g * g, "g3": lambda: g * g * g,
        "sign_g": lambda: torch.sign(g), "sign_m": lambda: torch.sign(operand("m")),
        "1": lambda: torch.ones_like(g), "2": lambda: torch.full_like(g, 2.0),
        "noise": lambda: 0.1 * torch.randn(g.shape, generator=generator, device=g.device, dtype=g.dtype),
        "wd4": lambda: 1e-4 * w, "wd3": lambda: 1e-3 * w, "wd2": lambda: 1e-2 * w, "wd1": lambda: 1e-1 * w,
        "adam": lambda: operand("m") / (torch.sqrt(operand("v")) + EPS),
        "rmsprop": lambda: g / (torch.sqrt(operand("v")) + EPS),
    }
    if name in DECAY_OPERANDS:
        if decay_steps is None:
            raise ValueError(f"the decay operand {name!r} needs decay_steps (its T): pass decay_steps to the optimizer")
        return torch.full_like(g, sign_decay(DECAY_OPERANDS[name], t - 1, decay_steps))
    return table[name]()


def _moments_updated(moments: Sequence[torch.Tensor], grad: torch.Tensor,
                     read: Sequence[bool] = (True, True, True)) -> list[torch.Tensor]:
    """The running averages of g, g², g³ after ``grad`` (pure); those not ``read`` stay as they were."""
    powers = (lambda: grad, lambda: grad * grad, lambda: grad * grad * grad)
    return [beta * moment + (1 - beta) * power() if kept else moment
            for moment, power, beta, kept in zip(moments, powers, BETAS, read)]


def _check_finite(updates: Sequence[torch.Tensor], rule: Rule) -> None:
    # the largest magnitude of each update (NaN if it holds a NaN): one pass over each tensor, no boolean temporaries
    if updates and not bool(torch.isfinite(torch.stack(torch._foreach_norm(list(updates), math.inf))).all()):
        raise InvalidUpdateError(f"the update of rule {rule} is not finite (NaN or infinite); the rule is invalid")


def _check_decay(rule: Rule, decay_steps: int | None, owner: str) -> None:
    if rule.uses_decay and (decay_steps is None or decay_steps < 1):
        raise ValueError(f"{owner}: rule {rule} reads a decay operand and needs decay_steps >= 1 (its T), got "
                         f"{decay_steps}")
    if not rule.uses_decay and decay_steps is not None:
        raise ValueError(f"{owner}: decay_steps is the T of the decay operands ld, cd, rd, and rule {rule} reads "
                         "none; drop decay_steps")


class DSLRule(UpdateRule):
    """A rule of the language as the engine's pure update rule (state: the three moments and the step).

    ``noise`` and the drops draw from the global generator here (the functional rule has no
    generator of its own); :class:`DSLOptimizer` is seeded.

    Example:
        >>> rule = DSLRule(parse("adam"), lr=0.1)
        >>> params = {"w": torch.ones(2)}
        >>> new, state = rule.step(params, {"w": torch.ones(2)}, rule.init(params), StepInfo(0))
        >>> new["w"]                                              # Adam's first step: lr · sign(g)
        tensor([0.9000, 0.9000])
    """

    def __init__(self, rule: Rule | str, lr: float, decay_steps: int | None = None) -> None:
        super().__init__()
        self.rule = parse(rule) if isinstance(rule, str) else rule
        _check_decay(self.rule, decay_steps, "DSLRule")
        self.lr, self.decay_steps = lr, decay_steps

    def init(self, params: Params) -> dict[str, Any]:
        return {"t": 0, "moments": {name: [torch.zeros_like(p) for _ in BETAS] for name, p in params.items()}}

    def step(self, params: Params, grads: Params, state: dict[str, Any], info: StepInfo) -> tuple[Params, Any]:
        t = state["t"] + 1
        moments = {name: _moments_updated(state["moments"][name], grads[name], self.rule.moments_read)
                   for name in params}
        updates = {name: rule_update(self.rule, grads[name], params[name], moments[name], t, self.decay_steps)
                   for name in params}
        _check_finite(list(updates.values()), self.rule)
        return {name: params[name] - self.lr * updates[name] for name in params}, {"t": t, "moments": moments}

    def extra_repr(self) -> str:
        return f"{self.rule}, lr={self.lr}"


class DSLOptimizer(torch.optim.Optimizer):
    """A rule of the language as a ``torch.optim`` optimizer: ``θ ← θ - lr · Δ`` (see the module docs).

    The rule is stored in the parameter groups as its string, so ``state_dict`` pickles; it holds
    the state of the random generator too, so a loaded optimizer draws what the saved one would.

    Args:
        params: parameters or parameter groups.
        rule: a :class:`Rule` or its string.
        lr: λ, the step size.
        decay_steps: T of the decay operands (required by a rule that reads one, refused otherwise).
        seed: seeds the generator of ``noise`` and the drops.

    Raises:
        InvalidUpdateError: from :meth:`step`, when the update is not finite (the parameters are left as they were).
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], rule: Rule | str, lr: float,
                 decay_steps: int | None = None, seed: int = 0) -> None:
        rule = parse(rule) if isinstance(rule, str) else rule
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
            raise ValueError(f"DSLOptimizer: lr must be a finite number >= 0, got {lr!r}")
        _check_decay(rule, decay_steps, "DSLOptimizer")
        super().__init__(params, {"lr": lr, "rule": str(rule), "decay_steps": decay_steps})
        self.seed = seed
        self._rules: dict[str, Rule] = {}
        self._generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["generators"] = {str(device): gen.get_state() for device, gen in self._generators.items()}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        generators = state_dict.pop("generators", {})
        super().load_state_dict(state_dict)
        for device, gen_state in generators.items():
            self._generator(torch.device(device)).set_state(gen_state)

    def _rule(self, text: str) -> Rule:
        if text not in self._rules:
            self._rules[text] = parse(text)
        return self._rules[text]

    @torch.no_grad()
    def step(self, closure: Any = None) -> torch.Tensor | None:
        """One update of every parameter with a gradient; ``closure`` re-evaluates the loss (returned)."""
        loss = closure_loss(closure)
        pending = []
        for group in self.param_groups:
            rule = self._rule(group["rule"])
            updates = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                previous = state["moments"] if "moments" in state else [torch.zeros_like(p) for _ in BETAS]
                moments = _moments_updated(previous, p.grad, rule.moments_read)
                t = state.get("step", 0) + 1
                updates.append((p, rule_update(rule, p.grad, p, moments, t, group["decay_steps"],
                                               self._generator(p.device)), moments, t))
            _check_finite([update for _, update, _, _ in updates], rule)
            pending.extend((p, group["lr"], update, moments, t) for p, update, moments, t in updates)
        for p, lr, update, moments, t in pending:
            self.state[p]["moments"], self.state[p]["step"] = moments, t
            p.sub_(update, alpha=lr)
        return loss
