"""A method's run as a script of named stages, each a resumable sub-run of the workdir, and sweeps of them.

``run_stage(workdir, name, fn)`` calls ``fn()`` once per workdir: when it returns, its outputs (a pytree of
arrays, numbers, strings, lists and dicts) are saved under ``<workdir>/stages/<name>/`` together with a record
``stage.json``; a rerun of the method finds the record and returns the saved outputs without calling ``fn``.
A stage that trains runs :class:`lmx.core.loop.Loop` with ``ckpt_dir=checkpoint_dir(workdir, name)``, so an
interrupted stage resumes from its newest checkpoint; a stage without checkpoints (a rollout, an evaluation)
starts again. Ctrl-C / SIGTERM between stages stops before the next one (:func:`lmx.core.interrupt.check`).

``sweep(workdir, cells, fn, summarize)`` runs one stage per cell (an arm × seed, a seed, ...) and rewrites
``results.json`` after each from every finished cell, so a run stopped part-way keeps what it finished.
``mean_std`` is the one summary over seeds used in every results.json: the mean, the *sample* standard
deviation (ddof = 1; null when n < 2) and n.

Workdir layout this adds::

    stages/<name>/stage.json      status, wall_s, when; the sha256 of outputs.npz
    stages/<name>/outputs.npz     the arrays of the outputs (structure in stage.json)
    checkpoints/<name>/<step>/    the Orbax checkpoints of a training stage
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from typing import Any, Callable, Hashable, Mapping, Sequence

import jax
import numpy as np

from lmx.core import interrupt
from lmx.core.results import jsonable, write_results

STAGES, STAGE_FILE, OUTPUTS_FILE = "stages", "stage.json", "outputs.npz"


def stage_dir(workdir: str, name: str) -> str:
  """``<workdir>/stages/<name>``: the stage's record and outputs."""
  return os.path.join(workdir, STAGES, name)


def checkpoint_dir(workdir: str, name: str) -> str:
  """``<workdir>/checkpoints/<name>``: where a training stage's loop keeps its checkpoints."""
  return os.path.join(workdir, "checkpoints", name)


# ------------------------------------------------------------------------------------------ outputs on disk


def _encode(x, arrays: dict):
  """JSON structure of ``x`` with arrays replaced by ``{"__array__": key}`` (their data goes to ``arrays``)."""
  if hasattr(x, "to_dict"):  # ConfigDict
    x = x.to_dict()
  if isinstance(x, Mapping):
    for k in x:
      if not isinstance(k, str):
        raise TypeError(f"stage outputs need string dict keys, got {k!r}")
    return {"__dict__": {k: _encode(v, arrays) for k, v in x.items()}}
  if isinstance(x, tuple):
    return {"__tuple__": [_encode(v, arrays) for v in x]}
  if isinstance(x, list):
    return [_encode(v, arrays) for v in x]
  if isinstance(x, (jax.Array, np.ndarray)):
    key = f"a{len(arrays)}"
    arrays[key] = np.asarray(jax.device_get(x))
    return {"__array__": key}
  if isinstance(x, np.generic):
    x = x.item()
  if isinstance(x, float) and not math.isfinite(x):
    return {"__float__": repr(x)}
  if x is None or isinstance(x, (bool, int, float, str)):
    return x
  raise TypeError(f"stage outputs hold arrays, numbers, strings, None, lists, tuples and dicts; got "
                  f"{type(x).__name__}")


