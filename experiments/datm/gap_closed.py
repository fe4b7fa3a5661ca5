r"""How much of the gap to full data a distilled set closes: (distilled − random real) / (full − random real), per IPC
and seed (and the same for DATM's initial set, to separate the matching from the initialisation), with the converged
full-data reference; mean ± sample std over seeds.

  # run the digits variants (each seed's experts trained once and shared by its IPCs), then summarise them
  PYTHONPATH=. python experiments/datm/gap_closed.py --launch=digits --ipcs=10,50,100 --seeds=0,1,2 \
      --root=runs/datm_gap --out=experiments/datm/results/gap_closed_digits
  # summarise finished runs (workdirs or results.json files), e.g. MNIST-5k's committed ones
  PYTHONPATH=. python experiments/datm/gap_closed.py --out=experiments/datm/results/gap_closed_mnist5k \
      experiments/datm/results/s11_default_seed{0,1,2}.json experiments/datm/results/s11_ipc{50,100}_n25_seed{0,1}.json

The full-data reference of a seed is the ``full`` arm of that seed's run (same dataset) with the most full-data
epochs: it depends only on the seed's evaluation streams and ``eval.full_epochs``, not on the IPC, so a run that
trained it longer (MNIST-5k's ipc50 / ipc100: 15 epochs) serves the seed's IPC 10 run too (3 epochs: not
converged). Each row records which run gave it. The fraction uses the arms' means over evaluation networks; its noise
is stated through the per-seed spread and the arms' stds, which the JSON keeps.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [ROOT, HERE]

import windows_sweep  # noqa: E402  (its run_once: the shared resumable launcher)
from lmx.core.stages import mean_std  # noqa: E402

LAUNCH = {"digits": "digits_ipc{ipc}"}  # dataset -> configs/datm.py variant per IPC


def _values(arm: dict) -> list[float]:
  return list(arm.get("values", arm.get("all", [])))


def load(path: str) -> dict:
  """One run's results (a workdir or a results.json) reduced to what the fraction needs."""
  p = os.path.join(path, "results.json") if os.path.isdir(path) else path
  with open(p) as f:
    r = json.load(f)
  missing = [k for k in ("distilled", "random", "full", "ipc", "seed", "dataset") if k not in r]
  if missing:
    raise SystemExit(f"{p}: results without {missing} (the run must evaluate the random and full arms)")
  full_epochs = r.get("full_epochs", r.get("config", {}).get("eval", {}).get("full_epochs"))
  return dict(path=p, dataset=r["dataset"], ipc=int(r["ipc"]), seed=int(r["seed"]), full_epochs=int(full_epochs),
              **{arm: dict(mean=float(r[arm]["mean"]), std=r[arm].get("std"), values=_values(r[arm]))
                 for arm in ("distilled", "random", "full", "initial") if arm in r})


