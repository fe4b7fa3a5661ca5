r"""Difficulty alignment over seeds: DATM at several IPCs with the matching window early / middle / late (fixed
windows over the same experts) and DATM's own sequential window, evaluated, summarised as mean ± sample std over
seeds, plotted as accuracy vs window per IPC.

  PYTHONPATH=. python experiments/datm/windows_sweep.py --root=runs/datm_windows --ipcs=1,10,50 --seeds=0,1,2
  PYTHONPATH=. python experiments/datm/windows_sweep.py --root=runs/datm_windows --summarize_only \
      --merge=experiments/datm/results/windows_seeds_ipc1.json --out=experiments/datm/results/windows_seeds

Each run is ``launch/run.py --config=configs/datm.py:<ipc variant>`` (ipc1, ipc10, ipc50) with the window set by
``distill.min_start_epoch`` / ``max_start_epoch`` / ``current_max_start_epoch`` / ``sequential``, its evaluation cut
to the distilled arm (``eval.num`` nets, no full / random / init / cross arms). Seed ``s`` trains its experts once
(its first run) and every other run of that seed reuses them (``experts.dir``): within a seed, the windows and IPCs
differ only in what is matched. A finished run (results.json present) is not run again, so the sweep resumes.

The summary (``<out>.json``) holds, per IPC and window, each seed's distilled accuracy (mean over its eval nets) and
the mean ± sample std over seeds (n stated); per IPC the best window by that mean and whether it beats the runner-up
beyond the noise (difference of the means > 2 × the larger std); and whether the best window moves later as IPC grows.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VARIANT_OF_IPC = {1: "ipc1", 10: "ipc10", 50: "ipc50"}
# window name -> (T⁻, T⁺ at the start, T⁺ at the end, sequential): the start epochs sampled, in expert epochs
WINDOWS = {
    "early": (0, 2, 2, False),
    "middle": (2, 4, 4, False),
    "late": (4, 6, 6, False),
    "sequential": (0, 3, 6, True),  # DATM's sequential generation: T⁺ grows from 3 to 6 over the run
}
ORDER = ("early", "middle", "late", "sequential")


def run_dir(root: str, ipc: int, window: str, seed: int) -> str:
  return os.path.join(root, f"ipc{ipc}_{window}_seed{seed}")


def command(root: str, ipc: int, window: str, seed: int, experts: str, eval_num: int, smoke: bool) -> list[str]:
  lo, cur, hi, seq = WINDOWS[window]
  variant = "smoke" if smoke else VARIANT_OF_IPC[ipc]
  cmd = [sys.executable, os.path.join(ROOT, "launch", "run.py"),
         f"--config={os.path.join(ROOT, 'configs', 'datm.py')}:variant={variant},seed={seed}",
         f"--workdir={run_dir(root, ipc, window, seed)}",
         f"--config.distill.min_start_epoch={lo}", f"--config.distill.current_max_start_epoch={cur}",
         f"--config.distill.max_start_epoch={hi}", f"--config.distill.sequential={seq}",
         f"--config.eval.num={eval_num}", "--config.eval.full=False", "--config.eval.random=False",
         "--config.eval.init=False", "--config.eval.cross=False"]
  if smoke:  # CI: the sklearn-digits smoke variant at the given IPC, its experts long enough for every window
    cmd += [f"--config.distill.ipc={ipc}", "--config.experts.epochs=7", "--config.distill.iterations=6",
            "--config.eval.epochs=5"]
  if experts:
    cmd.append(f"--config.experts.dir={experts}")
  return cmd


def run_once(cmd: list[str], workdir: str) -> None:
  """Runs a ``launch/run.py`` command unless ``workdir`` already holds its results.json (so a sweep resumes); a
  failed run stops the sweep with the end of its stderr."""
  if os.path.exists(os.path.join(workdir, "results.json")):
    return
  t0 = time.time()
  r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
  if r.returncode:
    raise SystemExit(f"run {workdir} failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
  print(f"{workdir}: {time.time() - t0:.0f} s", flush=True)


def sweep(root: str, ipcs, seeds, windows, eval_num: int, smoke: bool = False) -> None:
  os.makedirs(root, exist_ok=True)
  for seed in seeds:
    experts = ""
    for ipc in ipcs:
      for window in windows:
        d = run_dir(root, ipc, window, seed)
        run_once(command(root, ipc, window, seed, experts, eval_num, smoke), d)
        experts = experts or os.path.join(d, "experts")


def summarize(root: str, ipcs, seeds, windows, merge=()) -> dict:
  """The per-seed accuracies and their mean ± sample std per (IPC, window), the best window per IPC.

  ``merge``: paths of earlier summaries (this function's JSON); a (IPC, window, seed) with no run under ``root`` takes
  its per-seed entry from the first of them that has it, marked with ``source`` = that path.
  """
  prior = []
  for path in merge:
    with open(path) as f:
      prior.append((path, json.load(f)))
  out: dict = {"seeds": list(seeds), "windows": {w: list(WINDOWS[w]) for w in windows}, "ipc": {},
               "merged": list(merge)}
  for ipc in ipcs:
    rows = {}
    for w in windows:
      per_seed = {}
      for s in seeds:
        p = os.path.join(run_dir(root, ipc, w, s), "results.json")
        if os.path.exists(p):
          with open(p) as f:
            r = json.load(f)
          per_seed[s] = dict(acc=float(r["distilled"]["mean"]), nets=int(r["distilled"]["n"]),
                             seconds_per_iteration=float(r.get("seconds_per_iteration", float("nan"))))
        else:
          for path, old in prior:
            entry = old.get("ipc", {}).get(str(ipc), {}).get("rows", {}).get(w, {}).get("per_seed", {}).get(str(s))
            if entry is not None:
              per_seed[s] = dict(entry, source=path)
              break
      accs = np.array([v["acc"] for v in per_seed.values()])
      rows[w] = dict(per_seed=per_seed, n=len(accs), mean=float(accs.mean()) if len(accs) else None,
                     std=float(accs.std(ddof=1)) if len(accs) > 1 else None)
    complete = {w: v for w, v in rows.items() if v["n"] == len(seeds)}
    best = None
    if len(complete) >= 2:
      ranked = sorted(complete, key=lambda w: -complete[w]["mean"])
      a, b = complete[ranked[0]], complete[ranked[1]]
      best = dict(window=ranked[0], runner_up=ranked[1], margin=a["mean"] - b["mean"],
                  beyond_noise=bool(a["mean"] - b["mean"] > 2 * max(a["std"], b["std"])))
    out["ipc"][str(ipc)] = dict(rows=rows, best=best)
  fixed = [(ipc, out["ipc"][str(ipc)]["best"]) for ipc in ipcs]
  centres = {w: (WINDOWS[w][0] + WINDOWS[w][2]) / 2 for w in windows}
  order = [centres[b["window"]] for _, b in fixed if b]
  out["best_moves_later_with_ipc"] = (bool(all(x <= y for x, y in zip(order, order[1:])) and order[-1] > order[0])
                                      if len(order) == len(ipcs) and len(order) > 1 else None)
  return out


def plot(summary: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  ipcs = list(summary["ipc"])
  fig, axes = plt.subplots(1, len(ipcs), figsize=(max(3.8 * len(ipcs), 6.0), 4.0), squeeze=False)
  for ax, ipc in zip(axes[0], ipcs):
    rows = summary["ipc"][ipc]["rows"]
    names = [w for w in ORDER if w in rows and rows[w]["n"]]
    xs = np.arange(len(names))
    for i, w in enumerate(names):
      r = rows[w]
      accs = [100 * v["acc"] for v in r["per_seed"].values()]
      ax.scatter([i] * len(accs), accs, s=12, color="0.6", zorder=2)
      ax.errorbar([i], [100 * r["mean"]], yerr=[100 * (r["std"] or 0)], marker="s" if w == "sequential" else "o",
                  capsize=4, color="C2" if w == "sequential" else "C0", zorder=3)
    ax.set_xticks(xs, [f"{w}\n[{WINDOWS[w][0]}, {WINDOWS[w][2]})" for w in names], fontsize=8)
    best = summary["ipc"][ipc]["best"]
    n = max((rows[w]["n"] for w in names), default=0)
    ax.set_title(f"IPC {ipc} (n = {n} seeds)" + (f"; best: {best['window']}" if best else ""), fontsize=9)
    ax.set_ylabel("distilled-set test accuracy (%)" if ax is axes[0][0] else "")
    ax.grid(alpha=0.3)
  fig.suptitle("DATM on MNIST-5k: accuracy vs matching window\n(mean ± sample std over seeds; dots: seeds)",
               fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--root", required=True, help="folder of the runs (one per IPC, window and seed)")
  ap.add_argument("--ipcs", default="1,10,50")
  ap.add_argument("--seeds", default="0,1,2")
  ap.add_argument("--windows", default=",".join(ORDER))
  ap.add_argument("--eval_num", type=int, default=3, help="evaluation nets per run")
  ap.add_argument("--out", default="", help="write <out>.json and <out>.png (default: <root>/summary)")
  ap.add_argument("--summarize_only", action="store_true")
  ap.add_argument("--merge", default="", help="comma-separated earlier summary JSONs: their per-seed values fill in "
                  "the (IPC, window, seed) cells with no run under --root (the runs of another session)")
  ap.add_argument("--smoke", action="store_true", help="the smoke variant (sklearn digits, seconds): for tests")
  a = ap.parse_args(argv)
  ipcs = [int(x) for x in a.ipcs.split(",")]
  seeds = [int(x) for x in a.seeds.split(",")]
  windows = [w for w in a.windows.split(",") if w]
  bad = [w for w in windows if w not in WINDOWS] + [i for i in ipcs if i not in VARIANT_OF_IPC and not a.smoke]
  if bad:
    print(f"error: unknown window(s) / IPC(s) {bad}; windows {list(WINDOWS)}, IPCs {list(VARIANT_OF_IPC)}",
          file=sys.stderr)
    return 2
  if not a.summarize_only:
    sweep(a.root, ipcs, seeds, windows, a.eval_num, a.smoke)
  merge = [m for m in a.merge.split(",") if m]
  missing = [m for m in merge if not os.path.exists(m)]
  if missing:
    print(f"error: --merge file(s) not found: {missing}", file=sys.stderr)
    return 2
  summary = summarize(a.root, ipcs, seeds, windows, merge)
  out = a.out or os.path.join(a.root, "summary")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out + ".json", "w") as f:
    json.dump(summary, f, indent=1)
  plot(summary, out + ".png")
  print(f"wrote {out}.json and {out}.png")
  for ipc, s in summary["ipc"].items():
    cells = [f"{w} {100 * r['mean']:.1f} ± {100 * (r['std'] or 0):.1f} (n={r['n']})" for w, r in s["rows"].items()
             if r["n"]]
    print(f"IPC {ipc}: " + "; ".join(cells) + (f" → best {s['best']['window']}" if s["best"] else ""))
  return 0


if __name__ == "__main__":
  sys.exit(main())
