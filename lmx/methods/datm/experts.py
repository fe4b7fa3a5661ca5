"""Expert trajectories ("buffers"): E networks trained on real data, parameters saved after every epoch.

Paper settings: SGD lr 0.01, momentum 0, weight decay 0, batch 256, DSA on every batch, optionally
FTD's GSAM (ρ = 0.01, α = 0.3, adaptive). Snapshot 0 is the initialisation, snapshot t the parameters after
epoch t, so an expert trained for T epochs has T + 1 snapshots.

The E experts are trained in parallel with ``vmap`` (one jitted step for all of them; each expert has its own
init, data order and augmentation). The buffer is stored as ``buffer.npz`` (one array per parameter leaf with
leading (E, T+1) axes) plus ``meta.json`` describing the model and data, so a buffer can be reused across runs
(``config.experts.dir``) and a mismatched one is refused with a clear message.
"""
from __future__ import annotations

import functools
import json
import os
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from lmx.core import loop, mesh as mesh_lib
from lmx.core.config import ConfigError
from lmx.core.losses import cross_entropy
from lmx.core.metrics import Writer
from lmx.core.workdir import storage_error
from lmx.core.rng import np_stream, rng_stream
from lmx.datasets.images import DataError
from lmx.methods.datm import dsa
from lmx.models import convnet
from lmx.models.registry import build_model

BUFFER_FILE, META_FILE = "buffer.npz", "meta.json"


class ExpertBuffer:
  """Expert parameters, leaves shaped (E, T+1, ...) as numpy arrays, plus a metadata dict."""

  def __init__(self, params: dict, meta: dict):
    self.params = params
    self.meta = meta

  @property
  def num_experts(self) -> int:
    return int(jax.tree.leaves(self.params)[0].shape[0])

  @property
  def num_epochs(self) -> int:
    """T: the number of training epochs (snapshots 0..T)."""
    return int(jax.tree.leaves(self.params)[0].shape[1]) - 1

  def snapshot(self, expert: int, epoch: int):
    """Parameters of ``expert`` after ``epoch`` epochs (a pytree of numpy arrays)."""
    return jax.tree.map(lambda a: a[expert, epoch], self.params)

  def final(self):
    """All experts' final parameters, leaves (E, ...)."""
    return jax.tree.map(lambda a: a[:, -1], self.params)


