"""The ``lm`` method through launch/run.py: the workdir's layout, SIGTERM → exit 143 → the same command resumes to
the uninterrupted run's results, and a NaN loss stops with one line (the runtime's promises, on a shortened smoke
config; the in-process loop tests are in test_loop.py, the launcher's refusals in test_reliability.py)."""
import json
import os

import pytest

from tests import resume_check

CONFIG = "configs/lm.py:smoke"
# 40 steps, a checkpoint and a held-out evaluation every 20: the first checkpoint is mid-run
SHORT = ("--config.train.steps=40", "--config.train.ckpt_every=20", "--config.train.eval_every=20",
         "--config.train.log_every=10")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """One uninterrupted run of the shortened smoke config, shared by the tests below."""
  return resume_check.reference_run(tmp_path_factory, "lm", CONFIG, *SHORT)[0]


def test_workdir_layout_and_results(reference):
  resume_check.check_layout(reference)
  res = resume_check.results(reference)
  assert res["steps"] == 40 and res["wall_s"] > 0 and res["final_eval"]["eval/ce"] > 0
  assert not any(k.endswith("seconds") for k in res), sorted(res)  # one wall-time key: wall_s (and <phase>_wall_s)
  assert resume_check.record(reference)["status"] == "finished"


def test_sigterm_then_the_same_command_resumes_to_the_same_results(tmp_path, reference):
  res = resume_check.check_sigterm_resume(tmp_path, CONFIG, *SHORT, reference=reference)
  assert res["resumed_from"] == 20


def test_nan_loss_stops_with_one_line(tmp_path):
  line = resume_check.check_nan_stops(tmp_path, CONFIG, "train", 25, *SHORT)
  assert "last good checkpoint (step 20)" in line, line
  recs = [json.loads(x) for x in open(os.path.join(tmp_path, "nan-train", "metrics.jsonl"))]
  assert max(r["step"] for r in recs) <= 25
