"""Orbax checkpoints: state + Grain iterator state + config, saved together, async, keep-N.

``Checkpointer.restore`` restores the newest checkpoint that reads back cleanly onto the shardings of the given
abstract state (so a different mesh works). A partial or corrupt newest checkpoint is reported in one warning
line, moved aside to ``<dir>_corrupt/`` (never deleted) and the previous good one is used; files a crash leaves
missing are found before Orbax reads anything. When checkpoints existed but none can be restored, restoring stops
with :class:`NoRestorableCheckpointError` unless the caller allows a fresh start. A complete checkpoint whose
state has a different layout (other keys or shapes: written by another version of the code or another config) is
not corruption: restoring stops with :class:`CheckpointMismatchError`, naming the differences, and touches
nothing. A save that fails for the file system's reasons (disk full, quota, a path too long) raises one
:class:`lmx.core.workdir.StorageError` naming the directory and the cause, from ``save``, ``wait`` or ``close``
(whichever first sees the asynchronous failure), and Orbax's tracebacks of it are not logged.

Restore also verifies what it read, since bytes that changed on disk can decode silently to other numbers: every
save writes a ``checksums`` item (per state leaf: dtype, shape, a 64-bit checksum of its bits computed on device,
whether it was finite), and a restored leaf that differs, or is NaN/Inf where the saved one was finite, makes the
checkpoint corrupt as above. A checkpoint written before checksums existed still restores; its floating leaves
must be finite. The checkpoint directory is checked when the :class:`Checkpointer` opens (a file in its place, no
write permission, or a path too long for the files inside it, is reported at once rather than when the first save
times out).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from lmx.core import interrupt
from lmx.core.config import ConfigError
from lmx.core.results import jsonable
from lmx.core.workdir import (STORAGE_CAUSES, StorageError, check_path_room, check_writable_dir, storage_errno,
                              storage_error)


class CheckpointMismatchError(ConfigError):
  """The workdir holds a readable checkpoint of a differently shaped state (other code version or config)."""


class NoRestorableCheckpointError(ConfigError):
  """Checkpoints were written but none reads back; starting over needs the user's consent."""


class CorruptCheckpointError(ConfigError):
  """A checkpoint read back other values than were saved (its checksums differ, or a finite leaf is NaN/Inf)."""


CHECKSUMS_ITEM = "checksums"
# Orbax's deepest file below the checkpoint directory, while a step is committed, with room to spare:
# "<step>.orbax-checkpoint-tmp-<time>/state.orbax-checkpoint-tmp-<time>/ocdbt.process_<n>/d/<32 hex digits>".
CHECKPOINT_PATH_ROOM = 160
_CHECKSUM_DTYPES = ("float32", "float16", "bfloat16", "float64", "int8", "int16", "int32", "int64", "uint8",
                    "uint16", "uint32", "uint64", "bool")


def _words(x, xp):
  """The bits of ``x`` as uint32 words (``xp``: numpy or jax.numpy); 8-byte elements give two words each, the
  low one first, so a leaf shaped ``(..., )`` gives words shaped ``(..., 2)``."""
  dt = np.dtype(x.dtype)
  if dt == np.bool_:
    x, dt = x.astype(xp.uint8), np.dtype(np.uint8)
  bits = {1: xp.uint8, 2: xp.uint16, 4: xp.uint32, 8: xp.uint32}[dt.itemsize]
  if xp is np:
    u = np.ascontiguousarray(x).view(bits)
    return u.reshape(np.shape(x) + ((2,) if dt.itemsize == 8 else ())).astype(np.uint32)
  return jax.lax.bitcast_convert_type(x, bits).astype(jnp.uint32)


