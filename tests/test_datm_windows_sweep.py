"""experiments/datm/windows_sweep.py: the run commands it issues (the window fields the driver reads) and its summary
(per-seed accuracies → mean ± sample std, the best window and whether it beats the runner-up beyond the noise, whether
the best window moves later with IPC), on results.json files written here with known numbers."""
import importlib.util
import json
import os

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location(
    "windows_sweep", os.path.join(HERE, "..", "experiments", "datm", "windows_sweep.py"))
ws = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ws)


def _write(root, ipc, window, seed, acc):
  d = ws.run_dir(str(root), ipc, window, seed)
  os.makedirs(d)
  with open(os.path.join(d, "results.json"), "w") as f:
    json.dump({"distilled": {"mean": acc, "std": 0.0, "n": 3}, "seconds_per_iteration": 0.1}, f)


def test_summary_statistics_and_verdicts(tmp_path):
  acc = {1: {"early": [0.60, 0.62, 0.64], "late": [0.50, 0.52, 0.51]},
         10: {"early": [0.90, 0.92, 0.94], "late": [0.93, 0.94, 0.93]}}
  for ipc, rows in acc.items():
    for w, xs in rows.items():
      for s, x in enumerate(xs):
        _write(tmp_path, ipc, w, s, x)
  out = ws.summarize(str(tmp_path), [1, 10], [0, 1, 2], ["early", "late"])
  r = out["ipc"]["1"]["rows"]["early"]
  assert r["n"] == 3 and r["mean"] == pytest.approx(0.62) and r["std"] == pytest.approx(0.02)  # sample std
  assert out["ipc"]["1"]["best"]["window"] == "early" and out["ipc"]["1"]["best"]["beyond_noise"]
  b10 = out["ipc"]["10"]["best"]
  late, early = np.array(acc[10]["late"]), np.array(acc[10]["early"])
  assert b10["window"] == "late" and b10["margin"] == pytest.approx(late.mean() - early.mean())
  assert b10["beyond_noise"] is False  # 0.0133 < 2 × max(0.0058, 0.02)
  assert out["best_moves_later_with_ipc"] is True
  ws.plot(out, str(tmp_path / "plot.png"))
  assert os.path.getsize(tmp_path / "plot.png") > 0


def test_missing_seeds_give_no_verdict(tmp_path):
  _write(tmp_path, 1, "early", 0, 0.6)
  _write(tmp_path, 1, "late", 0, 0.5)
  out = ws.summarize(str(tmp_path), [1], [0, 1], ["early", "late"])
  assert out["ipc"]["1"]["best"] is None and out["ipc"]["1"]["rows"]["early"]["std"] is None


def test_commands_set_the_window_and_share_the_experts():
  cmd = ws.command("/r", 50, "sequential", 2, "/r/ipc1_early_seed2/experts", 3, False)
  assert "configs/datm.py:variant=ipc50,seed=2" in " ".join(cmd)
  for field in ("--config.distill.min_start_epoch=0", "--config.distill.current_max_start_epoch=3",
                "--config.distill.max_start_epoch=6", "--config.distill.sequential=True",
                "--config.experts.dir=/r/ipc1_early_seed2/experts", "--config.eval.num=3"):
    assert field in cmd
  late = ws.command("/r", 1, "late", 0, "", 3, False)
  assert "--config.distill.min_start_epoch=4" in late and "--config.distill.sequential=False" in late
  assert not any(c.startswith("--config.experts.dir") for c in late)


def test_merge_fills_cells_from_an_earlier_summary_and_runs_take_precedence(tmp_path):
  old_root, new_root = tmp_path / "old", tmp_path / "new"
  for s, x in enumerate([0.70, 0.74]):
    _write(old_root, 1, "early", s, x)
  old = ws.summarize(str(old_root), [1], [0, 1], ["early"])
  path = str(tmp_path / "old.json")
  with open(path, "w") as f:
    json.dump(old, f)
  _write(new_root, 1, "early", 1, 0.80)  # seed 1 re-run here: this value wins over the merged 0.74
  _write(new_root, 10, "early", 0, 0.90)
  _write(new_root, 10, "early", 1, 0.94)
  out = ws.summarize(str(new_root), [1, 10], [0, 1], ["early"], merge=[path])
  r = out["ipc"]["1"]["rows"]["early"]
  assert r["per_seed"][0]["source"] == path and "source" not in r["per_seed"][1]
  assert r["mean"] == pytest.approx(0.75) and r["std"] == pytest.approx(np.std([0.70, 0.80], ddof=1))
  assert out["ipc"]["10"]["rows"]["early"]["mean"] == pytest.approx(0.92)
  assert ws.main(["--root", str(new_root), "--summarize_only", "--ipcs=1", "--seeds=0,1", "--windows=early",
                  "--merge", str(tmp_path / "nope.json")]) == 2
