"""The run's outputs, written the same way by every driver: ``results.json``, a summary line, plot paths.

``write_results`` converts to plain JSON (NumPy/JAX scalars and arrays to numbers and lists, NaN/Inf to
``null`` so the file stays valid JSON), writes atomically (temp file + rename: a crash never leaves half a
file) and only on process 0.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import jax
import numpy as np

RESULTS_FILE = "results.json"


def jsonable(x: Any) -> Any:
  """Plain-JSON copy of ``x`` (dicts, lists, numbers, strings, None); non-finite floats become None."""
  if hasattr(x, "to_dict"):  # ConfigDict
    x = x.to_dict()
  if isinstance(x, Mapping):
    return {str(k): jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [jsonable(v) for v in x]
  if isinstance(x, (jax.Array, np.ndarray, np.generic)):
    return jsonable(np.asarray(x).tolist())
  if isinstance(x, float):
    return x if math.isfinite(x) else None
  if x is None or isinstance(x, (bool, int, str)):
    return x
  return str(x)


def write_results(workdir: str, results: Mapping[str, Any], name: str = RESULTS_FILE) -> str:
  """Writes ``workdir/<name>`` (process 0 only); returns its path."""
  path = os.path.join(workdir, name)
  if jax.process_index() != 0:
    return path
  os.makedirs(workdir, exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    with open(tmp, "w") as f:
      json.dump(jsonable(results), f, indent=1, allow_nan=False)
    os.replace(tmp, path)
  finally:  # a failed write (disk full, an error while converting) leaves neither half a file nor the temp file
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


def summary_line(title: str, parts: Mapping[str, Any], path: str | None = None) -> str:
  """Prints ``title: k v | k v ... → path`` and returns it (floats with 4 significant digits)."""
  def fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)

  line = f"{title}: " + " | ".join(f"{k} {fmt(v)}" for k, v in parts.items())
  if path:
    line += f" → {path}"
  if jax.process_index() == 0:
    print(line, flush=True)
  return line


def plot_path(workdir: str, name: str) -> str:
  """``workdir/plots/<name>.png``: where every driver puts its plots."""
  return os.path.join(workdir, "plots", f"{name}.png")