def _fmix32(h, xp):
  """MurmurHash3's finaliser on uint32 words: every input bit affects every output bit."""
  h = h ^ (h >> 16)
  h = h * xp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * xp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _checksum_terms(x, xp):
  """``(h1, h2, finite)`` of one array: two uint32 sums over its words ``u_i`` at flat index ``i``
  (``h1 = Σ u_i·(2i+1)``, ``h2 = Σ fmix32(u_i ^ i·φ)``, all mod 2^32) and whether it is all finite. Integer
  sums are exact in any order, so the result does not depend on the array's sharding; one changed word always
  changes ``h1``. The numpy and the jax paths give the same numbers."""
  finite = xp.all(xp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.floating) else xp.bool_(True)
  u = _words(x, xp)
  if xp is np:  # flat, at least 1-d (numpy scalars would warn on the intended uint32 wrap-around)
    u = u.reshape(-1)
    idx = np.arange(u.size, dtype=np.uint64).astype(np.uint32)
  else:  # the flat C-order index from per-axis iotas: a sharded array is not reshaped (no resharding)
    idx, stride = jnp.zeros(u.shape, jnp.uint32), 1
    for axis in range(u.ndim - 1, -1, -1):
      idx = idx + jax.lax.broadcasted_iota(jnp.uint32, u.shape, axis) * jnp.uint32(stride % 2**32)
      stride *= u.shape[axis]
  h1 = xp.sum(u * (idx * xp.uint32(2) + xp.uint32(1)), dtype=xp.uint32)
  h2 = xp.sum(_fmix32(u ^ (idx * xp.uint32(0x9E3779B9)), xp), dtype=xp.uint32)
  return h1, h2, finite


_checksum_on_device = jax.jit(lambda x: _checksum_terms(x, jnp))


def _host_scalar(x):
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(x.addressable_shards[0].data)
  return np.asarray(x)


def checksums(tree) -> dict[str, dict]:
  """``{"params/w": {"dtype", "shape", "checksum": [h1, h2] or None, "finite"}}`` of a pytree of arrays.

  Device arrays are summed where they live (one small jitted reduction per leaf; every process of a pod takes
  part, as for the save itself), host arrays with numpy by the same formula; leaves of other dtypes get no
  checksum. Keys follow Orbax's flattening (as in the saved metadata).
  """
  out, pending = {}, {}
  for path, leaf in ocp.tree.to_flat_dict(tree).items():
    if leaf is None or not hasattr(leaf, "dtype") and not isinstance(leaf, (int, float, bool)):
      continue
    key = "/".join(str(k) for k in path)
    is_device = isinstance(leaf, jax.Array)
    arr = leaf if is_device else np.asarray(leaf)
    entry = {"dtype": str(np.dtype(arr.dtype)), "shape": list(np.shape(arr)), "checksum": None, "finite": None}
    out[key] = entry
    if entry["dtype"] not in _CHECKSUM_DTYPES:
      continue
    try:
      pending[key] = _checksum_on_device(arr) if is_device else _checksum_terms(arr, np)
    except Exception:  # noqa: BLE001 - an array this cannot sum (an unusual layout): no checksum for it
      pass
  for key, (h1, h2, finite) in pending.items():
    out[key]["checksum"] = [int(_host_scalar(h1)), int(_host_scalar(h2))]
    out[key]["finite"] = bool(_host_scalar(finite))
  return out


def verify(restored, saved: dict | None) -> str | None:
  """Why ``restored`` is not what was saved (``saved``: the :func:`checksums` written with it, or None for a
  checkpoint that has none), or None. Leaves whose dtype or shape differ from the saved ones are not compared
  (a restore may cast); without ``saved``, floating leaves must be finite."""
  got = checksums(restored)
  if saved is None:
    bad = [k for k, v in got.items() if v["finite"] is False]
    return f"{bad[0]} holds NaN/Inf values (a checkpoint without checksums)" if bad else None
  for key, want in saved.items():
    have = got.get(key)
    if have is None or (want.get("dtype"), want.get("shape")) != (have["dtype"], have["shape"]):
      continue
    if want.get("finite") and have["finite"] is False:
      return f"{key} holds NaN/Inf values but was finite when saved: its data files changed on disk"
    if want.get("checksum") and have["checksum"] and want["checksum"] != have["checksum"]:
      return f"{key} does not match the checksum written with it: its data files changed on disk"
  return None


