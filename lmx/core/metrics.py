"""One writer for every scalar: ``metrics.jsonl``, TensorBoard events, and a concise console line.

Only process 0 writes (other processes get a no-op writer), so the same code runs on one host or a pod.
TensorBoard events come from tensorboardX, which needs no TensorFlow.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sys
import time
from typing import Any, Mapping

import jax
import numpy as np
from tqdm.auto import tqdm

from lmx.core.config import ConfigError


def _to_float(v: Any) -> float:
  return float(np.asarray(jax.device_get(v)).astype(np.float64))


def _fmt(v: float) -> str:
  if not math.isfinite(v):
    return str(v)
  a = abs(v)
  if a != 0 and (a < 1e-3 or a >= 1e5):
    return f"{v:.3e}"
  return f"{v:.4g}"


class Writer:
  """Writes scalars to ``workdir/metrics.jsonl`` and TensorBoard (``workdir/tb``); prints summaries.

  ``scalars(step, {...})`` records; ``summary(step, {...})`` records and prints one line. Values may be jax
  arrays (fetched to host here, so call it only every ``log_every`` steps to keep dispatch asynchronous).
  """

  def __init__(self, workdir: str, *, total_steps: int | None = None, enabled: bool | None = None,
               tensorboard: bool = True, console_exclude: str | None = None):
    self.console_exclude = re.compile(console_exclude) if console_exclude else None
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.total_steps = total_steps
    self._t0 = time.time()
    self._jsonl = None
    self._tb = None
    if not self.enabled:
      return
    from lmx.core import workdir as wd

    problem = wd.remote_problem(workdir, tensorboard=tensorboard, checkpoints=False)
    if problem:  # else tensorboardX fails with an ImportError traceback
      raise ConfigError(f"{workdir}: {problem}")
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._jsonl = open(self.path, "a", buffering=1)
    if tensorboard:
      from tensorboardX import SummaryWriter  # local: keeps import of lmx.core light

      tb = os.path.join(workdir, "tb")
      wd.check_writable_dir(tb)  # a file named tb: one line, not tensorboardX's traceback
      self._tb = SummaryWriter(tb, flush_secs=10)

  def scalars(self, step: int, metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Records ``metrics`` at ``step``; returns them as floats (host values)."""
    vals = {f"{prefix}{k}": _to_float(v) for k, v in metrics.items()}
    if not self.enabled:
      return vals
    rec = {"step": int(step), "time": round(time.time() - self._t0, 3), **vals}
    with self._storage_errors():
      self._jsonl.write(json.dumps(rec) + "\n")
      if self._tb is not None:
        for k, v in vals.items():
          if math.isfinite(v):  # NaN/Inf stay in metrics.jsonl; TensorBoard would only warn about them
            self._tb.add_scalar(k, v, int(step))
    return vals

  @contextlib.contextmanager
  def _storage_errors(self):
    """A full disk (or quota) while writing metrics: one StorageError naming the workdir, not a traceback."""
    from lmx.core import workdir as wd

    try:
      yield
    except OSError as e:
      failed = wd.storage_error(e, "cannot write metrics in", os.path.dirname(self.path))
      if failed is None:
        raise
      raise failed from None

  def summary(self, step: int, metrics: Mapping[str, Any], prefix: str = "", *,
              total: int | None = None) -> dict[str, float]:
    """Records and prints one line: ``[step 120/600] loss=2.31 lr=0.003 ...`` (``total`` overrides the writer's
    step count, for the stages of a method that share one writer)."""
    vals = self.scalars(step, metrics, prefix)
    if self.enabled:
      total = total or self.total_steps
      total = f"/{total}" if total else ""
      body = " ".join(f"{k}={_fmt(v)}" for k, v in vals.items()
                      if not (self.console_exclude and self.console_exclude.search(k)))
      tqdm.write(f"[step {int(step)}{total}] {body}", file=sys.stdout)
    return vals

  def text(self, tag: str, text: str, step: int = 0) -> None:
    if self.enabled and self._tb is not None:
      self._tb.add_text(tag, text, int(step))

  def image(self, tag: str, image, step: int = 0) -> None:
    """An image in TensorBoard: an ``[H, W, C]`` (or ``[H, W]``) array, uint8 or floats in [0, 1], or the path of
    a PNG (a plot the run saved)."""
    if not (self.enabled and self._tb is not None):
      return
    if isinstance(image, str):
      import matplotlib.image as mpimg

      image = mpimg.imread(image)
    img = np.asarray(image)
    if img.ndim == 2:
      img = img[..., None]
    if img.dtype != np.uint8:
      img = (np.clip(img.astype(np.float32), 0.0, 1.0) * 255).round().astype(np.uint8)
    if img.shape[-1] == 4:
      img = img[..., :3]
    self._tb.add_image(tag, img, int(step), dataformats="HWC")

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    jsonl, tb = self._jsonl, self._tb
    self._jsonl = self._tb = None
    with self._storage_errors():
      try:
        if jsonl is not None:
          jsonl.close()
      finally:
        if tb is not None:
          tb.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def progress(total: int | None = None, desc: str = "", initial: int = 0, **kw) -> tqdm:
  """A tqdm progress bar with ETA (disabled on processes other than 0 and when LMX_NO_PROGRESS is set)."""
  disable = jax.process_index() != 0 or bool(os.environ.get("LMX_NO_PROGRESS"))
  return tqdm(total=total, desc=desc, initial=initial, dynamic_ncols=True, disable=disable,
              mininterval=1.0, **kw)


def read_jsonl(path: str) -> list[dict]:
  """Reads a metrics.jsonl file into a list of records (skips a torn last line)."""
  out = []
  with open(path) as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError:
        pass
  return out


def curves(path: str, prefix: str = "eval/") -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """``{name: (steps, values)}`` of a metrics.jsonl's ``<prefix><name>`` records (the last record per step; None
  values skipped), e.g. ``curves(f"{workdir}/metrics.jsonl")["ce"]`` is a run's validation-CE curve."""
  pts: dict[str, dict[int, float]] = {}
  for r in read_jsonl(path):
    for k, v in r.items():
      if k.startswith(prefix) and v is not None:
        pts.setdefault(k[len(prefix):], {})[int(r["step"])] = float(v)
  return {k: (np.array(sorted(v)), np.array([v[s] for s in sorted(v)])) for k, v in pts.items()}
