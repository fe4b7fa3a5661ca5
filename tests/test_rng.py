"""Named random streams: reproducible, distinct across names, ids and seeds (no ``seed + 11`` collisions), bad
seeds and ids refused. References: the derivation re-written with raw ``jax.random``/``zlib``/NumPy calls, and
exhaustive distinctness over a grid of neighbouring seeds, names and ids."""
import itertools
import zlib

import jax
import numpy as np
import pytest

from lmx.core.rng import np_stream, rng_stream

NAMES = ("eval", "eval_init", "eval_order", "train", "init", "step", "expert_init", "expert_order")
SEEDS = range(24)
IDS = ((), (0,), (1,), (2,), (11,), (12,), (0, 0), (0, 1), (1, 0), (3, 7))


def _bits(key) -> tuple[int, ...]:
  return tuple(int(x) for x in np.asarray(jax.random.key_data(key)).ravel())


def _ref_key(seed, name, *ids):
  """The documented derivation, spelled with raw jax.random calls: fold the name's CRC-32, then each id."""
  key = jax.random.fold_in(jax.random.key(seed), zlib.crc32(name.encode()))
  for i in ids:
    key = jax.random.fold_in(key, i)
  return key


def test_rng_stream_is_the_documented_derivation_and_reproducible():
  for seed, name, ids in [(0, "eval", ()), (3, "eval_init", (2,)), (7, "expert_dsa", (4, 9))]:
    assert _bits(rng_stream(seed, name, *ids)) == _bits(_ref_key(seed, name, *ids))
    assert _bits(rng_stream(seed, name, *ids)) == _bits(rng_stream(seed, name, *ids))
    # NumPy integer ids and seeds name the same stream as Python ints (config values, loop counters).
    assert _bits(rng_stream(np.int64(seed), name, *map(np.int32, ids))) == _bits(rng_stream(seed, name, *ids))
  draw = lambda: np.asarray(jax.random.normal(rng_stream(5, "eval", 1), (8,)))  # noqa: E731
  np.testing.assert_array_equal(draw(), draw())


def _distinct_on_the_grid(fingerprint) -> dict:
  """Asserts that every (seed, name, ids) of the grid gives its own fingerprint; returns {fingerprint: where}."""
  seen = {}
  for seed, name, ids in itertools.product(SEEDS, NAMES, IDS):
    f = fingerprint(seed, name, *ids)
    assert f not in seen, f"{(seed, name, ids)} collides with {seen[f]}"
    seen[f] = (seed, name, ids)
  return seen


def test_rng_streams_never_collide_across_neighbouring_seeds_names_and_ids():
  """The bug these streams replace: ``seed + 11`` (eval) under seed 1 was ``seed + 12`` (another stream) under
  seed 0. Every (seed, name, ids) on a grid of neighbouring values must be its own stream."""
  seen = _distinct_on_the_grid(lambda *a: _bits(rng_stream(*a)))
  # In particular the next seed's eval stream is not this seed's, and no stream is a plain offset seed key.
  for seed in SEEDS:
    assert _bits(rng_stream(seed + 1, "eval")) != _bits(rng_stream(seed, "eval"))
  plain = {_bits(jax.random.key(s)) for s in range(64)}
  assert not plain & set(seen)


def _first_draws(gen) -> tuple[int, ...]:
  return tuple(int(x) for x in gen.integers(0, 2**63 - 1, size=2))


def test_np_stream_is_the_documented_derivation_and_reproducible():
  for seed, name, ids in [(0, "eval_order", ()), (3, "start_epoch", (2,)), (7, "expert_order", (4, 9))]:
    ref = np.random.default_rng([seed, zlib.crc32(name.encode()), len(ids), *ids])
    assert _first_draws(np_stream(seed, name, *ids)) == _first_draws(ref)
    np.testing.assert_array_equal(np_stream(seed, name, *ids).permutation(50),
                                  np_stream(seed, name, *ids).permutation(50))


def test_np_streams_never_collide_across_neighbouring_seeds_names_and_ids():
  _distinct_on_the_grid(lambda *a: _first_draws(np_stream(*a)))
  # SeedSequence zero-pads short entropy ([s, n] == [s, n, 0]); a trailing id 0 must still be another stream.
  for seed in SEEDS:
    assert _first_draws(np_stream(seed, "eval")) != _first_draws(np_stream(seed, "eval", 0))
    assert _first_draws(np_stream(seed, "eval", 1)) != _first_draws(np_stream(seed, "eval", 1, 0))
    assert _first_draws(np_stream(seed + 1, "eval")) != _first_draws(np_stream(seed, "eval"))


@pytest.mark.parametrize("stream", [rng_stream, np_stream], ids=["rng_stream", "np_stream"])
@pytest.mark.parametrize("bad_id", [-1, True, np.bool_(False), 1.0, np.float32(2), "3", None, 2**32])
def test_bad_ids_raise(stream, bad_id):
  with pytest.raises(ValueError, match="ids must be integers"):
    stream(0, "eval", 1, bad_id)


@pytest.mark.parametrize("stream", [rng_stream, np_stream], ids=["rng_stream", "np_stream"])
@pytest.mark.parametrize("bad_seed", [-1, 2**32, 2**32 + 1, True, 0.5])
def test_bad_seeds_raise(stream, bad_seed):
  """A JAX key keeps 32 bits of its seed: ``key(2**32 + 1)`` is ``key(1)`` and ``key(-1)`` is ``key(2**32 - 1)``,
  so such seeds would silently share another seed's streams."""
  with pytest.raises(ValueError, match="seeds must be integers"):
    stream(bad_seed, "eval")


@pytest.mark.parametrize("stream", [rng_stream, np_stream], ids=["rng_stream", "np_stream"])
@pytest.mark.parametrize("bad_name", ["", 3, None])
def test_bad_names_raise(stream, bad_name):
  with pytest.raises(ValueError, match="non-empty string name"):
    stream(0, bad_name)