def _reason(err: Exception) -> str:
  """``Type: first line`` of an error, without TensorStore's spec dump (the part a reader does not need)."""
  lines = str(err).strip().splitlines()
  first = lines[0] if lines else ""
  first = first.split(" [tensorstore_spec=")[0].split(" [source locations=")[0]
  return f"{type(err).__name__}: {first}" if first else type(err).__name__


def incomplete_reason(step_dir: str) -> str | None:
  """Why ``step_dir`` is not a complete checkpoint (a file a crash leaves missing), or None when it looks whole.

  Reads only small metadata files and the OCDBT key listing, so a broken checkpoint is recognised without an
  Orbax restore (whose failed reads leave asynchronous callbacks printing tracebacks after the fact).
  """
  if "://" in step_dir:
    return None
  state = os.path.join(step_dir, "state")
  for need in ("_CHECKPOINT_METADATA", "state/_METADATA"):
    if not os.path.isfile(os.path.join(step_dir, need)):
      return f"{need} is missing"
  try:
    with open(os.path.join(state, "_METADATA")) as f:
      meta = json.load(f)
    names = [".".join(str(k["key"]) for k in v["key_metadata"]) for v in meta["tree_metadata"].values()
             if v.get("value_metadata", {}).get("value_type") in ("jax.Array", "np.ndarray")
             and not v.get("value_metadata", {}).get("skip_deserialize", False)]
  except (OSError, ValueError, KeyError, TypeError) as e:
    return f"state/_METADATA is unreadable ({_reason(e)})"
  if not meta.get("use_ocdbt", True):
    return None
  if not os.path.isfile(os.path.join(state, "manifest.ocdbt")):
    return "state/manifest.ocdbt is missing"
  for sub in sorted(os.listdir(state)):
    if sub.startswith("ocdbt.process_") and not os.path.isfile(os.path.join(state, sub, "manifest.ocdbt")):
      return f"state/{sub}/manifest.ocdbt is missing"
  try:
    import tensorstore as ts

    # A kvstore spec, not a file:// URL: a path with '#', '?' or '%' would be read as a URL's fragment, query or
    # escape and name another directory.
    base = {"driver": "file", "path": os.path.abspath(state) + "/"}
    kv = ts.KvStore.open({"driver": "ocdbt", "base": base}).result()
    keys = {k.decode() for k in kv.list().result()}
  except Exception as e:  # noqa: BLE001 - any failure to list means the database is unreadable
    return f"state's OCDBT database is unreadable ({_reason(e)})"
  missing = [n for n in names if f"{n}/.zarray" not in keys and f"{n}/zarr.json" not in keys]
  if missing:
    return f"{len(missing)} of {len(names)} arrays are missing from state (first: {missing[0]})"
  return None


def abstract_like(tree, shardings=None):
  """ShapeDtypeStructs (with shardings) describing ``tree``; the restore target."""
  if shardings is None:
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None)), tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, shardings)


