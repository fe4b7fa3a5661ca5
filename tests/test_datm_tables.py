"""experiments/datm's summary scripts on results.json files written here with known numbers: gap_closed.py's fraction
of the gap to full data (hand-computed, the reference taken from the seed's longest-trained full arm, none when that is
not converged) and seeds_table.py's paired t-test (against a numerical integral of Student's t density)."""
import importlib.util
import json
import math
import os

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def _module(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(HERE, "..", "experiments", "datm", f"{name}.py"))
  m = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(m)
  return m


gc = _module("gap_closed")
st = _module("seeds_table")


def _arm(values):
  return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)), "n": len(values),
          "values": list(values)}


def _results(path, *, ipc, seed, full_epochs, d, r, f, i=None, dataset="digits"):
  os.makedirs(path)
  res = {"dataset": dataset, "ipc": ipc, "seed": seed, "full_epochs": full_epochs, "distilled": _arm(d),
         "random": _arm(r), "full": _arm(f), "wall_s": 1.0, "seconds_per_iteration": 0.1, "compile_wall_s": 0.0,
         "eval_wall_s": 0.0, "experts_wall_s": 0.0, "peak_rss_bytes": 0}
  if i is not None:
    res["initial"] = _arm(i)
  with open(os.path.join(path, "results.json"), "w") as fh:
    json.dump(res, fh)
  return str(path)


def test_gap_closed_fraction_by_hand_and_the_converged_reference(tmp_path):
  runs = [
      # seed 0: IPC 10 evaluated full data for 3 epochs only; IPC 50's 150-epoch full arm is the seed's reference
      _results(tmp_path / "a", ipc=10, seed=0, full_epochs=3, d=[0.90, 0.92], r=[0.80, 0.80], f=[0.85, 0.85]),
      _results(tmp_path / "b", ipc=50, seed=0, full_epochs=150, d=[0.96, 0.96], r=[0.94, 0.94], f=[0.98, 0.98]),
      _results(tmp_path / "c", ipc=10, seed=1, full_epochs=150, d=[0.88, 0.88], r=[0.78, 0.78], f=[0.98, 0.98],
               i=[0.83, 0.83]),
      # seed 2 has no converged reference: no fraction
      _results(tmp_path / "d", ipc=10, seed=2, full_epochs=3, d=[0.90, 0.90], r=[0.80, 0.80], f=[0.85, 0.85]),
  ]
  out = gc.summarize([gc.load(p) for p in runs], min_full_epochs=15)["digits"]
  s0 = out["10"]["per_seed"][0]
  assert s0["full"] == pytest.approx(0.98) and s0["full_from"].startswith(runs[1])
  assert s0["fraction"] == pytest.approx((0.91 - 0.80) / (0.98 - 0.80))  # 0.6111
  assert out["10"]["per_seed"][1]["fraction"] == pytest.approx(0.5)
  assert out["10"]["per_seed"][1]["fraction_initial"] == pytest.approx(0.25)  # (0.83 − 0.78) / 0.20
  assert out["10"]["per_seed"][0]["fraction_initial"] is None and out["10"]["fraction_initial"]["n"] == 1
  assert out["10"]["per_seed"][2]["fraction"] is None and "3 < 15" in out["10"]["per_seed"][2]["reference"]
  fr = out["10"]["fraction"]
  assert fr["n"] == 2 and fr["mean"] == pytest.approx((0.6111111 + 0.5) / 2)
  assert fr["std"] == pytest.approx(np.std([0.11 / 0.18, 0.5], ddof=1))
  assert out["50"]["per_seed"][0]["fraction"] == pytest.approx(0.5)


def test_gap_closed_gives_no_fraction_when_the_gap_is_within_noise(tmp_path):
  # full − random = 0.005 while the two arms' stds are 0.01: the ratio would divide by noise
  p = _results(tmp_path / "n", ipc=100, seed=0, full_epochs=150, d=[0.97, 0.98], r=[0.965, 0.975],
               f=[0.97, 0.98])
  row = gc.summarize([gc.load(p)])["digits"]["100"]
  assert row["per_seed"][0]["fraction"] is None and "noise" in row["per_seed"][0]["reference"]
  assert row["fraction"] is None


def test_gap_closed_refuses_a_run_without_the_random_or_full_arm(tmp_path):
  p = tmp_path / "r"
  os.makedirs(p)
  with open(p / "results.json", "w") as fh:
    json.dump({"dataset": "digits", "ipc": 10, "seed": 0, "distilled": _arm([0.9, 0.9])}, fh)
  with pytest.raises(SystemExit, match="random"):
    gc.load(str(p))


def _t_sf_numeric(t, df):
  """P(T > t) for Student's t by the trapezoid rule on its density (independent of scipy)."""
  x = np.linspace(t, t + 400, 2_000_001)
  c = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))
  y = c * (1 + x ** 2 / df) ** (-(df + 1) / 2)
  return float(np.sum((y[1:] + y[:-1]) / 2 * np.diff(x)))


def test_paired_t_test_by_hand():
  a = [0.95, 0.96, 0.97, 0.96, 0.96]
  b = [0.94, 0.94, 0.94, 0.94, 0.94]  # d = .01 .02 .03 .02 .02: mean .02, sd √(0.0002 / 4)
  r = st.paired(a, b)
  t = 0.02 / (math.sqrt(0.0002 / 4) / math.sqrt(5))
  assert r["t"] == pytest.approx(t, rel=1e-6)  # 6.3246
  assert r["p_two_sided"] == pytest.approx(2 * _t_sf_numeric(t, 4), rel=1e-4)
  assert 0.001 < r["p_two_sided"] < 0.01


def test_beyond_noise_verdict_per_run(tmp_path):
  strong = _results(tmp_path / "s", ipc=1, seed=0, full_epochs=3, d=[0.80, 0.82, 0.78, 0.81, 0.79],
                    r=[0.5] * 5, f=[0.9] * 5, i=[0.60, 0.63, 0.59, 0.62, 0.61])
  weak = _results(tmp_path / "w", ipc=1, seed=1, full_epochs=3, d=[0.942, 0.952, 0.935, 0.932, 0.944],
                  r=[0.9] * 5, f=[0.9] * 5, i=[0.941, 0.936, 0.935, 0.935, 0.944])  # §00's seed 0: +0.28
  assert st.one(strong)["distilled_minus_initial"]["beyond_noise"] is True
  w = st.one(weak)["distilled_minus_initial"]
  assert w["beyond_noise"] is False and w["p_two_sided"] > 0.05 and w["in_combined_stds"] < 2


def test_launch_resumes_finished_runs_and_stops_on_a_failed_one(tmp_path):
  for seed in (0, 1):  # every run finished: nothing is launched, the workdirs come back in order
    _results(tmp_path / f"digits_ipc10_seed{seed}", ipc=10, seed=seed, full_epochs=150, d=[0.9, 0.9], r=[0.8, 0.8],
             f=[0.98, 0.98])
  assert gc.launch("digits", str(tmp_path), [10], [0, 1]) == [str(tmp_path / "digits_ipc10_seed0"),
                                                               str(tmp_path / "digits_ipc10_seed1")]
  import sys
  with pytest.raises(SystemExit, match="exit 3"):
    gc.windows_sweep.run_once([sys.executable, "-c", "import sys; sys.stderr.write('boom'); sys.exit(3)"],
                              str(tmp_path / "new"))
