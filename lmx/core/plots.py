"""Matplotlib helpers that write PNGs (Agg backend: no display needed)."""
from __future__ import annotations

import os
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from lmx.core.metrics import read_jsonl  # noqa: E402


def save_figure(fig, path: str, dpi: int = 120) -> str:
  """Writes ``fig`` to ``path`` (directories made, tight layout) and closes it; returns ``path``."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.tight_layout()
  fig.savefig(path, dpi=dpi)
  plt.close(fig)
  return path


def curves(path: str, series: Mapping[str, tuple[Sequence[float], Sequence[float]]], *, title: str = "",
           xlabel: str = "step", ylabel: str = "", logy: bool = False,
           bands: Mapping[str, Sequence[float]] | None = None) -> str:
  """Line plot of named ``(xs, ys)`` series; ``bands[name]`` (same length as ys) shades ± std."""
  fig, ax = plt.subplots(figsize=(6, 4))
  for name, (xs, ys) in series.items():
    xs, ys = np.asarray(xs, float), np.asarray(ys, float)
    ax.plot(xs, ys, label=name)
    if bands and name in bands:
      sd = np.asarray(bands[name], float)
      ax.fill_between(xs, ys - sd, ys + sd, alpha=0.2)
  if logy:
    ax.set_yscale("log")
  ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
  ax.grid(alpha=0.3)
  if len(series) > 1:
    ax.legend()
  return save_figure(fig, path)


def from_jsonl(jsonl_path: str, keys: Sequence[str], out_path: str, title: str = "", logy: bool = False) -> str:
  """Plots the given metric keys of a metrics.jsonl against step."""
  recs = read_jsonl(jsonl_path)
  series = {}
  for k in keys:
    pts = [(r["step"], r[k]) for r in recs if k in r]
    if pts:
      xs, ys = zip(*pts)
      series[k] = (xs, ys)
  return curves(out_path, series, title=title, logy=logy)


def pixel_grid(path: str, pixels_NHWC, *, nrow: int, scale: int = 4, gap: int = 1) -> str:
  """The images as one PNG in pixel space: values clipped to [0, 1] (no per-image stretching), ``nrow`` rows,
  ``gap`` white pixels between images, each pixel shown as ``scale`` × ``scale``."""
  x = np.clip(np.asarray(pixels_NHWC, np.float32), 0.0, 1.0)
  n, h, w, ch = x.shape
  if ch == 1:
    x = np.repeat(x, 3, axis=-1)
  ncol = -(-n // nrow)
  grid = np.ones((nrow * (h + gap) - gap, ncol * (w + gap) - gap, 3), np.float32)
  for i in range(n):
    r, col = divmod(i, ncol)
    grid[r * (h + gap):r * (h + gap) + h, col * (w + gap):col * (w + gap) + w] = x[i]
  grid = np.repeat(np.repeat(grid, scale, axis=0), scale, axis=1)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  plt.imsave(path, np.round(grid * 255).astype(np.uint8))
  return path


def image_grid(path: str, images_NHWC, *, nrow: int, title: str = "",
               row_labels: Sequence[str] | None = None) -> str:
  """Grid of images, ``nrow`` rows filled in order; each image min-max normalised for display."""
  x = np.asarray(images_NHWC, np.float32)
  n, h, w, c = x.shape
  lo = x.reshape(n, -1).min(1)[:, None, None, None]
  hi = x.reshape(n, -1).max(1)[:, None, None, None]
  x = (x - lo) / np.maximum(hi - lo, 1e-8)
  ncol = int(np.ceil(n / nrow))
  fig, axes = plt.subplots(nrow, ncol, figsize=(max(2, ncol * 0.8), max(2, nrow * 0.8)), squeeze=False)
  for i in range(nrow * ncol):
    ax = axes[i // ncol][i % ncol]
    ax.set_xticks([])
    ax.set_yticks([])
    for s in ax.spines.values():
      s.set_visible(False)
    if i < n:
      ax.imshow(x[i, :, :, 0] if c == 1 else x[i], cmap="gray" if c == 1 else None, vmin=0, vmax=1)
    if row_labels is not None and i % ncol == 0 and i // ncol < len(row_labels):
      ax.set_ylabel(str(row_labels[i // ncol]), rotation=0, labelpad=12, fontsize=8)
  if title:
    fig.suptitle(title)
  return save_figure(fig, path)
