"""Metric writer (jsonl + TensorBoard + console) and PNG plot helpers."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from lmx import launcher
from lmx.core import metrics, plots
from lmx.core import workdir as wd
from lmx.core.config import ConfigError


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


def test_object_store_workdir_without_its_client_says_what_to_install(tmp_path, monkeypatch):
  """gs:// without google-cloud-storage: tensorboardX's ImportError traceback, after a local folder named 'gs:'
  was made; now one ConfigError naming the pip packages, before anything is written."""
  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(wd, "_have", lambda module: False)
  with pytest.raises(ConfigError, match=r"^gs://bucket/run: writing to gs:// needs google-cloud-storage for its "
                     r"TensorBoard events \(tensorboardX\).*: pip install google-cloud-storage$"):
    metrics.Writer("gs://bucket/run")
  with pytest.raises(ConfigError, match=r"^--workdir=gs://bucket/run: .*google-cloud-storage.* and gcsfs for its "
                     r"checkpoints .*: pip install google-cloud-storage gcsfs$"):
    launcher.check_workdir("gs://bucket/run")
  assert os.listdir(tmp_path) == []
  monkeypatch.setattr(wd, "_have", lambda module: module in ("google.cloud.storage", "tensorflow"))
  assert wd.remote_problem("gs://bucket/run") is None  # TensorFlow's gfile writes checkpoints to gs:// itself
  assert wd.remote_problem("s3://bucket/run").endswith("which this Python lacks: pip install boto3")
  assert wd.remote_problem(str(tmp_path)) is None


def test_a_file_where_tb_goes_is_one_error(tmp_path):
  (tmp_path / "tb").write_text("notes")
  with pytest.raises(ConfigError, match=rf"{tmp_path / 'tb'} is a file, not a directory"):
    metrics.Writer(str(tmp_path))
  assert (tmp_path / "tb").read_text() == "notes"


def test_disk_full_while_writing_metrics_is_one_error_naming_the_workdir(tmp_path):
  import errno

  class Full:
    def write(self, text):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def close(self):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  w = metrics.Writer(str(tmp_path), tensorboard=False)
  w._jsonl.close()
  w._jsonl = Full()
  with pytest.raises(wd.StorageError, match=rf"^cannot write metrics in {tmp_path}: no space left on device;"):
    w.scalars(1, {"loss": 1.0})
  with pytest.raises(wd.StorageError, match="no space left on device"):
    w.close()
  w.close()  # closed: nothing left to fail
