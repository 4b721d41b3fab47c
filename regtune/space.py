"""Hyperparameter declarations and the search-space vocabulary, as plain data.

Two things live here:

* ``HParam``: one hyperparameter of a method, a task or the training loop, with
  its default, its allowed range and a one-line meaning. ``validate_config``
  checks a whole config against the declarations and fails with a message that
  names the key, the value and what is allowed (``ConfigError``).
* Search domains (``LogUniform``, ``Uniform``, ``IntUniform``, ``Choice``): the
  default ranges a method declares next to its hyperparameters. They carry no
  Ray dependency; ``trainables`` turns them into ``ray.tune`` domains.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping


class ConfigError(ValueError):
    """A config key or value that is not allowed. The message is one line."""


# --------------------------------------------------------------------------
# search domains
@dataclass(frozen=True)
class LogUniform:
    low: float
    high: float


@dataclass(frozen=True)
class Uniform:
    low: float
    high: float


@dataclass(frozen=True)
class IntUniform:
    low: int
    high: int  # inclusive
    log: bool = False


@dataclass(frozen=True)
class Choice:
    values: tuple


Domain = LogUniform | Uniform | IntUniform | Choice


def domain_values_ok(domain: Domain, hp: "HParam") -> None:
    """Check that every value a domain can produce is allowed by ``hp``."""
    if isinstance(domain, Choice):
        for v in domain.values:
            hp.validate(v)
    else:
        hp.validate(domain.low)
        hp.validate(domain.high)


# --------------------------------------------------------------------------
# hyperparameter declarations
@dataclass(frozen=True)
class HParam:
    """One named hyperparameter.

    ``kind`` is one of ``float``, ``int``, ``str``, ``bool``, ``tuple``.
    ``low``/``high`` bound numbers; ``low_open``/``high_open`` make a bound
    exclusive. ``choices`` restricts strings (or any value). ``nullable`` allows
    ``None``.
    """

    name: str
    default: Any
    doc: str
    kind: type = float
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple | None = None
    nullable: bool = False

    def allowed(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.kind is bool:
            return "true or false"
        if self.kind is tuple:
            return "a list of numbers" + self._range_text(" each")
        text = f"{'an integer' if self.kind is int else 'a number'}" + self._range_text("")
        return text + (" or null" if self.nullable else "")

    def _range_text(self, each: str) -> str:
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        return (each + " " + " and ".join(parts)) if parts else ""

    def _fail(self, value: Any) -> ConfigError:
        return ConfigError(f"{self.name}={value!r} is not allowed: expected {self.allowed()}")

    def _check_number(self, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self._fail(value)
        if not math.isfinite(value):
            raise self._fail(value)
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            raise self._fail(value)
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            raise self._fail(value)
        return value

    def validate(self, value: Any) -> Any:
        """Return the value in canonical form, or raise ``ConfigError``."""
        if value is None:
            if self.nullable:
                return None
            raise self._fail(value)
        if self.choices is not None:
            if value not in self.choices:
                raise self._fail(value)
            return value
        if self.kind is bool:
            if not isinstance(value, bool):
                raise self._fail(value)
            return value
        if self.kind is str:
            if not isinstance(value, str):
                raise self._fail(value)
            return value
        if self.kind is tuple:
            if not isinstance(value, (list, tuple)):
                raise self._fail(value)
            try:
                return tuple(float(self._check_number(v)) for v in value)
            except ConfigError:
                raise self._fail(value) from None
        if self.kind is int:
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if not isinstance(value, int) or isinstance(value, bool):
                raise self._fail(value)
            return int(self._check_number(value))
        return float(self._check_number(value))


def suggest(key: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def validate_config(
    config: Mapping[str, Any],
    hparams: Mapping[str, HParam],
    where: str,
) -> dict[str, Any]:
    """Fill defaults and validate every key of ``config`` against ``hparams``.

    Unknown keys are an error (never silently ignored). ``where`` names the
    owner in the message, e.g. ``"method 'adamcpr' on task 'grokking'"``.
    """
    out: dict[str, Any] = {}
    for key, value in config.items():
        if key not in hparams:
            allowed = ", ".join(sorted(hparams))
            raise ConfigError(
                f"unknown hyperparameter {key!r}={value!r} for {where}{suggest(key, hparams)};"
                f" allowed keys: {allowed}"
            )
        out[key] = hparams[key].validate(value)
    for name, hp in hparams.items():
        if name not in out:
            out[name] = hp.default
    return out
