"""Named random streams: ``rng_stream(seed, "eval_init", net)`` instead of ``seed + 11``.

A stream is identified by (seed, name, *ids). Two calls with the same identity give the same randomness, so two
arms of one comparison share streams on purpose (paired); different names or seeds never collide (the name
enters through a CRC-32 of its bytes, each id through its own ``fold_in``/entropy word, so ``seed + 1`` is not
another stream's ``seed``). ``rng_stream`` gives a JAX key, ``np_stream`` a NumPy ``Generator`` for host-side
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


def _check_ids(ids) -> list[int]:
  out = []
  for i in ids:
    if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)) or int(i) < 0:
      raise ValueError(f"stream ids must be non-negative integers, got {i!r}")
    out.append(int(i))
  return out


def rng_stream(seed: int, name: str, *ids: int) -> jax.Array:
  """A typed JAX key for stream ``name`` and integer ``ids`` (e.g. network, epoch) under ``seed``."""
  key = jax.random.fold_in(jax.random.key(int(seed)), _name_id(name))
  for i in _check_ids(ids):
    key = jax.random.fold_in(key, i)
  return key


def np_stream(seed: int, name: str, *ids: int) -> np.random.Generator:
  """A NumPy generator for stream ``name`` and ``ids`` under ``seed`` (SeedSequence entropy words)."""
  return np.random.default_rng([int(seed), _name_id(name), len(ids), *_check_ids(ids)])