def _decode(x, arrays):
  if isinstance(x, list):
    return [_decode(v, arrays) for v in x]
  if isinstance(x, dict):
    if "__array__" in x:
      return arrays[x["__array__"]]
    if "__tuple__" in x:
      return tuple(_decode(v, arrays) for v in x["__tuple__"])
    if "__float__" in x:
      return float(x["__float__"])
    return {k: _decode(v, arrays) for k, v in x["__dict__"].items()}
  return x


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def save_outputs(directory: str, outputs: Any, **record: Any) -> dict:
  """Writes ``outputs`` to ``directory/outputs.npz`` + ``stage.json`` (the record last, atomically: a crash
  mid-save leaves a stage that is not finished, never one that reads back wrong). Process 0 only."""
  arrays: dict[str, np.ndarray] = {}
  structure = _encode(outputs, arrays)
  rec = {"status": "finished", **jsonable(record), "structure": structure}
  if jax.process_index() != 0:
    return rec
  os.makedirs(directory, exist_ok=True)
  npz, tmp = os.path.join(directory, OUTPUTS_FILE), os.path.join(directory, f".{OUTPUTS_FILE}.tmp-{os.getpid()}")
  with open(tmp, "wb") as f:
    np.savez(f, **arrays)
  os.replace(tmp, npz)
  rec["sha256"] = _sha256(npz)
  path, tmp = os.path.join(directory, STAGE_FILE), os.path.join(directory, f".{STAGE_FILE}.tmp-{os.getpid()}")
  with open(tmp, "w") as f:
    json.dump(rec, f, indent=1, allow_nan=False)
  os.replace(tmp, path)
  return rec


def read_record(directory: str) -> dict | None:
  """The stage's ``stage.json`` (None when absent or unreadable)."""
  try:
    with open(os.path.join(directory, STAGE_FILE)) as f:
      rec = json.load(f)
    return rec if isinstance(rec, dict) else None
  except (OSError, ValueError):
    return None


def load_outputs(directory: str) -> tuple[Any, dict]:
  """``(outputs, record)`` of a finished stage; ValueError naming the file when they do not read back whole."""
  rec = read_record(directory)
  if rec is None or rec.get("status") != "finished":
    raise ValueError(f"{os.path.join(directory, STAGE_FILE)} does not record a finished stage")
  npz = os.path.join(directory, OUTPUTS_FILE)
  if not os.path.isfile(npz):
    raise ValueError(f"{npz} is missing")
  if rec.get("sha256") and _sha256(npz) != rec["sha256"]:
    raise ValueError(f"{npz} does not match the checksum written with it (changed or corrupt)")
  with np.load(npz, allow_pickle=False) as z:
    arrays = {k: z[k] for k in z.files}
  return _decode(rec["structure"], arrays), rec


def is_finished(workdir: str, name: str) -> bool:
  rec = read_record(stage_dir(workdir, name))
  return bool(rec) and rec.get("status") == "finished"


# ------------------------------------------------------------------------------------------ stages


