"""Plots of a routing analysis: γ_eff and B_0 over training steps per layer (bootstrap CI bands, one line per
run), the phase spans of the first run shaded, and γ_eff against the aux-loss weight.

lmx.core.plots.curves draws symmetric ± std bands; the bootstrap CIs here are asymmetric, so this module draws
its own (with the same Agg backend and lmx.core.results.plot_path locations).
"""
from __future__ import annotations


import matplotlib

matplotlib.use("Agg")  # as lmx.core.plots: no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from lmx.core import plots as core_plots  # noqa: E402
from lmx.core.results import plot_path  # noqa: E402

PHASE_COLORS = {"surge": "tab:red", "stabilisation": "tab:green", "relaxation": "tab:blue"}


def _save(fig, path: str) -> str:
  return core_plots.save_figure(fig, path, dpi=110)


def _shade_phases(ax, steps, labels):
  """Background spans per phase label (midpoints between checkpoints as borders)."""
  s = np.asarray(steps, float)
  edges = np.concatenate([[s[0]], (s[1:] + s[:-1]) / 2, [s[-1]]])
  seen = set()
  for i, lab in enumerate(labels):
    if lab in PHASE_COLORS:
      ax.axvspan(edges[i], edges[i + 1], color=PHASE_COLORS[lab], alpha=0.08, linewidth=0,
                 label=None if lab in seen else f"phase: {lab}")
      seen.add(lab)


def band_plot(path, runs: dict, layer: str, key: str, *, title: str, ylabel: str, shade_run: str | None) -> str:
  """One layer's trajectory of ``key`` ('gamma' or 'b0') for every run, with the CI band."""
  fig, ax = plt.subplots(figsize=(6.5, 4))
  for name, run in runs.items():
    rows = sorted((r for r in run["checkpoints"] if str(r["layer"]) == layer), key=lambda r: r["step"])
    if not rows:
      continue
    xs = [r["step"] for r in rows]
    ci = [r["gamma_eff"] if key == "gamma" else r["balance"]["b0_ci"] for r in rows]
    ys, lo, hi = ([c[k] for c in ci] for k in ("mean", "lo", "hi"))
    ax.plot(xs, ys, marker="o", ms=3, label=name)
    ax.fill_between(xs, lo, hi, alpha=0.2)
    if name == shade_run and key == "gamma":
      _shade_phases(ax, xs, run["layers"][layer]["phases"]["labels"])
  ax.set(title=title, xlabel="training step", ylabel=ylabel)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  return _save(fig, path)


def plots(workdir: str, runs: dict, coefs: dict | None) -> list[str]:
  """Writes ``plots/gamma_eff_layer{l}.png``, ``plots/balance_layer{l}.png`` and, with ``coefs``,
  ``plots/gamma_vs_aux.png``; returns the paths."""
  layers = sorted({str(r["layer"]) for run in runs.values() for r in run["checkpoints"]}, key=int)
  shade = sorted(coefs, key=coefs.get)[len(coefs) // 2] if coefs else next(iter(runs))
  out = []
  for layer in layers:
    out.append(band_plot(plot_path(workdir, f"gamma_eff_layer{layer}"), runs, layer, "gamma",
                         title=f"layer {layer}: γ_eff (L1 fit, 95% bootstrap CI); phases of {shade}",
                         ylabel="γ_eff", shade_run=shade))
    out.append(band_plot(plot_path(workdir, f"balance_layer{layer}"), runs, layer, "b0",
                         title=f"layer {layer}: B_0 = max/mean load (95% CI)", ylabel="B_0", shade_run=None))
  if coefs:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    order = sorted(coefs, key=coefs.get)
    for layer in layers:
      fin = []
      for name in order:
        rows = [r for r in runs[name]["checkpoints"] if str(r["layer"]) == layer]
        last = max(rows, key=lambda r: r["step"])["gamma_eff"]
        fin.append((last["mean"], last["lo"], last["hi"]))
      m, lo, hi = (np.array(v) for v in zip(*fin))
      xs = np.arange(len(order))
      ax.errorbar(xs, m, yerr=[m - lo, hi - m], marker="o", capsize=3, label=f"layer {layer}")
    ax.set_xticks(np.arange(len(order)), [f"{coefs[n]:g}" for n in order])
    ax.set(title="final γ_eff vs load-balancing weight", xlabel="lb_loss_coef", ylabel="γ_eff")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    out.append(_save(fig, plot_path(workdir, "gamma_vs_aux")))
  return out