def summarize(runs: list[dict], min_full_epochs: int = 15) -> dict:
  """Per dataset, IPC and seed: the fraction closed against the seed's longest-trained full-data arm. No fraction
  (None; ``reference`` says why) when that arm trained under ``min_full_epochs`` (not converged) or when the gap
  full − random is not above 2 × the quadrature sum of the two arms' stds (the ratio would divide by noise)."""
  out: dict = {}
  for ds in sorted({r["dataset"] for r in runs}):
    mine = [r for r in runs if r["dataset"] == ds]
    ref = {}
    for r in mine:  # the seed's converged reference: its run with the most full-data epochs
      if r["seed"] not in ref or r["full_epochs"] > ref[r["seed"]]["full_epochs"]:
        ref[r["seed"]] = r
    rows = {}
    for ipc in sorted({r["ipc"] for r in mine}):
      per_seed = {}
      for r in sorted((r for r in mine if r["ipc"] == ipc), key=lambda r: r["seed"]):
        f = ref[r["seed"]]
        d, rnd, full = r["distilled"]["mean"], r["random"]["mean"], f["full"]["mean"]
        converged = f["full_epochs"] >= min_full_epochs
        # the gap must stand out of the two arms' noise, or the ratio divides by noise
        gap_noise = float(np.hypot(f["full"].get("std") or 0.0, r["random"].get("std") or 0.0))
        if converged and full - rnd <= 2 * gap_noise:
          converged = False
          why = f"gap to full data {100 * (full - rnd):.2f} points ≤ 2 × its noise ({100 * gap_noise:.2f})"
        else:
          why = "converged" if converged else f"full data trained {f['full_epochs']} < {min_full_epochs} epochs"
        per_seed[r["seed"]] = dict(
            distilled=d, random=rnd, full=full, initial=r.get("initial", {}).get("mean"),
            full_epochs=f["full_epochs"], full_from=f["path"], run=r["path"],
            reference=why, gap_noise=gap_noise,
            gap=full - rnd, closed=d - rnd,
            fraction=(d - rnd) / (full - rnd) if converged and full != rnd else None,
            distilled_minus_full=d - full if f["full_epochs"] >= min_full_epochs else None,
            # the same fraction for DATM's initialisation (no image update): what the matching itself adds is the
            # difference of the two
            fraction_initial=(r["initial"]["mean"] - rnd) / (full - rnd)
            if converged and full != rnd and "initial" in r else None)
      fr = [v["fraction"] for v in per_seed.values() if v["fraction"] is not None]
      fi = [v["fraction_initial"] for v in per_seed.values() if v["fraction_initial"] is not None]
      rows[str(ipc)] = dict(per_seed=per_seed, fraction=mean_std(fr) if fr else None,
                            fraction_initial=mean_std(fi) if fi else None,
                            gap=mean_std([v["gap"] for v in per_seed.values() if v["fraction"] is not None]),
                            distilled_minus_full=mean_std([v["distilled_minus_full"] for v in per_seed.values()]))
    out[ds] = rows
  return out


def launch(dataset: str, root: str, ipcs, seeds) -> list[str]:
  """Run the dataset's variant at each IPC and seed (resumable: a finished run is kept); the workdirs."""
  dirs = []
  for seed in seeds:
    experts = ""
    for ipc in ipcs:
      d = os.path.join(root, f"{dataset}_ipc{ipc}_seed{seed}")
      variant = LAUNCH[dataset].format(ipc=ipc)
      cmd = [sys.executable, os.path.join(ROOT, "launch", "run.py"),
             f"--config={os.path.join(ROOT, 'configs', 'datm.py')}:variant={variant},seed={seed}", f"--workdir={d}"]
      windows_sweep.run_once(cmd + ([f"--config.experts.dir={experts}"] if experts else []), d)
      experts = experts or os.path.join(d, "experts")
      dirs.append(d)
  return dirs


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("runs", nargs="*", help="finished runs: workdirs or results.json files")
  ap.add_argument("--launch", default="", choices=("",) + tuple(LAUNCH), help="run this dataset's variants first")
  ap.add_argument("--root", default="runs/datm_gap", help="workdirs of --launch")
  ap.add_argument("--ipcs", default="10,50,100")
  ap.add_argument("--seeds", default="0,1")
  ap.add_argument("--min_full_epochs", type=int, default=15,
                  help="a full-data reference trained fewer epochs is not converged: no fraction for that seed")
  ap.add_argument("--out", default="", help="write <out>.json")
  a = ap.parse_args(argv)
  paths = list(a.runs)
  if a.launch:
    paths += launch(a.launch, a.root, [int(x) for x in a.ipcs.split(",")], [int(x) for x in a.seeds.split(",")])
  if not paths:
    ap.error("no runs: give finished runs or --launch")
  summary = summarize([load(p) for p in paths], a.min_full_epochs)
  if a.out:
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out + ".json", "w") as f:
      json.dump(summary, f, indent=1)
  for ds, rows in summary.items():
    for ipc, row in rows.items():
      cells = ", ".join(f"seed {s}: {100 * v['distilled']:.1f} vs random {100 * v['random']:.1f} / full "
                        f"{100 * v['full']:.1f} → " + (f"{v['fraction']:.2f}" if v["fraction"] is not None
                                                      else v["reference"]) for s, v in row["per_seed"].items())
      fr = row["fraction"]
      tail = f"{fr['mean']:.2f} ± {fr['std']:.2f} (n={fr['n']})" if fr and fr["std"] is not None else "n/a"
      fi = row["fraction_initial"]
      tail_i = f"{fi['mean']:.2f} ± {fi['std']:.2f} (n={fi['n']})" if fi and fi["std"] is not None else "n/a"
      print(f"{ds} IPC {ipc}: fraction closed {tail} (initial set: {tail_i}); {cells}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