class Checkpointer:
  """One Orbax ``CheckpointManager`` per run.

  Items: ``state`` (any pytree of arrays), ``data`` (a Grain iterator, optional), ``config`` (JSON).
  """

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True, save_interval_steps: int = 1):
    self.directory = directory if "://" in directory else os.path.abspath(directory)
    check_path_room(self.directory, CHECKPOINT_PATH_ROOM, f"cannot write checkpoints in {self.directory}")
    check_writable_dir(self.directory)
    _quiet_orbax()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=save_interval_steps, enable_async_checkpointing=async_save,
        create=True)
    self._mngr = ocp.CheckpointManager(self.directory, options=options)
    self._failed: StorageError | None = None

  def _probe(self) -> None:
    """Makes and removes a directory where the save will make its own: a full disk fails here, at once, rather
    than in Orbax's directory creation (after which its other threads wait minutes for a signal that never
    comes)."""
    if "://" in self.directory or jax.process_index() != 0:
      return
    probe = os.path.join(self.directory, f".lmx-probe-{os.getpid()}")
    os.makedirs(probe, exist_ok=True)
    os.rmdir(probe)

  def _storage(self, err: BaseException) -> StorageError | None:
    """``err`` as a :class:`StorageError` about this directory, or None for other errors."""
    failed = storage_error(err, "cannot write a checkpoint in", self.directory)
    self._failed = self._failed or failed
    return failed

  # -- save ------------------------------------------------------------------------------------------------
  def save(self, step: int, state: Any, *, data_iter=None, config=None, force: bool = False) -> bool:
    """Starts saving (asynchronously); returns whether a save was started at this step."""
    import grain

    if not force and not self._mngr.should_save(int(step)):
      return False
    items = {"state": ocp.args.StandardSave(state), CHECKSUMS_ITEM: ocp.args.JsonSave({"leaves": checksums(state)})}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    if config is not None:
      cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
      items["config"] = ocp.args.JsonSave(jsonable(cfg))
    try:
      self._probe()
      return self._mngr.save(int(step), args=ocp.args.Composite(**items), force=force)
    except Exception as e:  # noqa: BLE001 - this save's, or the previous asynchronous one's, failure
      failed = self._storage(e)
      if failed is None:
        raise
      raise failed from None

  # -- restore ---------------------------------------------------------------------------------------------
  def all_steps(self) -> list[int]:
    self._mngr.reload()
    return sorted(self._mngr.all_steps())

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def quarantined(self) -> list[str]:
    """Checkpoints moved aside as unreadable (``<dir>_corrupt/<step>-<time>``)."""
    root = self.directory.rstrip("/") + "_corrupt"
    return sorted(os.listdir(root)) if "://" not in root and os.path.isdir(root) else []

  def restore(self, abstract_state: Any, *, data_iter=None, step: int | None = None,
              allow_fresh_start: bool = False):
    """Restores ``(step, state)`` (and the iterator in place), or returns ``None`` when there is none.

    ``abstract_state``: a pytree of ``jax.ShapeDtypeStruct`` with shardings (see :func:`abstract_like`), or of
    arrays whose shardings are reused. Tries the newest step first; one that fails to read is moved aside. When
    none reads back (now, or in an earlier run that moved them all aside) this raises
    :class:`NoRestorableCheckpointError`, unless ``allow_fresh_start`` (then it warns and returns ``None``).
    """
    import grain

    target = jax.tree.map(
        lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else jax.ShapeDtypeStruct(
            np.shape(x), x.dtype, sharding=getattr(x, "sharding", None)), abstract_state)
    saved = self.all_steps()
    if step is not None and step not in saved:
      raise FileNotFoundError(f"no checkpoint at step {step} in {self.directory}; saved steps: {saved}")
    steps = [step] if step is not None else saved[::-1]
    for s in steps:
      reason = incomplete_reason(os.path.join(self.directory, str(s)))
      if reason is None:
        self._check_layout(s, target)
        items = {"state": ocp.args.StandardRestore(target)}
        if data_iter is not None:
          items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        try:
          out = self._mngr.restore(s, args=ocp.args.Composite(**items))
          _check_finite_structure(out["state"], target)
          reason = verify(out["state"], self._saved_checksums(s))
          if reason is None:
            return s, out["state"]
        except CorruptCheckpointError as e:
          reason = str(e)
        except Exception as e:  # noqa: BLE001 - any read failure means this step is unusable
          if step is not None:
            raise
          reason = _reason(e)
        if step is not None:
          raise CorruptCheckpointError(f"checkpoint at step {step} in {self.directory} is corrupt ({reason})")
      elif step is not None:
        raise ConfigError(f"checkpoint at step {step} in {self.directory} is incomplete ({reason})")
      self._quarantine(s, reason)
    if steps or self.quarantined():
      where = f"{self.directory.rstrip('/')}_corrupt/"
      msg = (f"no checkpoint in {self.directory} can be restored (the unreadable ones are kept in {where})")
      if not allow_fresh_start:
        raise NoRestorableCheckpointError(
            f"{msg}: rerun with --allow_fresh_start to start this run again from step 0 in the same workdir, or "
            "use a new --workdir")
      _warn(f"{msg}; starting from step 0 (--allow_fresh_start)")
    return None

  def restore_subset(self, target: Any, *, step: int | None = None):
    """Restores part of a saved state: ``target`` is a dict tree of ``ShapeDtypeStruct`` (with the shardings to
    restore onto, e.g. another mesh) naming the subtrees to read, e.g. ``{"params": abstract_params}``; the rest
    of the checkpoint (optimiser moments, method extras) is not read. Returns ``(step, subtree)``.

    Raises :class:`CheckpointMismatchError` when the saved subtree has other keys or shapes, and
    ``FileNotFoundError`` when there is no checkpoint (or not that step).
    """
    steps = self.all_steps()
    if step is None and not steps:
      raise FileNotFoundError(f"no checkpoint in {self.directory}: point at a run that has saved one")
    step = steps[-1] if step is None else int(step)
    if step not in steps:
      raise FileNotFoundError(f"no checkpoint at step {step} in {self.directory}; saved steps: {steps}")
    target = abstract_like(target) if not all(
        isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(target)) else target
    self._check_layout(step, target, subset=True)
    path = os.path.join(self.directory, str(step), "state")
    out = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))
    _check_finite_structure(out, target)
    try:
      reason = verify(out, self._saved_checksums(step))
    except CorruptCheckpointError as e:
      reason = str(e)
    if reason is not None:
      raise CorruptCheckpointError(f"checkpoint at step {step} in {self.directory} is corrupt ({reason}); "
                                   "restore another step or re-create it")
    return step, out

  def _saved_checksums(self, step: int) -> dict | None:
    """The :func:`checksums` saved with ``step``, or None when it has none (written before they existed).
    Raises :class:`CorruptCheckpointError` when the item is there but unreadable."""
    from etils import epath

    if not (epath.Path(self.directory) / str(step) / CHECKSUMS_ITEM).exists():
      return None
    try:
      rec = self._mngr.restore(step, args=ocp.args.Composite(**{CHECKSUMS_ITEM: ocp.args.JsonRestore()}))
      leaves = rec[CHECKSUMS_ITEM]["leaves"]
      if not isinstance(leaves, dict):
        raise TypeError(f"leaves is a {type(leaves).__name__}")
      return leaves
    except Exception as e:  # noqa: BLE001
      raise CorruptCheckpointError(f"its {CHECKSUMS_ITEM} item is unreadable ({_reason(e)})") from None

  def _check_layout(self, step: int, target: Any, subset: bool = False) -> None:
    """Raises :class:`CheckpointMismatchError` if ``step``'s saved state has other keys or shapes than ``target``.

    Reads only Orbax's metadata. Unreadable metadata is left to ``restore`` (a partial write: quarantined).
    """
    try:
      from etils import epath

      meta = ocp.StandardCheckpointHandler().metadata(epath.Path(self.directory) / str(step) / "state")
      saved = _layout(getattr(meta, "tree", meta))
    except Exception:  # noqa: BLE001
      return
    if not saved:
      return
    want = _layout(target)
    missing = sorted(set(want) - set(saved))
    unexpected = [] if subset else sorted(set(saved) - set(want))
    shapes = [f"{k}: saved {saved[k]}, expected {want[k]}" for k in sorted(set(want) & set(saved))
              if saved[k] is not None and saved[k] != want[k]]
    if not (missing or unexpected or shapes):
      return
    parts = ([f"missing {', '.join(missing[:5])}"] if missing else []) + \
            ([f"unexpected {', '.join(unexpected[:5])}"] if unexpected else []) + shapes[:5]
    raise CheckpointMismatchError(
        f"the checkpoint at step {step} in {self.directory} holds a differently laid out state "
        f"({'; '.join(parts)}): it was written by another version of lmx or another config. Resume it with the "
        f"code and config that wrote it, or start afresh in a new --workdir (the checkpoint was left untouched)")

  def _quarantine(self, step: int, reason: str) -> None:
    src = os.path.join(self.directory, str(step))
    dst_root = self.directory.rstrip("/") + "_corrupt"
    msg = f"checkpoint at step {step} in {self.directory} could not be restored ({reason}); "
    if jax.process_index() == 0 and os.path.isdir(src):
      os.makedirs(dst_root, exist_ok=True)
      dst = os.path.join(dst_root, f"{step}-{int(time.time())}")
      shutil.move(src, dst)
      msg += f"moved it to {dst} (kept, not deleted)"
    else:
      msg += "skipping it"
    _warn(msg)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices(f"lmx_quarantine_{step}")
    self._mngr.reload()

  def restore_config(self, step: int | None = None) -> dict | None:
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    try:
      return self._mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    except Exception:  # noqa: BLE001
      return None

  def wait(self) -> None:
    """Blocks until async saves are finished (call before exiting or reading the directory)."""
    try:
      self._mngr.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      failed = self._storage(e)
      if failed is None:
        raise
      raise failed from None

  def close(self) -> None:
    """Waits for pending saves and closes; after a :class:`StorageError` already raised, or a second Ctrl-C,
    closing adds no error of its own."""
    failed = self._failed
    try:
      try:
        self.wait()
      finally:
        self._mngr.close()  # Orbax raises an asynchronous save's error here again
    except Exception as e:  # noqa: BLE001
      if interrupt.stopped_at_once():  # a save a second Ctrl-C cut short: abandoned by request, not a failure
        return
      err = e if isinstance(e, StorageError) else self._storage(e)
      if err is None:
        raise
      if failed is None:
        raise err from None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


