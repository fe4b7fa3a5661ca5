"""Config helpers: big_vision-style ``get_config(arg)`` variant parsing and validation with field-naming errors.

A config file defines ``get_config(arg=None)``. ``arg`` is what follows ``:`` in ``--config=path.py:arg`` and is
either a bare variant name (``smoke``) or comma-separated ``key=value`` pairs (``variant=smoke,seed=3``), parsed
by :func:`parse_arg` against typed defaults.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Iterable, Mapping

import ml_collections


class ConfigError(ValueError):
  """A config field is wrong. The message names the field and what to do."""


def _convert(key: str, value: str, default: Any) -> Any:
  if isinstance(default, bool):
    low = value.lower()
    if low in ("1", "true", "yes", "t", "y"):
      return True
    if low in ("0", "false", "no", "f", "n", ""):
      return False
    raise ConfigError(f"config arg {key}={value!r}: expected a boolean")
  if isinstance(default, (int, float)):
    try:
      return type(default)(value)
    except ValueError:
      raise ConfigError(f"config arg {key}={value!r}: expected {type(default).__name__}") from None
  return value


def parse_arg(arg: str | None, *, variant: str = "", variants: Iterable[str] | None = None,
              **defaults: Any) -> ml_collections.ConfigDict:
  """Parses ``get_config``'s argument.

  ``"smoke"`` → ``variant="smoke"``; ``"variant=smoke,seed=3"`` → both, typed by ``defaults``.
  ``variants``, when given, lists the valid variant names ("" is the default variant).
  """
  out = dict(variant=variant, **defaults)
  parts = [p.strip() for p in (arg or "").split(",") if p.strip()]
  named = [p for p in parts if "=" not in p] + [p for p in parts if p.split("=")[0].strip() == "variant"]
  if len(named) > 1:
    raise ConfigError(f"config arg {arg!r}: give the variant once")
  for part in parts:
    if "=" not in part:
      out["variant"] = part.strip()
      continue
    key, value = (s.strip() for s in part.split("=", 1))
    if key not in out:
      raise ConfigError(f"config arg {key!r} is unknown; valid args: {sorted(out)}")
    out[key] = _convert(key, value, out[key])
  if variants is not None:
    valid = list(variants)
    if out["variant"] not in valid:
      names = [v or "(default)" for v in valid]
      raise ConfigError(f"unknown config variant {out['variant']!r}; valid variants: {names}")
  return ml_collections.ConfigDict(out)


def require(ok: bool, field: str, message: str) -> None:
  """Raises ConfigError("<field>: <message>") unless ``ok``."""
  if not ok:
    raise ConfigError(f"{field}: {message}")


def check_choice(value: Any, field: str, choices: Iterable[Any]) -> None:
  choices = list(choices)
  require(value in choices, field, f"{value!r} is not one of {choices}")


def check_keys(cfg: Mapping[str, Any] | ml_collections.ConfigDict, field: str, allowed: Iterable[str]) -> None:
  """Raises when ``cfg`` has keys outside ``allowed`` (catches typos in dicts built by hand)."""
  keys = set(cfg.keys())
  unknown = sorted(keys - set(allowed))
  require(not unknown, field, f"unknown field(s) {unknown}; valid: {sorted(allowed)}")


def is_finite_number(value: Any) -> bool:
  """A real number that is neither NaN nor ±inf (ints and bools count; strings and None do not)."""
  return isinstance(value, numbers.Real) and math.isfinite(value)


def finite(value: Any, field: str) -> None:
  """Raises ConfigError unless ``value`` is a finite number: NaN fails every comparison and inf passes ``> 0``,
  so a range check alone lets ``--config.optim.lr=inf`` through to a run that diverges at its first step."""
  require(is_finite_number(value), field, f"must be a finite number, got {value!r}")


def positive(value: Any, field: str) -> None:
  """``value > 0`` and finite (an infinite count, rate or size is never meant)."""
  finite(value, field)
  require(value > 0, field, f"must be > 0, got {value!r}")


finite_positive = positive


def non_negative(value: Any, field: str) -> None:
  """``value >= 0`` and finite."""
  finite(value, field)
  require(value >= 0, field, f"must be >= 0, got {value!r}")


def check_finite_numbers(cfg: Mapping[str, Any] | ml_collections.ConfigDict, prefix: str = "") -> None:
  """Raises ConfigError naming the first float field of ``cfg`` (nested, lists included) that is NaN or ±inf:
  no lmx config means either, and every range check downstream would have to repeat this."""
  items = cfg.items() if hasattr(cfg, "items") else enumerate(cfg)
  for k, v in items:
    field = f"{prefix}{k}"
    if isinstance(v, (Mapping, ml_collections.ConfigDict)):
      check_finite_numbers(v, field + ".")
    elif isinstance(v, (list, tuple)):
      check_finite_numbers(v, field + ".")
    elif isinstance(v, numbers.Real) and not math.isfinite(v):
      raise ConfigError(f"{field}: must be a finite number, got {v!r}")


def load_config_file(spec: str):
  """Loads ``path.py[:arg]`` the way ``--config`` does (for notebooks, tests and error messages)."""
  import importlib.util
  import os

  path, _, arg = spec.partition(":")
  if not os.path.exists(path):
    raise ConfigError(f"config file {path!r} does not exist")
  mod_spec = importlib.util.spec_from_file_location(f"lmx_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(module)
  return module.get_config(arg or None) if arg else module.get_config()