def _flatten_tree(tree: dict, prefix: str = "") -> dict:
  """Nested dicts to ``{"a/b": leaf}``, leaves (arrays or ShapeDtypeStructs) kept as they are."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten_tree(v, f"{prefix}{k}/"))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _flatten(tree: dict) -> dict[str, np.ndarray]:
  return {k: np.asarray(v) for k, v in _flatten_tree(tree).items()}


def _unflatten(flat: dict[str, np.ndarray]) -> dict:
  out: dict = {}
  for key, v in flat.items():
    node = out
    parts = key.split("/")
    for p in parts[:-1]:
      node = node.setdefault(p, {})
    node[parts[-1]] = v
  return out


def _tmp_name(name: str) -> str:
  """A hidden name without the .npz/.json ending, so that a half-written file never passes for a buffer."""
  return f".{name}.partial"


def _fsync_dir(directory: str) -> None:
  try:
    fd = os.open(directory, os.O_RDONLY)
  except OSError:  # not every platform/filesystem opens directories
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def save_buffer(directory: str, buf: ExpertBuffer) -> None:
  """Writes buffer.npz and meta.json atomically as a pair.

  Both files are written in full (and fsynced) under temp names first; then an old meta.json is removed, the
  buffer renamed into place and meta.json renamed last. A crash at any point leaves the old pair, the new pair or
  a buffer.npz without meta.json (which :func:`buffer_exists` does not count as a buffer), never a new buffer
  with an old meta.json. The temp names (``.buffer.npz.partial``, ``.meta.json.partial``) are hidden and do not
  end in .npz/.json. A write that fails for the file system's reasons (disk full, quota, a path too long) raises
  one :class:`lmx.core.workdir.StorageError` naming the directory and the cause.
  """
  try:
    _write_pair(directory, buf)
  except OSError as e:
    failed = storage_error(e, "cannot write the expert buffer in", directory)
    if failed is None:
      raise
    raise failed from None


def _write_pair(directory: str, buf: ExpertBuffer) -> None:
  """:func:`save_buffer`'s writes, with the OS's own errors."""
  os.makedirs(directory, exist_ok=True)
  final = {n: os.path.join(directory, n) for n in (BUFFER_FILE, META_FILE)}
  tmp = {n: os.path.join(directory, _tmp_name(n)) for n in (BUFFER_FILE, META_FILE)}
  try:
    with open(tmp[BUFFER_FILE], "wb") as f:  # a file object: np.savez would append ".npz" to a name
      np.savez(f, **_flatten(buf.params))
      f.flush()
      os.fsync(f.fileno())
    with open(tmp[META_FILE], "w") as f:
      json.dump(buf.meta, f, indent=1)
      f.flush()
      os.fsync(f.fileno())
    if os.path.exists(final[META_FILE]):
      os.remove(final[META_FILE])  # from here on the directory holds no readable pair until the last rename
    os.replace(tmp[BUFFER_FILE], final[BUFFER_FILE])
    os.replace(tmp[META_FILE], final[META_FILE])
    _fsync_dir(directory)
  finally:
    for t in tmp.values():  # after a failed write: no partial file is left behind
      if os.path.exists(t):
        os.remove(t)


def buffer_exists(directory: Optional[str]) -> bool:
  """Whether ``directory`` holds a buffer (buffer.npz and meta.json; readable or not)."""
  return bool(directory) and os.path.exists(os.path.join(directory, BUFFER_FILE)) and os.path.exists(
      os.path.join(directory, META_FILE))


def expected_meta(config, image_shape, num_classes) -> dict[str, Any]:
  """What a buffer must match to be usable with ``config``."""
  return {"dataset": config.data.dataset, "zca": bool(config.data.zca), "image_shape": list(image_shape),
          "num_classes": int(num_classes), "depth": int(config.model.depth), "width": int(config.model.width),
          "norm": config.model.norm}


# The config field behind each key of expected_meta (image_shape and num_classes follow from data.dataset).
_META_FIELDS = {"dataset": "data.dataset", "zca": "data.zca", "depth": "model.depth", "width": "model.width",
                "norm": "model.norm"}
SOURCES = ("experts.dir", "workdir")


class CorruptBufferError(DataError):
  """An expert buffer whose files exist but cannot be read (truncated, garbage, inconsistent leaves).

  ``directory`` is the buffer's directory, ``path`` the file that failed and ``reason`` ``"<ErrorType>: <first line
  of the error>"``; ``source`` says whose buffer it is (``experts.dir`` or ``workdir``).
  """

  def __init__(self, message: str, *, directory: str, path: str, reason: str, source: str):
    super().__init__(message)
    self.directory, self.path, self.reason, self.source = directory, path, reason, source


def _reason(e: BaseException) -> str:
  lines = str(e).strip().splitlines()
  text = lines[0][:200] if lines else ""
  return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _corrupt(directory: str, path: str, reason: str, source: str) -> CorruptBufferError:
  if source == "workdir":
    msg = (f"the expert buffer in {directory}: {path} cannot be read ({reason}); move {directory} away to train "
           "new experts")
  else:
    msg = (f"experts.dir={directory!r}: {path} cannot be read ({reason}); re-create the buffer (a run with "
           "experts.dir empty trains one into <workdir>/experts) or leave experts.dir empty to train new experts")
  return CorruptBufferError(msg, directory=directory, path=path, reason=reason, source=source)


def _read_meta(directory: str, source: str) -> dict:
  path = os.path.join(directory, META_FILE)
  try:
    with open(path, encoding="utf-8") as f:
      meta = json.load(f)
  except (OSError, ValueError) as e:  # ValueError: json.JSONDecodeError, UnicodeDecodeError
    raise _corrupt(directory, path, _reason(e), source) from None
  if not isinstance(meta, dict):
    raise _corrupt(directory, path, f"a JSON {type(meta).__name__}, not an object", source)
  return meta


def _read_params(directory: str, source: str) -> dict[str, np.ndarray]:
  path = os.path.join(directory, BUFFER_FILE)
  try:
    z = np.load(path, allow_pickle=False)
    if not isinstance(z, np.lib.npyio.NpzFile):
      raise ValueError("a single .npy array, not an .npz archive")
    with z:
      flat = {k: np.asarray(z[k]) for k in z.files}  # z[k] decompresses and CRC-checks each member
  except Exception as e:  # noqa: BLE001 - BadZipFile, EOFError, zlib.error, ValueError, KeyError, OSError, ...
    raise _corrupt(directory, path, _reason(e), source) from None
  return flat


def _check_leaves(flat: dict[str, np.ndarray], meta: dict, like: Optional[dict], directory: str,
                  source: str) -> None:
  """Every leaf is (E, T+1, ...) with the same E and T (those of meta.json when it records them) and, with
  ``like`` (a pytree of the model's parameter shapes), the model's shapes after the two leading axes."""
  path = os.path.join(directory, BUFFER_FILE)
  if not flat:
    raise _corrupt(directory, path, "no arrays in the archive", source)
  leads = {v.shape[:2] if v.ndim >= 2 else v.shape for v in flat.values()}
  lead = next(iter(leads))
  if len(leads) != 1 or len(lead) != 2 or 0 in lead:
    raise _corrupt(directory, path, f"leaves without common (experts, epochs+1) leading axes: {sorted(leads)[:3]}",
                   source)
  recorded = (meta.get("num_experts"), meta.get("epochs"))
  if all(isinstance(r, int) for r in recorded) and lead != (recorded[0], recorded[1] + 1):
    raise _corrupt(directory, path, f"leaves of {lead[0]} experts x {lead[1]} snapshots but {META_FILE} records "
                   f"{recorded[0]} experts x {recorded[1]} epochs", source)
  if like is None:
    return
  want = {k: tuple(np.shape(v)) for k, v in _flatten_tree(like).items()}
  missing, extra = sorted(set(want) - set(flat)), sorted(set(flat) - set(want))
  shapes = [f"{k} {flat[k].shape[2:]} != {want[k]}" for k in sorted(set(want) & set(flat))
            if tuple(flat[k].shape[2:]) != want[k]]
  if missing or extra or shapes:
    parts = ([f"missing {missing[:3]}"] if missing else []) + ([f"unexpected {extra[:3]}"] if extra else []) + \
        shapes[:3]
    raise _corrupt(directory, path, "leaves do not fit the model: " + "; ".join(parts), source)


def _mismatch(meta: dict, expect: dict[str, Any]) -> str:
  """``model.width=16 but the config asks for 32; ...`` for every key where the buffer differs."""
  parts = []
  for k, v in expect.items():
    if meta.get(k) != v:
      field = _META_FIELDS.get(k, k)
      parts.append(f"{field}={meta.get(k)!r} but the config asks for {v!r}")
  return "; ".join(parts)


def load_buffer(directory: str, expect: dict[str, Any], *, min_epochs: int, min_experts: int = 1,
                source: str = "experts.dir", like: Optional[dict] = None) -> ExpertBuffer:
  """Loads a buffer and checks it against ``expect`` (and, with ``like``, the model's parameter shapes).

  ``source`` says where the buffer came from, so that every message names what the user can change:
  ``"experts.dir"`` (a buffer the user pointed at) or ``"workdir"`` (the run's own ``<workdir>/experts``).
  Raises ConfigError for a buffer that does not fit the config, and :class:`CorruptBufferError` (a DataError)
  for files that cannot be read; never a numpy/zipfile/json traceback.
  """
  if source not in SOURCES:
    raise ValueError(f"load_buffer: source={source!r}, expected one of {SOURCES}")
  own = source == "workdir"
  where = f"the expert buffer in {directory}" if own else f"experts.dir={directory!r}: the expert buffer"
  if not buffer_exists(directory):
    if own:
      raise ConfigError(f"{directory}: no expert buffer ({BUFFER_FILE} + {META_FILE}) there")
    raise ConfigError(f"experts.dir={directory!r}: no expert buffer ({BUFFER_FILE} + {META_FILE}) there; "
                      "leave experts.dir empty to train experts into the workdir")
  meta = _read_meta(directory, source)
  lacking = [k for k in expect if k not in meta]
  if lacking:
    raise _corrupt(directory, os.path.join(directory, META_FILE), f"no {', '.join(lacking)} recorded", source)
  diff = _mismatch(meta, expect)
  if diff:
    fix = ("use a new --workdir for another model (or point experts.dir at a matching buffer)" if own else
           "point experts.dir at a matching buffer or leave it empty to train new experts")
    raise ConfigError(f"{where} was trained with {diff}: {fix}")
  flat = _read_params(directory, source)
  _check_leaves(flat, meta, like, directory, source)
  buf = ExpertBuffer(_unflatten(flat), meta)
  if buf.num_epochs < min_epochs:
    fix = ("use a new --workdir to train longer experts (or point experts.dir at a longer buffer)" if own else
           "point experts.dir at longer experts or leave it empty to train new ones (experts.epochs)")
    raise ConfigError(f"{where} has experts of {buf.num_epochs} epochs but the window needs max_start_epoch - 1 + "
                      f"expert_epochs = {min_epochs}: {fix}")
  if buf.num_experts < min_experts:
    fix = "use a new --workdir" if own else "point experts.dir at a buffer with more experts"
    raise ConfigError(f"{where} has {buf.num_experts} experts but {min_experts} are needed: {fix}")
  return buf


def move_aside(directory: str, root: str) -> str:
  """Moves an unreadable buffer ``directory`` to ``root/<unix-time>`` (kept for inspection, never deleted) and
  returns where it went; a second move within the same second gets a ``-1``, ``-2``, ... suffix."""
  os.makedirs(root, exist_ok=True)
  base = os.path.join(root, str(int(time.time())))
  dst, n = base, 0
  while os.path.exists(dst):
    n += 1
    dst = f"{base}-{n}"
  os.rename(directory, dst)
  return dst


# ----------------------------------------------------------------------------------------------- training


def gsam_grad(loss_fn: Callable, params, *, rho: float, alpha: float, adaptive: bool = True):
  """FTD's GSAM gradient: g′ − α·(g − proj_{g′} g) with g′ taken at the ascent point."""
  loss, g = jax.value_and_grad(loss_fn)(params)
  if adaptive:
    scaled = jax.tree.map(lambda w, gi: jnp.abs(w) * gi, params, g)
    norm = jnp.sqrt(sum(jnp.sum(jnp.square(s)) for s in jax.tree.leaves(scaled)))
    e = jax.tree.map(lambda w, gi: rho * gi * jnp.square(w) / (norm + 1e-12), params, g)
  else:
    norm = jnp.sqrt(sum(jnp.sum(jnp.square(gi)) for gi in jax.tree.leaves(g)))
    e = jax.tree.map(lambda gi: rho * gi / (norm + 1e-12), g)
  g2 = jax.grad(loss_fn)(jax.tree.map(jnp.add, params, e))
  dot = sum(jnp.sum(a * b) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g2)))
  n2 = sum(jnp.sum(jnp.square(b)) for b in jax.tree.leaves(g2))
  coef = dot / (n2 + 1e-12)
  final = jax.tree.map(lambda gi, g2i: g2i - alpha * (gi - coef * g2i), g, g2)
  return loss, final


def map_stacked(fn: Callable, in_axes: tuple, use_vmap: bool) -> Callable:
  """``jax.vmap(fn, in_axes)``, or the same mapping as an unrolled loop inside one jit.

  On XLA:CPU a vmapped convolution with per-network weights becomes a grouped convolution, slower
  than running the networks one after the other; on accelerators vmap is the better choice.
  """
  if use_vmap:
    return jax.vmap(fn, in_axes=in_axes)

  def looped(*args):
    n = next(jax.tree.leaves(a)[0].shape[0] for a, ax in zip(args, in_axes) if ax == 0)
    outs = [fn(*[jax.tree.map(lambda v: v[i], a) if ax == 0 else a for a, ax in zip(args, in_axes)])
            for i in range(n)]
    return jax.tree.map(lambda *o: jnp.stack(o), *outs)
  return looped


def make_sgd(*, lr: float, momentum: float, weight_decay: float, gsam: bool = False, rho: float = 0.01,
             gsam_alpha: float = 0.3, apply_fn: Callable | None = None, use_vmap: bool = True):
  """The experts' SGD step for E networks at once on augmented batches:
  ``(params_E, mom_E, xb_EB, y_all, idx_EB, mask_EB) -> (params_E, mom_E, loss_E)``.

  The loss is cross-entropy over the valid (mask = 1) examples of each padded batch; weight decay enters the
  gradient before the momentum (torch.optim.SGD).
  """
  apply_fn = apply_fn or convnet.apply_with("auto")

  def one(params, mom, xb, y_all, idx_B, mask_B):
    loss_fn = lambda p: cross_entropy(apply_fn(p, xb), y_all[idx_B], mask_B)
    if gsam:
      loss, g = gsam_grad(loss_fn, params, rho=rho, alpha=gsam_alpha)
    else:
      loss, g = jax.value_and_grad(loss_fn)(params)
    g = jax.tree.map(lambda gi, p: gi + weight_decay * p, g, params) if weight_decay else g
    if momentum:
      mom = jax.tree.map(lambda m, gi: momentum * m + gi, mom, g)
      g = mom
    return jax.tree.map(lambda p, gi: p - lr * gi, params, g), mom, loss

  return map_stacked(one, (0, 0, 0, None, 0, 0), use_vmap)


class NetBatches:
  """Data source for K networks trained side by side, epoch after epoch (the shared loop's ``data``).

  Network k's minibatch order in epoch e comes from ``order_rng(k, e)`` (:func:`epoch_batches`: every image
  once, the last batch padded and masked); its augmentation keys from ``keys_fn(e, steps) -> (steps, K)``. The
  augmentation runs here, as its own jitted call (``dsa.augment_batches``: traced into the SGD step XLA:CPU
  recomputes it). Batches: ``xb`` (K, B, H, W, C), ``idx`` and ``mask`` (K, B). Position: ``{"epoch", "step"}``.
  """

  def __init__(self, x_all, *, num_nets: int, batch: int, order_rng: Callable, keys_fn: Callable,
               strategy: tuple[str, ...]):
    self.x_all, self.k, self.n = x_all, int(num_nets), int(x_all.shape[0])
    self.batch, self.order_rng, self.keys_fn, self.strategy = min(int(batch), self.n), order_rng, keys_fn, strategy
    self.steps_per_epoch = -(-self.n // self.batch)
    self.epoch, self.step, self._cached = 0, 0, None

  def __iter__(self):
    return self

  def _epoch(self, ep: int):
    if self._cached is None or self._cached[0] != ep:
      bm = [epoch_batches(self.order_rng(k, ep), self.n, self.batch) for k in range(self.k)]
      idx_KSB, mask_KSB = np.stack([b[0] for b in bm]), np.stack([b[1] for b in bm])
      self._cached = (ep, idx_KSB, mask_KSB, self.keys_fn(ep, self.steps_per_epoch))
    return self._cached[1:]

  def __next__(self):
    idx_KSB, mask_KSB, keys_SK = self._epoch(self.epoch)
    s = self.step
    out = {"xb": dsa.augment_batches(keys_SK[s], self.x_all, idx_KSB[:, s], self.strategy), "idx": idx_KSB[:, s],
           "mask": mask_KSB[:, s]}
    self.step += 1
    if self.step == self.steps_per_epoch:
      self.epoch, self.step = self.epoch + 1, 0
    return out

  def get_state(self) -> dict:
    return {"epoch": self.epoch, "step": self.step}

  def set_state(self, state: dict) -> None:
    self.epoch, self.step = int(state["epoch"]), int(state["step"])


def train_nets(*, sgd: Callable, params_K, targets, data: NetBatches, epochs: int, lr: float,
               drop_epoch: int | None = None, hooks=(), writer=None, name: str = "nets", seed: int = 0,
               progress_desc: str | None = None):
  """Trains K stacked networks for ``epochs`` epochs on the shared loop; returns the final state
  ``{"params", "mom"}``.

  ``sgd(params, mom, xb, targets, idx, mask, lr) -> (params, mom, loss)`` is one step of all K networks;
  ``targets`` (labels or soft targets of the whole training set) is a frozen input. With ``drop_epoch`` the
  learning rate is ×0.1 from that epoch on and the momentum buffer is reset there (the evaluation protocol).
  Checkpoints are off (these trainings are short and restart from their seed's streams); the loss is logged
  every epoch under ``<name>/`` without a console line.
  """
  spe = data.steps_per_epoch

  def step(state, frozen, batch, rng):
    del rng
    mom, cur_lr = state["mom"], lr
    if drop_epoch is not None:
      at = state["step"] == drop_epoch * spe
      mom = jax.tree.map(lambda m: jnp.where(at, jnp.zeros_like(m), m), mom)
      cur_lr = jnp.where(state["step"] >= drop_epoch * spe, jnp.float32(lr * 0.1), jnp.float32(lr))
    params, mom, loss = sgd(state["params"], mom, batch["xb"], frozen["targets"], batch["idx"], batch["mask"],
                            cur_lr)
    return dict(state, params=params, mom=mom), {"loss": jnp.mean(loss)}

  mesh = mesh_lib.make_mesh({"data": -1}, devices=jax.devices()[:1])
  init = {"params": params_K, "mom": jax.tree.map(jnp.zeros_like, params_K)}
  res = loop.Loop(step_fn=step, init_fn=lambda key: init, frozen={"targets": targets}, data=data, mesh=mesh,
                  workdir="", total_steps=epochs * spe, seed=seed, hooks=hooks, ckpt_every=0,
                  writer=writer if writer is not None else Writer("", enabled=False), log_every=spe,
                  log_prefix=f"{name}/", log_console=False, nan_patience=2 ** 30, finite_keys=("loss",),
                  desc=progress_desc or name).run()
  return res.state


def epoch_batches(rng: np.random.Generator, n: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
  """One epoch of shuffled indices (steps, batch) with a validity mask; the last batch is padded (no drop)."""
  steps = -(-n // batch)
  perm = rng.permutation(n)
  idx = np.zeros(steps * batch, np.int32)
  idx[:n] = perm
  mask = np.zeros(steps * batch, np.float32)
  mask[:n] = 1.0
  return idx.reshape(steps, batch), mask.reshape(steps, batch)


@functools.lru_cache(maxsize=16)
def _chunk_forward(apply_fn: Callable, argmax: bool):
  """One jitted forward of an (experts chunk × images chunk) block: vmap over the experts, shared images."""
  def fwd(p, x):
    out = apply_fn(p, x)
    return jnp.argmax(out, -1).astype(jnp.int32) if argmax else out
  return jax.jit(jax.vmap(fwd, in_axes=(0, None)))


def _pad_to(a: np.ndarray, n: int) -> np.ndarray:
  """``a`` with its leading axis padded to ``n`` by repeating its first row (a valid input, results dropped)."""
  if a.shape[0] == n:
    return a
  return np.concatenate([a, np.repeat(a[:1], n - a.shape[0], axis=0)], axis=0)


def forward_chunked(apply_fn: Callable, params_E, x_NHWC, *, expert_chunk: int, image_chunk: int,
                    argmax: bool = False) -> np.ndarray:
  """Outputs of E stacked networks on N images, ``expert_chunk`` networks × ``image_chunk`` images at a time.

  Returns host arrays: logits (E, N, classes), or with ``argmax`` the predicted classes (E, N) int32. Every
  call of the jitted block has the same shape (``min(expert_chunk, E)`` × ``min(image_chunk, N)``; the last chunk
  of each axis is padded and its padding dropped), so it compiles once and the device holds one block's
  activations at a time instead of E × N (for 100 width-128 ConvNets on 10,000 CIFAR images: ~1 TB).
  """
  params_E = jax.tree.map(np.asarray, params_E)
  e_all = int(jax.tree.leaves(params_E)[0].shape[0])
  x_NHWC = np.asarray(x_NHWC)
  n_all = int(x_NHWC.shape[0])
  ec, ic = min(int(expert_chunk), e_all), min(int(image_chunk), n_all)
  fwd = _chunk_forward(apply_fn, bool(argmax))
  rows = []
  for e0 in range(0, e_all, ec):
    p = jax.tree.map(lambda a: jnp.asarray(_pad_to(a[e0:e0 + ec], ec)), params_E)
    ne = min(ec, e_all - e0)
    cols = []
    for s in range(0, n_all, ic):
      xb = _pad_to(x_NHWC[s:s + ic], ic)
      cols.append(np.asarray(fwd(p, jnp.asarray(xb)))[:ne, :min(ic, n_all - s)])
    rows.append(np.concatenate(cols, axis=1))
  return np.concatenate(rows, axis=0)


def accuracy(params_E, x_NHWC, y_N, apply_fn: Callable | None = None, chunk: int = 1000,
             expert_chunk: int = 10) -> np.ndarray:
  """Test accuracy of each of E stacked networks (:func:`forward_chunked` over ``expert_chunk`` networks ×
  ``chunk`` images)."""
  pred_EN = forward_chunked(apply_fn or convnet.apply_with("auto"), params_E, x_NHWC, expert_chunk=expert_chunk,
                            image_chunk=chunk, argmax=True)
  return (pred_EN == np.asarray(y_N)[None]).sum(1) / len(x_NHWC)


def train_experts(seed: int, data, config, *, writer=None) -> ExpertBuffer:
  """Trains ``config.experts.num`` experts for ``config.experts.epochs`` epochs, ``config.experts.parallel`` at a
  time in one jitted step (vmap, or an unrolled loop with ``experts.vmap=False``), and returns the buffer
  (snapshots after every epoch)."""
  ec, mc = config.experts, config.model
  strategy = dsa.parse_strategy(config.data.dsa_strategy) if ec.dsa else ()
  model = build_model(mc, image_shape=data.image_shape, num_classes=data.num_classes)
  apply_fn = model.apply
  sgd = make_sgd(lr=ec.lr, momentum=ec.momentum, weight_decay=ec.weight_decay, gsam=ec.gsam, rho=ec.gsam_rho,
                 gsam_alpha=ec.gsam_alpha, apply_fn=apply_fn, use_vmap=ec.vmap)
  x_all, y_all = jnp.asarray(data.x_train_NHWC), jnp.asarray(data.y_train_N)
  init = jax.jit(jax.vmap(model.init))
  chunks, t0 = [], time.time()
  for start in range(0, ec.num, ec.parallel):
    ids = list(range(start, min(start + ec.parallel, ec.num)))
    params = init(jnp.stack([rng_stream(seed, "expert_init", e) for e in ids]))
    snaps = [jax.device_get(params)]
    batches = NetBatches(
        x_all, num_nets=len(ids), batch=ec.batch, strategy=strategy,
        order_rng=lambda k, ep, ids=ids: np_stream(seed, "expert_order", ids[k], ep),
        keys_fn=lambda ep, steps, ids=ids: jnp.stack(
            [jax.random.split(rng_stream(seed, "expert_dsa", e, ep), steps) for e in ids], axis=1))

    def snapshot(step, state, writer, ids=ids, snaps=snaps):  # the trajectory: parameters after every epoch
      snaps.append(jax.device_get(state["params"]))

    train_nets(sgd=lambda p, m, xb, y, i, k, lr: sgd(p, m, xb, y, i, k), params_K=params, targets=y_all,
               data=batches, epochs=ec.epochs, lr=ec.lr, writer=writer, name="experts", seed=seed,
               hooks=[loop.every(batches.steps_per_epoch, snapshot)],
               progress_desc=f"experts {ids[0]}-{ids[-1]}")
    chunks.append(jax.tree.map(lambda *a: np.stack(a, axis=1), *snaps))  # (E_chunk, T+1, ...)
  params = jax.tree.map(lambda *a: np.concatenate(a, 0), *chunks)
  buf = ExpertBuffer(params, {})
  acc = accuracy(buf.final(), data.x_test_NHWC, data.y_test_N, apply_fn, chunk=ec.fwd_chunk_images,
                 expert_chunk=ec.fwd_chunk_experts)
  buf.meta = {**expected_meta(config, data.image_shape, data.num_classes), "num_experts": ec.num,
              "epochs": ec.epochs, "lr": ec.lr, "batch": ec.batch, "gsam": bool(ec.gsam), "seed": seed,
              "final_test_acc": [float(a) for a in acc], "train_seconds": time.time() - t0}
  return buf
