r"""Difficulty alignment as the DATM paper shows it: distilled-set accuracy vs the matching window, one line per IPC,
the window of each IPC's config variant marked.

Each run is a results.json of ``launch/run.py --config=configs/datm.py:<ipc variant>`` with the window set by
``--config.distill.min_start_epoch=a --config.distill.max_start_epoch=b --config.distill.current_max_start_epoch=b
--config.distill.sequential=False``; the window [T⁻, T⁺] is read back from the file's config, never from its name.

  PYTHONPATH=. python experiments/datm/windows_plot.py --out=experiments/datm/results/windows.png \
      --json=experiments/datm/results/windows.json runs/w_ipc1_early/results.json ...
"""
from __future__ import annotations

import argparse
import json

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from configs import datm as datm_config  # noqa: E402

VARIANT_OF_IPC = {1: "ipc1", 10: "", 50: "ipc50", 100: "ipc100"}


def window_of(cfg) -> tuple[int, int]:
  """[T⁻, T⁺): the start epochs a DATM config samples from at the end of its run (sequential generation grows T⁺
  to ``max_start_epoch``)."""
  d = cfg["distill"]
  return int(d["min_start_epoch"]), int(d["max_start_epoch"])


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("runs", nargs="+", help="results.json files")
  ap.add_argument("--out", required=True)
  ap.add_argument("--json", default="")
  a = ap.parse_args()
  rows = []
  for path in a.runs:
    r = json.load(open(path))
    lo, hi = window_of(r["config"])
    rows.append(dict(ipc=int(r["ipc"]), window=[lo, hi], sequential=bool(r["config"]["distill"]["sequential"]), distilled=r["distilled"], initial=r.get("initial"),
                     random=r.get("random"), seed=r["seed"], file=path))
  ipcs = sorted({r["ipc"] for r in rows})
  fig, axes = plt.subplots(1, len(ipcs), figsize=(3.6 * len(ipcs), 3.6), squeeze=False, sharex=True)
  summary = {}
  for ax, ipc in zip(axes[0], ipcs):  # one panel per IPC: their accuracies differ by 30 points
    rs = sorted((r for r in rows if r["ipc"] == ipc), key=lambda r: (sum(r["window"]), r["window"]))
    default = window_of(datm_config.get_config(VARIANT_OF_IPC.get(ipc, "")).to_dict())
    xs = np.array([sum(r["window"]) / 2 for r in rs])  # centre of the window [T⁻, T⁺), in expert epochs
    m = np.array([100 * r["distilled"]["mean"] for r in rs])
    s = np.array([100 * r["distilled"]["std"] for r in rs])
    fixed = np.array([not r["sequential"] for r in rs])  # a fixed window; sequential runs grow T⁺ (own marker)
    ax.errorbar(xs[fixed], m[fixed], yerr=s[fixed], marker="o", capsize=3, color="C0", label="fixed window")
    if (~fixed).any():
      ax.errorbar(xs[~fixed], m[~fixed], yerr=s[~fixed], marker="s", capsize=3, color="C2", ls="none",
                  label="sequential generation (T⁺ grows)")
    for x, y, r in zip(xs, m, rs):
      if tuple(r["window"]) == default:
        ax.plot([x], [y], marker="*", ms=16, color="C1", mec="k", ls="none", label="the variant's default")
      ax.annotate(f"[{r['window'][0]}, {r['window'][1]})", (x, y), textcoords="offset points", xytext=(0, 9),
                  ha="center", fontsize=7)
    ax.margins(y=0.25)
    ax.set_title(f"IPC {ipc}", fontsize=10)
    ax.set_xlabel("window centre (expert epoch)")
    ax.legend(fontsize=7, loc="lower right")
    summary[f"ipc{ipc}"] = dict(default_window=list(default), runs=rs)
  axes[0][0].set_ylabel("distilled-set test accuracy (%)")
  fig.suptitle("DATM, MNIST-5k: accuracy vs matching window [T⁻, T⁺) (mean ± std over evaluation nets)",
               fontsize=10)
  fig.tight_layout()
  fig.savefig(a.out, dpi=120)
  print(f"wrote {a.out}")
  if a.json:
    with open(a.json, "w") as f:
      json.dump(summary, f, indent=1)
    print(f"wrote {a.json}")


if __name__ == "__main__":
  main()
