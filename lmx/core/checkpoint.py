"""Orbax checkpoints: state + Grain iterator state + config, saved together, async, keep-N.

``Checkpointer.restore`` restores the newest checkpoint that reads back cleanly onto the shardings of the given
abstract state (so a different mesh works). A partial or corrupt newest checkpoint is reported, moved aside to
``<dir>_corrupt/`` (never deleted) and the previous good one is used. A complete checkpoint whose state has a
different layout (other keys or shapes: written by another version of the code or another config) is not
corruption: restoring stops with :class:`CheckpointMismatchError`, naming the differences, and touches nothing.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from lmx.core.config import ConfigError

log = logging.getLogger("lmx.checkpoint")


class CheckpointMismatchError(ConfigError):
  """The workdir holds a readable checkpoint of a differently shaped state (other code version or config)."""


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
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=save_interval_steps, enable_async_checkpointing=async_save,
        create=True)
    self._mngr = ocp.CheckpointManager(self.directory, options=options)

  # -- save ------------------------------------------------------------------------------------------------
  def save(self, step: int, state: Any, *, data_iter=None, config=None, force: bool = False) -> bool:
    """Starts saving (asynchronously); returns whether a save was started at this step."""
    import grain

    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    if config is not None:
      cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
      items["config"] = ocp.args.JsonSave(_jsonable(cfg))
    return self._mngr.save(int(step), args=ocp.args.Composite(**items), force=force)

  # -- restore ---------------------------------------------------------------------------------------------
  def all_steps(self) -> list[int]:
    self._mngr.reload()
    return sorted(self._mngr.all_steps())

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def restore(self, abstract_state: Any, *, data_iter=None, step: int | None = None):
    """Restores ``(step, state)`` (and the iterator in place), or returns ``None`` when there is none.

    ``abstract_state``: a pytree of ``jax.ShapeDtypeStruct`` with shardings (see :func:`abstract_like`), or of
    arrays whose shardings are reused. Tries the newest step first; one that fails to read is moved aside.
    """
    import grain

    target = jax.tree.map(
        lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else jax.ShapeDtypeStruct(
            np.shape(x), x.dtype, sharding=getattr(x, "sharding", None)), abstract_state)
    steps = [step] if step is not None else self.all_steps()[::-1]
    if steps:
      self._check_layout(steps[0], target)
    for s in steps:
      items = {"state": ocp.args.StandardRestore(target)}
      if data_iter is not None:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
      try:
        out = self._mngr.restore(s, args=ocp.args.Composite(**items))
        _check_finite_structure(out["state"], target)
        return s, out["state"]
      except Exception as e:  # noqa: BLE001 - any read failure means this step is unusable
        if step is not None:
          raise
        self._quarantine(s, e)
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
    return step, out

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

  def _quarantine(self, step: int, err: Exception) -> None:
    src = os.path.join(self.directory, str(step))
    dst_root = self.directory.rstrip("/") + "_corrupt"
    msg = (f"checkpoint at step {step} in {self.directory} could not be restored "
           f"({type(err).__name__}: {str(err)[:300]}); ")
    if jax.process_index() == 0 and os.path.isdir(src):
      os.makedirs(dst_root, exist_ok=True)
      dst = os.path.join(dst_root, f"{step}-{int(time.time())}")
      shutil.move(src, dst)
      msg += f"moved it to {dst} (kept, not deleted) and falling back to the previous checkpoint"
    else:
      msg += "falling back to the previous checkpoint"
    log.warning(msg)
    print(f"WARNING: {msg}", flush=True)
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
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


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


def _jsonable(x):
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (np.generic,)):
    return x.item()
  return x
