"""Named random streams: ``rng_stream(seed, "eval_init", net)`` instead of ``seed + 11``.

A stream is identified by (seed, name, *ids). Two calls with the same identity give the same randomness, so two
arms of one comparison share streams on purpose (paired); different names or seeds never collide (the name
enters through a CRC-32 of its bytes, each id through its own ``fold_in``/entropy word, so ``seed + 1`` is not
another stream's ``seed``). Seeds and ids are integers in ``[0, 2**32)``: a JAX key keeps a seed's low 32 bits
only (``key(2**32 + 1)`` is ``key(1)``, ``key(-1)`` is ``key(2**32 - 1)``), so anything outside would silently
share another seed's stream. ``rng_stream`` gives a JAX key, ``np_stream`` a NumPy ``Generator`` for host-side
sampling (data order, subsets, schedules).
"""
from __future__ import annotations

import zlib

import jax
import numpy as np


def _name_id(name: str) -> int:
  if not isinstance(name, str) or not name:
    raise ValueError(f"a random stream needs a non-empty string name, got {name!r}")
  return zlib.crc32(name.encode("utf-8"))


_LIMIT = 2**32  # JAX keys and fold_in keep 32 bits of a seed or id


def _check_int(x, what: str) -> int:
  if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)) or not 0 <= int(x) < _LIMIT:
    raise ValueError(f"random stream {what} must be integers in [0, 2**32), got {x!r}")
  return int(x)


def _check_ids(ids) -> list[int]:
  return [_check_int(i, "ids") for i in ids]


def rng_stream(seed: int, name: str, *ids: int) -> jax.Array:
  """A typed JAX key for stream ``name`` and integer ``ids`` (e.g. network, epoch) under ``seed``."""
  key = jax.random.fold_in(jax.random.key(_check_int(seed, "seeds")), _name_id(name))
  for i in _check_ids(ids):
    key = jax.random.fold_in(key, i)
  return key


def np_stream(seed: int, name: str, *ids: int) -> np.random.Generator:
  """A NumPy generator for stream ``name`` and ``ids`` under ``seed`` (SeedSequence entropy words)."""
  # The id count is an entropy word of its own: SeedSequence zero-pads short entropy, so [s, n] would equal
  # [s, n, 0] (a call with one more id, 0) without it.
  return np.random.default_rng([_check_int(seed, "seeds"), _name_id(name), len(ids), *_check_ids(ids)])
