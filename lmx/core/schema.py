"""Config schemas: each field declared once — default, type, range or choices, whether a resume may change it.

A config file builds its ``ConfigDict`` from a tree whose leaves are :class:`F` declarations (or plain values, which
are declared by their default's type alone)::

    from lmx.core.schema import F, build

    c = build("spa", dict(
        seeds=F((0, 1, 2), each=dict(ge=0, integer=True), nonempty=True),
        rl=dict(env_steps=F(1500, ge=1, integer=True), lr=F(3e-4, gt=0),
                eval_every=F(4, ge=1, integer=True, safe=True),
                whiten=True),
        games=dict(cache_dir=F("", safe=True, doc='"" = <workdir>/games')),
    ))

``build`` returns the ConfigDict of defaults and registers the declarations under the method's name;
:func:`validate` checks a config (after command-line overrides) against them: unknown fields, types, finite
numbers, ranges, choices, each element of a tuple. Errors name the field and say what is allowed. :func:`safe_fields`
lists the fields a resume may change (the launcher's check). Checks that relate several fields stay in the
method's ``validate``. A block declared with :func:`open_block` (a model, a mesh) keeps its own keys unchecked here:
its owner (the model registry, the mesh builder) validates it.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import ml_collections

from lmx.core.config import ConfigError

_REGISTRY: dict[str, dict[str, "F"]] = {}


@dataclasses.dataclass(frozen=True)
class F:
  """A field: its default and what values are valid.

  ``gt``/``ge``/``lt``/``le`` bound a number; ``integer`` asks for a whole number; ``choices`` lists the valid
  values; ``each`` (a dict of these same keywords) checks every element of a tuple; ``nonempty`` refuses an empty
  tuple or string; ``allow_inf`` lets a float be ±inf (never NaN); ``optional`` lets the value be None;
  ``safe`` marks a field a resumed run may change (a cadence, a path, a numerics-neutral implementation choice).
  """
  default: Any
  gt: float | None = None
  ge: float | None = None
  lt: float | None = None
  le: float | None = None
  integer: bool = False
  choices: tuple | None = None
  each: Mapping[str, Any] | None = None
  nonempty: bool = False
  allow_inf: bool = False
  optional: bool = False
  safe: bool = False
  doc: str = ""


@dataclasses.dataclass(frozen=True)
class _Open:
  default: dict
  safe: bool = False
  safe_keys: tuple = ()
  doc: str = ""


def open_block(default: Mapping[str, Any], *, safe: bool = False, safe_keys=(), doc: str = "") -> _Open:
  """A block whose keys are validated by its owner (a model config: the model builder), not by the schema;
  ``safe`` marks the whole block safe to change on resume, ``safe_keys`` some of its keys."""
  return _Open(dict(default), safe, tuple(safe_keys), doc)


def _default(x):
  if isinstance(x, F):
    return x.default
  if isinstance(x, _Open):
    return ml_collections.ConfigDict(x.default)
  if isinstance(x, Mapping):
    return ml_collections.ConfigDict({k: _default(v) for k, v in x.items()})
  return x


def _declare(tree: Mapping[str, Any], prefix: str, out: dict) -> None:
  for k, v in tree.items():
    name = f"{prefix}{k}"
    if isinstance(v, (F, _Open)):
      out[name] = v
    elif isinstance(v, Mapping):
      out[name] = None  # a block: its keys are declared below it
      _declare(v, name + ".", out)
    else:
      out[name] = F(v)


def build(method: str, tree: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """The ConfigDict of ``tree``'s defaults (with ``method`` set), its declarations registered for
  :func:`validate` and :func:`safe_fields`."""
  tree = {"method": method, **tree}
  specs: dict = {}
  _declare(tree, "", specs)
  _REGISTRY[method] = specs
  return _default(tree)


def declared(method: str) -> dict | None:
  """The declarations registered for ``method`` (None when its config file was never built in this process)."""
  return _REGISTRY.get(method)


def block_of(method: str, name: str, *, exclude=(), **defaults) -> dict:
  """The declarations of block ``name`` of ``method``'s config (built in this process), with ``defaults``
  replacing its defaults and the fields in ``exclude`` left out: another config reuses a block declared once
  (e.g. configs/lm.py's ``data``)."""
  prefix = f"{name}."
  fields = {k[len(prefix):]: spec for k, spec in (_REGISTRY.get(method) or {}).items()
            if k.startswith(prefix) and "." not in k[len(prefix):] and k[len(prefix):] not in exclude}
  if not fields:
    raise KeyError(f"{method}'s config declares no block {name!r} (is its config file loaded?)")
  unknown = sorted(set(defaults) - set(fields))
  if unknown:
    raise KeyError(f"{method}'s {name} block has no field(s) {unknown}")
  return {k: dataclasses.replace(spec, default=defaults[k]) if k in defaults else spec for k, spec in fields.items()}


def safe_fields(method: str) -> tuple[str, ...]:
  """Fields a resume may change (``a.b``, or ``a.*`` for a whole block)."""
  out = []
  for name, spec in (_REGISTRY.get(method) or {}).items():
    if isinstance(spec, _Open) and spec.safe:
      out.append(f"{name}.*")
    elif isinstance(spec, _Open):
      out.extend(f"{name}.{k}" for k in spec.safe_keys)
    elif isinstance(spec, F) and spec.safe:
      out.append(name)
  return tuple(out)


def default_of(method: str, field: str):
  """``(True, default)`` of a declared field (``a.b.c``, also inside an open block's defaults), else
  ``(False, None)``."""
  specs = _REGISTRY.get(method) or {}
  spec = specs.get(field)
  if isinstance(spec, F):
    return True, spec.default
  head, _, key = field.rpartition(".")
  block = specs.get(head)
  if isinstance(block, _Open) and key in block.default:
    return True, block.default[key]
  return False, None


def _describe(spec: F | Mapping) -> str:
  get = spec.get if isinstance(spec, Mapping) else (lambda k, d=None: getattr(spec, k, d))
  parts = []
  if get("choices") is not None:
    return f"one of {list(get('choices'))}"
  if get("integer"):
    parts.append("a whole number")
  bounds = [f"{op} {get(k)}" for k, op in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")) if get(k) is not None]
  if bounds:
    parts.append(" and ".join(bounds))
  return " and ".join(parts) or "valid"


def _is_number(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_value(value: Any, field: str, spec: F | Mapping) -> None:
  """ConfigError naming ``field`` unless ``value`` satisfies ``spec`` (an :class:`F` or a dict of its keywords)."""
  get = spec.get if isinstance(spec, Mapping) else (lambda k, d=None: getattr(spec, k, d))
  if value is None:
    if get("optional") or get("default", 0) is None:
      return
    raise ConfigError(f"{field}: must be set (got None)")
  if get("choices") is not None:
    if value not in tuple(get("choices")):
      raise ConfigError(f"{field}: {value!r} is not one of {list(get('choices'))}")
    return
  if get("nonempty") and hasattr(value, "__len__") and len(value) == 0:
    raise ConfigError(f"{field}: must not be empty")
  if isinstance(value, (tuple, list)):
    if get("each") is not None:
      for i, v in enumerate(value):
        check_value(v, f"{field}[{i}]", get("each"))
    return
  if not _is_number(value):
    return
  if isinstance(value, float):
    if math.isnan(value) or (math.isinf(value) and not get("allow_inf")):
      raise ConfigError(f"{field}: must be a finite number, got {value!r}")
  if get("integer") and float(value) != int(value):
    raise ConfigError(f"{field}: must be a whole number, got {value!r}")
  for k, ok in (("gt", lambda b: value > b), ("ge", lambda b: value >= b), ("lt", lambda b: value < b),
                ("le", lambda b: value <= b)):
    b = get(k)
    if b is not None and not ok(b):
      raise ConfigError(f"{field}: must be {_describe(spec)}, got {value!r}")


def _type_ok(value, default) -> bool:
  if default is None or value is None:
    return True
  if isinstance(default, bool):
    return isinstance(value, bool)
  if isinstance(default, int):
    return isinstance(value, int) and not isinstance(value, bool)
  if isinstance(default, float):
    return _is_number(value)
  if isinstance(default, str):
    return isinstance(value, str)
  if isinstance(default, (tuple, list)):
    return isinstance(value, (tuple, list))
  return True


def _type_name(x) -> str:
  return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", tuple: "a tuple",
          list: "a list"}.get(type(x), type(x).__name__)


def validate(config, method: str | None = None) -> None:
  """Checks ``config`` against the declarations of its method (see the module docstring); ConfigError naming the
  first wrong field. A method whose config file was never built in this process is not checked here (its config
  was built by code, e.g. a pretraining stage of another method: the method's own checks still run)."""
  method = method or config.get("method")
  specs = _REGISTRY.get(method)
  if specs is None:
    return
  _check_block(config, "", specs)


def check_block(node, declarations: Mapping[str, Any], prefix: str) -> None:
  """Checks one block (a dict or ConfigDict) against a tree of declarations (as given to :func:`build`), e.g. an
  optimiser block built by code rather than by a config file; ``prefix`` names it in the errors."""
  specs: dict = {}
  _declare(declarations, f"{prefix}.", specs)
  _check_block(node, f"{prefix}.", specs)


def _check_block(node, prefix: str, specs: dict) -> None:
  """Unknown fields, then every declared field present: its type and value. A declared field may be absent (a
  config built by code with a subset of a block's fields; the code that reads it gives the default)."""
  keys = list(node.keys())
  valid = sorted(n[len(prefix):] for n in specs if n.startswith(prefix) and "." not in n[len(prefix):])
  unknown = sorted(k for k in keys if f"{prefix}{k}" not in specs)
  if unknown:
    where = prefix[:-1] or "config"
    raise ConfigError(f"{where}: unknown field(s) {unknown}; valid: {valid}")
  for k in valid:
    name = f"{prefix}{k}"
    spec = specs[name]
    if k not in keys:
      continue
    value = node[k]
    if spec is None:  # a block
      if not hasattr(value, "keys"):
        raise ConfigError(f"{name}: must be a block of fields, got {value!r}")
      _check_block(value, name + ".", specs)
    elif isinstance(spec, _Open):
      if not hasattr(value, "keys"):
        raise ConfigError(f"{name}: must be a block of fields, got {value!r}")
    else:
      check_value(value, name, spec)
      if not _type_ok(value, spec.default):
        raise ConfigError(f"{name}: must be {_type_name(spec.default)}, got {value!r}")
