"""Reward functions for GRPO: built-ins, any callable by dotted path, several with weights.

A reward function is `fn(prompt, completion, **fields) -> float`: `prompt` as the record gave it (a
string or a message list), `completion` the decoded new tokens (eos removed), `fields` the record's
other fields (e.g. `answer`). `grpo.reward` names one or a list:

    exact_match            completion.strip() == answer.strip()                       (correctness)
    numeric_match          the last number in the completion equals float(answer)      (correctness)
    math_verify            math-verify's parse + verify of answer vs completion        (correctness)
    regex:<pattern>        1 when the stripped completion fully matches <pattern> (a format reward)
    my_pkg.rewards:fn      any importable callable (also my_pkg.rewards.fn)

`grpo.reward_weights` weighs them (default 1 each); the reward of a completion is the weighted sum.
`accuracy` is the mean of the first correctness reward (built-ins above, or a callable with the
attribute `correctness = True`). Errors name the function and the record: a name that does not
import, a record without a field a function requires, a function that raises or returns a non-number.
"""

from __future__ import annotations

import importlib
import inspect
import math
import numbers
import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


def exact_match(prompt: Any, completion: str, answer: Any) -> float:
    return float(completion.strip() == str(answer).strip())


def numeric_match(prompt: Any, completion: str, answer: Any) -> float:
    numbers = _NUMBER.findall(completion.replace(",", ""))
    if not numbers:
        return 0.0
    return float(math.isclose(float(numbers[-1]), float(answer), rel_tol=1e-6, abs_tol=1e-9))


def math_verify(prompt: Any, completion: str, answer: Any) -> float:
    try:
        from math_verify import parse, verify
    except ImportError as err:
        raise ImportError("grpo.reward=math_verify needs the math-verify package: pip install "
                          "'twinpipe[rl]' (or math-verify)") from err
    return float(verify(parse(str(answer)), parse(completion)))


for _fn in (exact_match, numeric_match, math_verify):
    _fn.correctness = True
BUILTIN = {"exact_match": exact_match, "numeric_match": numeric_match, "math_verify": math_verify}


def _regex(pattern: str) -> Callable:
    compiled = re.compile(pattern, re.DOTALL)

    def regex(prompt: Any, completion: str) -> float:
        return float(compiled.fullmatch(completion.strip()) is not None)

    return regex


def resolve(name: str) -> Callable:
    """The reward function `name` (see the module docstring); ValueError naming it when it is none."""
    if name in BUILTIN:
        return BUILTIN[name]
    if name.startswith("regex:"):
        try:
            return _regex(name[len("regex:"):])
        except re.error as err:
            raise ValueError(f"grpo.reward={name}: not a valid regular expression ({err})") from err
    module, sep, attr = name.partition(":") if ":" in name else name.rpartition(".")
    if not sep or not module or not attr:
        raise ValueError(f"grpo.reward={name}: allowed {', '.join(BUILTIN)}, regex:<pattern> or a dotted "
                         "path module:function")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"grpo.reward={name}: cannot import it ({err})") from err
    if not callable(fn):
        raise ValueError(f"grpo.reward={name}: {type(fn).__name__} is not callable")
    return fn


def required_fields(fn: Callable) -> list[str]:
    """Keyword parameters after (prompt, completion) without a default: fields each record must have."""
    params = list(inspect.signature(fn).parameters.values())[2:]
    return [p.name for p in params if p.default is p.empty
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _accepted(fn: Callable, fields: dict[str, Any]) -> dict[str, Any]:
    """The fields `fn` takes: all of them with **kwargs, else those it names."""
    params = list(inspect.signature(fn).parameters.values())[2:]
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return fields
    return {p.name: fields[p.name] for p in params if p.name in fields}


@dataclass
class Rewards:
    """The weighted reward functions of a recipe."""

    names: list[str]
    fns: list[Callable]
    weights: list[float]

    @classmethod
    def from_config(cls, reward: str | Sequence[str], weights: Sequence[float] = ()) -> "Rewards":
        names = [reward] if isinstance(reward, str) else list(reward)
        if not names:
            raise ValueError("grpo.reward=[]: name at least one reward function")
        weights = list(weights) or [1.0] * len(names)
        if len(weights) != len(names):
            raise ValueError(f"grpo.reward_weights={weights}: one weight per grpo.reward ({len(names)})")
        return cls(names, [resolve(n) for n in names], [float(w) for w in weights])

    @property
    def correctness(self) -> int | None:
        """Index of the first correctness reward (for `accuracy`), or None."""
        return next((i for i, fn in enumerate(self.fns) if getattr(fn, "correctness", False)), None)

    def check_fields(self, where: str, fields: dict[str, Any]) -> None:
        """Raise ValueError naming the record and the function when a required field is missing."""
        for name, fn in zip(self.names, self.fns):
            missing = [f for f in required_fields(fn) if f not in fields]
            if missing:
                raise ValueError(f"{where}: grpo.reward {name} needs the field {missing[0]!r}; the record "
                                 f"has {sorted(fields)}")

    def score(self, prompt: Any, completion: str, fields: dict[str, Any], where: str) -> list[float]:
        """Each function's reward of one completion."""
        out = []
        for name, fn in zip(self.names, self.fns):
            try:
                value = fn(prompt, completion, **_accepted(fn, fields))
            except Exception as err:
                raise ValueError(f"grpo.reward {name} raised {type(err).__name__}: {err} (on {where}, "
                                 f"completion {completion[:60]!r})") from err
            if not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"grpo.reward {name} returned {value!r} on {where}: a reward must be a "
                                 "finite number")
            out.append(float(value))
        return out

    def total(self, scores: Sequence[float]) -> float:
        return sum(w * s for w, s in zip(self.weights, scores))