class _QuietOrbax:
  """A logging filter for Orbax's logged tracebacks of failures that lmx reports itself in one line: a storage
  error (disk full, path too long; the :class:`Checkpointer` raises it), and a save cut short by a second Ctrl-C
  (the run stops at once, by request). Hundreds of lines from Orbax's threads would bury that line."""

  def filter(self, record) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    if isinstance(exc, KeyboardInterrupt) or (interrupt.stopped_at_once() and record.levelno >= 40):
      return False
    if storage_errno(exc) is not None:
      return False
    msg = record.getMessage()
    return storage_errno(Exception(msg)) is None and not any(os.strerror(c) in msg for c in STORAGE_CAUSES)


def _quiet_orbax() -> None:
  import logging

  absl_logger = logging.getLogger("absl")
  if not any(isinstance(f, _QuietOrbax) for f in absl_logger.filters):
    absl_logger.addFilter(_QuietOrbax())


def _warn(msg: str) -> None:
  """One warning line on process 0, in full."""
  if jax.process_index() == 0:
    import sys

    print(f"WARNING: {msg}", file=sys.stderr, flush=True)


def _check_finite_structure(restored, target) -> None:
  """Restored leaves must have the target's shapes (a partial write can yield wrong-shaped arrays)."""
  for r, t in zip(jax.tree.leaves(restored), jax.tree.leaves(target)):
    if tuple(np.shape(r)) != tuple(t.shape):
      raise ValueError(f"restored shape {np.shape(r)} != expected {t.shape}")


def _layout(tree) -> dict[str, tuple[int, ...] | None]:
  """{'a/b/0': shape} of a pytree of arrays, ShapeDtypeStructs or Orbax ArrayMetadata.

  Keys come from Orbax's own flattening, so a NamedTuple in the target and the dict Orbax stores for it agree.
  """
  out = {}
  for path, leaf in ocp.tree.to_flat_dict(tree).items():
    shape = getattr(leaf, "shape", None)
    out["/".join(str(k) for k in path)] = tuple(shape) if shape is not None else None
  return out