def _sync(tag: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(tag)


def run_stage(workdir: str, name: str, fn: Callable[[], Any], *, quiet: bool = False) -> Any:
  """``fn()``'s outputs, computed once per workdir (see the module docstring).

  Saved outputs that no longer read back (a missing or altered ``outputs.npz``) are reported in one line and the
  stage runs again (a training stage resumes from its checkpoints). Raises :class:`lmx.core.interrupt.Interrupted`
  when a stop was requested before the stage starts.
  """
  directory = stage_dir(workdir, name)
  if read_record(directory) is not None:
    try:
      out, rec = load_outputs(directory)
      if not quiet and jax.process_index() == 0:
        print(f"stage {name}: finished earlier ({rec.get('wall_s', float('nan')):.0f} s), outputs read back",
              flush=True)
      return out
    except ValueError as e:
      if jax.process_index() == 0:
        print(f"warning: stage {name}: {e}; running it again", flush=True)
        aside = directory.rstrip("/") + f".unreadable-{int(time.time())}"
        shutil.move(directory, aside)
  interrupt.check(f"before stage {name}")
  t0 = time.time()
  out = fn()
  save_outputs(directory, out, name=name, wall_s=time.time() - t0,
               finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
  _sync(f"stage {name}")
  # what a rerun would read back (so both paths give the same types: numpy arrays, lists)
  arrays: dict = {}
  return _decode(_encode(out, arrays), {k: v for k, v in arrays.items()})


# ------------------------------------------------------------------------------------------ seeds and sweeps


def mean_std(values: Sequence[float | None]) -> dict:
  """``{"mean", "std", "n", "values"}`` over the finite values: the sample std (ddof = 1), None when n < 2.

  The one convention of every results.json in lmx ("± std" is this std; n is stated beside it).
  """
  vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
  n = len(vals)
  arr = np.asarray(vals, np.float64)
  return {"mean": float(arr.mean()) if n else None, "std": float(arr.std(ddof=1)) if n > 1 else None, "n": n,
          "values": [float(v) if v is not None else None for v in values]}


def fmt_mean_std(ms: Mapping, digits: int = 3) -> str:
  """``"0.412 ± 0.038 (n=3)"`` for a :func:`mean_std` dict."""
  if ms.get("mean") is None:
    return "n/a (n=0)"
  std = "n/a" if ms.get("std") is None else f"{ms['std']:.{digits}f}"
  return f"{ms['mean']:.{digits}f} ± {std} (n={ms['n']})"


def cell_name(cell: Hashable) -> str:
  """A cell's stage name: ``("spa", 1)`` → ``"spa/s1"``; an int seed ``1`` → ``"s1"``."""
  parts = cell if isinstance(cell, tuple) else (cell,)
  return "/".join(f"s{p}" if isinstance(p, (int, np.integer)) else str(p) for p in parts)


def sweep(workdir: str, cells: Sequence[Hashable], fn: Callable[[Hashable], Any],
          summarize: Callable[[dict], Mapping[str, Any]] | None = None, *, prefix: str = "",
          results_file: str = "results.json", after: Callable[[dict], None] | None = None) -> dict:
  """Runs ``fn(cell)`` as the stage ``<prefix><cell_name(cell)>`` for every cell (skipped when finished) and,
  after each, writes ``summarize({cell: outputs})`` of the cells finished so far to ``results_file`` and calls
  ``after`` with the same dict (plots). Returns ``{cell: outputs}``."""
  done: dict = {}
  for cell in cells:
    done[cell] = run_stage(workdir, prefix + cell_name(cell), lambda cell=cell: fn(cell))
    if summarize is not None:
      write_results(workdir, summarize(dict(done)), name=results_file)
    if after is not None and jax.process_index() == 0:
      after(dict(done))
  return done


# ------------------------------------------------------------------------------------------ training stages


def host_mesh():
  """A one-device mesh: what the CPU-sized stages of a method train on (the loop needs a mesh; with fake
  devices in tests, replicating a small step over all of them would only multiply its cost)."""
  from lmx.core import mesh as mesh_lib

  return mesh_lib.make_mesh({"data": -1}, devices=jax.devices()[:1])


def train(workdir: str, name: str, *, writer, total_steps: int, ckpt_every: int | None = None,
          log_every: int | None = None, mesh=None, desc: str | None = None, **loop_kwargs):
  """:class:`lmx.core.loop.Loop` for the training stage ``name`` of a method: checkpoints in
  ``checkpoints/<name>`` (default: 4 over the stage, the last one kept; ``ckpt_every=0`` for none), scalars under
  ``<name>/`` in the method's ``writer`` (metrics.jsonl and TensorBoard), a progress bar named after the stage.
  Returns the loop's :class:`lmx.core.loop.TrainResult` (a finished stage restores its last checkpoint)."""
  from lmx.core import loop

  total = int(total_steps)
  every = max(1, -(-total // 4)) if ckpt_every is None else int(ckpt_every)
  kw = dict(ckpt_keep=1, async_checkpointing=False, log_console=False, postfix=("loss",))
  kw.update(loop_kwargs)
  return loop.Loop(mesh=mesh or host_mesh(), workdir=workdir, total_steps=total, ckpt_every=every,
                   ckpt_dir=checkpoint_dir(workdir, name), writer=writer,
                   log_every=log_every or max(1, min(50, total // 10 or 1)), log_prefix=f"{name}/",
                   desc=desc or name, **kw).run()
