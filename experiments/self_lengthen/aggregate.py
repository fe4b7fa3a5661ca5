"""Merges the per-seed runs of ``configs/self_lengthen.py`` (one workdir per seed, each with its results.json) into
one summary (mean ± std over seeds), the plots and a markdown table.

  python experiments/self_lengthen/aggregate.py OUT_DIR RUN_DIR [RUN_DIR ...]
"""
import json
import os
import sys


from lmx.core.results import write_results
import importlib

sl_run = importlib.import_module("lmx.methods.self_lengthen.driver")  # the module (the package re-exports run())


def fmt(m, digits=2):
  """``mean ± sample std`` of a :func:`lmx.core.stages.mean_std` dict (n is stated once, under the table)."""
  if m["mean"] is None:
    return "n/a"
  return f"{m['mean']:.{digits}f} ± {'n/a' if m['std'] is None else format(m['std'], f'.{digits}f')}"


def main(out, runs):
  per_seed, walls = [], []
  for r in runs:
    with open(os.path.join(r, "results.json")) as f:
      res = json.load(f)
    per_seed += res["per_seed"]
    walls.append(res["wall_s"])
  n_iter = len(per_seed[0]["iters"])
  summary = sl_run.summarize(per_seed, n_iter)
  os.makedirs(out, exist_ok=True)
  write_results(out, {"method": "self_lengthen", "runs": runs, "seeds": [r["seed"] for r in per_seed],
                      "wall_s": walls, "summary": summary, "per_seed": per_seed})
  sl_run.plot_all(out, per_seed, n_iter)
  rows = ["| iter | words (all) | finished rate | words (finished) | EOS rate | repetition pass | punctuation pass "
          "| all filters | acceptance |", "|---|---|---|---|---|---|---|---|---|"]
  for row in summary["iters"]:
    acc = fmt(row["acceptance_rate"]) if "acceptance_rate" in row else "–"
    rows.append(f"| {row['iter']} | {fmt(row['words_mean'], 1)} | {fmt(row['finished_rate'])} | "
                f"{fmt(row['words_mean_finished'], 1)} | {fmt(row['eos_rate'])} | {fmt(row['pass_repetition'])} | "
                f"{fmt(row['pass_punctuation'])} | {fmt(row['pass_ok'])} | {acc} |")
  rows.append("")
  rows.append(f"length ratio (all outputs, last / iter 0): {fmt(summary['length_ratio'])}; finished outputs: "
              f"{fmt(summary['length_ratio_finished'])}")
  lf = ["| | overall | about | range | above | below |", "|---|---|---|---|---|---|"]
  for when in ("before", "after"):
    m = summary[f"length_following_{when}"]
    lf.append(f"| {when} | " + " | ".join(fmt(m[k]) for k in ("overall", "about", "range", "above", "below")) + " |")
  lf.append("")
  lf.append(f"mean ± sample std (ddof 1) over n = {len(per_seed)} seed(s)")
  text = "\n".join(rows + [""] + lf) + "\n"
  with open(os.path.join(out, "table.md"), "w") as f:
    f.write(text)
  print(text)


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2:])
