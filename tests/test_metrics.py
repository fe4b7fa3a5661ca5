"""Metric writer (jsonl + TensorBoard + console) and PNG plot helpers."""
import json
import os

import jax.numpy as jnp
import numpy as np

from lmx.core import metrics, plots


def test_writer_jsonl_tensorboard_and_summary(tmp_path, capsys):
  with metrics.Writer(str(tmp_path), total_steps=10) as w:
    w.scalars(1, {"loss": jnp.float32(2.5)}, prefix="train/")
    w.summary(2, {"loss": 2.0, "acc": np.float64(0.5)}, prefix="train/")
  recs = metrics.read_jsonl(str(tmp_path / "metrics.jsonl"))
  assert [r["step"] for r in recs] == [1, 2] and recs[1]["train/acc"] == 0.5
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tb"))
  assert "[step 2/10] train/loss=2 train/acc=0.5" in capsys.readouterr().out


def test_plots_write_pngs(tmp_path):
  p = plots.curves(str(tmp_path / "c.png"), {"a": ([0, 1, 2], [3, 2, 1])}, bands={"a": [0.1, 0.1, 0.1]})
  g = plots.image_grid(str(tmp_path / "g.png"), np.random.rand(6, 8, 8, 1), nrow=2, row_labels=["x", "y"])
  with open(tmp_path / "m.jsonl", "w") as f:
    for s in range(3):
      f.write(json.dumps({"step": s, "train/loss": 1.0 / (s + 1)}) + "\n")
  j = plots.from_jsonl(str(tmp_path / "m.jsonl"), ["train/loss"], str(tmp_path / "j.png"))
  for path in (p, g, j):
    with open(path, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_non_finite_scalars_stay_in_jsonl_and_out_of_tensorboard(tmp_path, caplog):
  import logging

  from lmx.core.metrics import Writer, read_jsonl

  with caplog.at_level(logging.WARNING):
    with Writer(str(tmp_path)) as w:
      w.scalars(1, {"loss": float("nan"), "ok": 2.0})
  assert not [r for r in caplog.records if "NaN" in r.getMessage()]
  rec = read_jsonl(str(tmp_path / "metrics.jsonl"))[0]
  assert rec["ok"] == 2.0 and rec["loss"] != rec["loss"]  # NaN kept where a reader looks for it
