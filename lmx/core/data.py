"""Grain input pipelines with checkpointable state, and global batches for a device mesh.

The pipeline is ``source → shuffle(seed) → repeat → map → per-process slice → batch``. Global batch ``k`` is
stream items ``[k·B, (k+1)·B)`` of the seeded, per-epoch reshuffled stream, whatever the number of processes, so
data order is a pure function of (seed, step). The iterator's position is saved in every checkpoint.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import grain
import jax
import numpy as np

from lmx.core.config import ConfigError


def process_share(source: Sequence[Any], global_batch: int, process_index: int | None = None,
                  process_count: int | None = None) -> tuple[int, int]:
  """``(process index, process count)`` (jax's unless given), after checking that the global batch splits evenly
  over the processes and that ``source`` is not empty (ConfigError otherwise)."""
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  if global_batch % pc:
    raise ConfigError(f"global batch {global_batch} is not divisible by the process count {pc}")
  if len(source) == 0:
    raise ConfigError("the data source is empty")
  return pi, pc


def make_dataset(source: Sequence[Any], *, global_batch: int, seed: int, transform: Callable | None = None,
                 shuffle: bool = True, num_epochs: int | None = None, process_index: int | None = None,
                 process_count: int | None = None, drop_remainder: bool = True) -> grain.MapDataset:
  """Builds the per-process batched ``MapDataset`` (random access; ``len`` may be huge when repeating)."""
  pi, pc = process_share(source, global_batch, process_index, process_count)
  ds = grain.MapDataset.source(source)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(num_epochs)
  if transform is not None:
    ds = ds.map(transform)
  if pc > 1:
    ds = ds[pi::pc]
  return ds.batch(global_batch // pc, drop_remainder=drop_remainder)


def _worker_ignores_signals(worker_index: int, worker_count: int) -> None:
  """Grain worker init: Ctrl-C reaches the whole process group, but stopping is the main process's job (it
  checkpoints the data position, then shuts the workers down), so workers ignore SIGINT and SIGTERM."""
  import signal

  del worker_index, worker_count
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  signal.signal(signal.SIGTERM, signal.SIG_IGN)


def make_iterator(ds: grain.MapDataset, *, worker_count: int = 0) -> grain.DatasetIterator:
  """A checkpointable iterator (``get_state``/``set_state``); worker processes when ``worker_count > 0``."""
  it_ds = ds.to_iter_dataset()
  if worker_count > 0:
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count),
                              worker_init_fn=_worker_ignores_signals)
  return iter(it_ds)


class GlobalBatches:
  """Wraps a per-process Grain iterator; yields global ``jax.Array`` batches sharded over the mesh.

  ``.iterator`` is the Grain iterator to checkpoint (its state is this object's position).
  """

  def __init__(self, iterator: grain.DatasetIterator, sharding: jax.sharding.NamedSharding):
    self.iterator = iterator
    self.sharding = sharding

  def __iter__(self) -> Iterator[Any]:
    return self

  def __next__(self):
    local = next(self.iterator)
    return jax.tree.map(self._globalize, local)

  def _globalize(self, x):
    x = np.asarray(x)
    spec = tuple(self.sharding.spec) + (None,) * (x.ndim - len(self.sharding.spec))
    sharding = jax.sharding.NamedSharding(self.sharding.mesh, jax.sharding.PartitionSpec(*spec[: x.ndim]))
    global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
    return jax.make_array_from_process_local_data(sharding, x, global_shape)

  def get_state(self):
    return self.iterator.get_state()

  def set_state(self, state):
    self.iterator.set_state(state)


class ArrayBatches:
  """Minibatches of in-memory arrays (a dict of ``[N, ...]`` NumPy arrays) for :class:`lmx.core.loop.Loop`.

  Batch ``k`` is a pure function of ``(seed, name, k)``: ``replace=True`` draws ``batch`` rows uniformly with
  replacement from ``np_stream(seed, name, k)``; ``replace=False`` walks epochs, each a fresh permutation from
  ``np_stream(seed, name, epoch)`` (the last partial batch of an epoch is dropped). The position is the JSON
  state the loop checkpoints, so a resumed stage sees the same batches. ``sharding`` places each batch on a mesh
  (default: host arrays, which the jitted step copies to its device).
  """

  def __init__(self, arrays: dict, batch: int, *, seed: int, name: str, replace: bool = True, sharding=None):
    from lmx.core.rng import np_stream

    sizes = {k: len(v) for k, v in arrays.items()}
    if not arrays or len(set(sizes.values())) != 1:
      raise ValueError(f"ArrayBatches needs arrays with one common first dimension, got {sizes}")
    self.arrays, self.batch, self.seed, self.name = arrays, int(batch), int(seed), name
    self.n = next(iter(sizes.values()))
    if self.n == 0:
      raise ConfigError(f"no data to train on ({name}: 0 rows)")
    if not replace and self.batch > self.n:
      raise ConfigError(f"{name}: batch {self.batch} is larger than the {self.n} rows of one epoch")
    self.replace, self.sharding, self.k = replace, sharding, 0
    self._np_stream = np_stream
    self._perm = (None, None)

  def indices(self, k: int) -> np.ndarray:
    if self.replace:
      return self._np_stream(self.seed, self.name, k).integers(0, self.n, size=self.batch)
    per_epoch = self.n // self.batch
    epoch, j = divmod(k, per_epoch)
    if self._perm[0] != epoch:
      self._perm = (epoch, self._np_stream(self.seed, self.name, epoch).permutation(self.n))
    return self._perm[1][j * self.batch:(j + 1) * self.batch]

  def __iter__(self):
    return self

  def __next__(self):
    idx = self.indices(self.k)
    self.k += 1
    out = {key: v[idx] for key, v in self.arrays.items()}
    return out if self.sharding is None else jax.device_put(out, self.sharding)

  def get_state(self) -> dict:
    return {"k": self.k}

  def set_state(self, state: dict) -> None:
    self.k = int(state["k"])
