"""The workdir's lock, run record and config comparison (lmx.core.workdir, lmx.launcher.plan_resume)."""
import json
import os
import subprocess
import sys
import time

import pytest

from lmx import launcher
from lmx.core import workdir as wd
from lmx.core.config import ConfigError, load_config_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_second_lock_on_a_workdir_refuses_naming_the_holder(tmp_path):
  with wd.WorkdirLock(str(tmp_path)):
    with pytest.raises(wd.WorkdirBusyError, match=rf"in use .*pid {os.getpid()}"):
      wd.WorkdirLock(str(tmp_path)).acquire()
  with wd.WorkdirLock(str(tmp_path)) as lock:  # released on exit
    assert not lock.previous_run_died()  # released cleanly: the file was emptied


def test_lock_of_a_killed_process_is_free_and_named(tmp_path):
  code = ("import sys, time; sys.path.insert(0, sys.argv[2]); from lmx.core import workdir as wd; "
          "wd.WorkdirLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)")
  p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path), ROOT], stdout=subprocess.PIPE, text=True)
  assert p.stdout.readline().strip() == "held"
  with pytest.raises(wd.WorkdirBusyError, match=rf"pid {p.pid}"):
    wd.WorkdirLock(str(tmp_path)).acquire()
  p.kill()
  p.wait()
  time.sleep(0.1)
  with wd.WorkdirLock(str(tmp_path)) as lock:  # the kernel released the dead process's lock
    assert lock.previous["pid"] == p.pid and lock.previous_run_died()


def _holder(workdir, started=None):
  """A process that takes the workdir's lock and records itself in run.json as a running run (what the launcher
  does), then waits to be killed."""
  code = ("import sys, time; sys.path.insert(0, sys.argv[2]); from lmx.core import workdir as wd; "
          "lock = wd.WorkdirLock(sys.argv[1]).acquire(); import os, socket; "
          "wd.write_record(sys.argv[1], replace=True, status='running', pid=os.getpid(), host=socket.gethostname(), "
          "started=sys.argv[3] if len(sys.argv) > 3 else wd.now(), command='launch/run.py --workdir=w'); "
          "print('held', flush=True); time.sleep(60)")
  p = subprocess.Popen([sys.executable, "-c", code, str(workdir), ROOT] + ([started] if started else []),
                       stdout=subprocess.PIPE, text=True)
  assert p.stdout.readline().strip() == "held"
  return p


def test_a_deleted_lock_file_does_not_let_a_second_run_in(tmp_path):
  """rm .lock under a live run: the next run finds run.json saying 'running' for that live process and refuses,
  naming it; once that process is gone the workdir is free again."""
  p = _holder(tmp_path)
  try:
    os.remove(tmp_path / wd.LOCK_FILE)
    with pytest.raises(wd.WorkdirBusyError, match=rf"in use by a run that is still going \(pid {p.pid} on .*"
                       r"launch/run.py --workdir=w\), although its .lock file was deleted"):
      wd.WorkdirLock(str(tmp_path)).acquire()
    with pytest.raises(wd.WorkdirBusyError):  # and again: refusing left nothing that would let the next one in
      wd.WorkdirLock(str(tmp_path)).acquire()
  finally:
    p.kill()
    p.wait()
  with wd.WorkdirLock(str(tmp_path)):  # killed: its 'running' record no longer holds the workdir
    pass


def test_a_running_record_whose_pid_now_names_a_newer_process_does_not_hold_the_workdir(tmp_path):
  p = _holder(tmp_path, started="2001-01-01T00:00:00")  # the record is older than the live process with its pid
  try:
    os.remove(tmp_path / wd.LOCK_FILE)
    assert wd.running_elsewhere(str(tmp_path)) is None
    with wd.WorkdirLock(str(tmp_path)):
      pass
  finally:
    p.kill()
    p.wait()


def test_config_changes_and_safe_patterns():
  old = {"a": 1, "b": {"c": [1, 2], "d": "x"}, "e": 3}
  new = {"a": 1, "b": {"c": (1, 2), "d": "y"}, "f": 4}
  assert wd.config_changes(old, new) == [("b.d", "x", "y"), ("e", 3, "<absent>"), ("f", "<absent>", 4)]
  assert wd.matches("eval.num", ["eval.*"]) and wd.matches("mesh", ["mesh"])
  assert not wd.matches("evaluation.num", ["eval.*"]) and not wd.matches("train.steps2", ["train.steps"])


def test_only_bookkeeping(tmp_path):
  (tmp_path / wd.LOCK_FILE).write_text("")
  (tmp_path / wd.RECORD_FILE).write_text("{}")
  (tmp_path / "tb").mkdir()
  assert wd.only_bookkeeping(str(tmp_path))
  (tmp_path / "tb" / "events").write_text("x")
  assert not wd.only_bookkeeping(str(tmp_path))


def _datm_cfg():
  return json.loads(json.dumps(load_config_file(f"{ROOT}/configs/datm.py:smoke").to_dict()))


def test_plan_resume_refuses_unsafe_changes_and_allows_safe_ones(tmp_path, capsys):
  from lmx.methods import datm

  w = str(tmp_path)
  old = _datm_cfg()
  new = _datm_cfg()
  new["model"]["width"] = 32
  with pytest.raises(ConfigError, match=r"model.width: 8 → 32"):
    launcher.plan_resume(datm, old, new, {"status": "interrupted"}, w)
  new = _datm_cfg()
  new["eval"]["num"] = 7
  new["distill"]["iterations"] = 40
  assert launcher.plan_resume(datm, old, new, {"status": "finished"}, w) == "resume"
  assert "eval.num: 3 → 7" in capsys.readouterr().out
  (tmp_path / "results.json").write_text("{}")
  new["distill"]["iterations"] = old["distill"]["iterations"]
  assert launcher.plan_resume(datm, old, new, {"status": "finished"}, w) == "finished"
  new["distill"]["iterations"] = 10
  with pytest.raises(ConfigError, match=r"already holds 30 steps but distill.iterations=10"):
    launcher.plan_resume(datm, old, new, {"status": "finished"}, w)
  assert launcher.plan_resume(datm, None, new, None, w) == "fresh"


def test_config_spec_problems():
  os.chdir(ROOT)
  assert launcher.config_spec_problem("configs/lm.py:smoke") is None
  assert launcher.config_spec_problem("configs/lm.py") is None
  assert "did you mean --config=configs/datm.py:ipc50" in launcher.config_spec_problem("configs/datm.py.ipc50")
  assert "did you mean --config=configs/lm.py" in launcher.config_spec_problem("configs/lm")
  assert "configs/datm.py" in launcher.config_spec_problem("configs/nope.py")
  assert "one variant" in launcher.config_spec_problem("configs/lm.py:smoke,moe")
  assert launcher.config_spec_problem("configs/lm.py:variant=smoke,seed=2") is None


@pytest.mark.parametrize("sub", ["tb", "plots", "checkpoints"])
def test_a_file_where_an_output_folder_goes_stops_the_run_before_any_compute(tmp_path, monkeypatch, sub):
  """tb/ failed with tensorboardX's traceback when the writer opened, plots/ only after all the training: both are
  checked with the workdir, before the method runs."""
  import types

  import ml_collections

  ran = []
  monkeypatch.setattr(launcher, "method_module", lambda config: types.SimpleNamespace(run=lambda c, w: ran.append(w)))
  w = tmp_path / "w"
  w.mkdir()
  (w / sub).write_text("mine")
  with pytest.raises(ConfigError, match=rf"^{w / sub} is a file, not a directory: move it out of the way"):
    launcher.dispatch(ml_collections.ConfigDict({"method": "fake"}), str(w))
  assert not ran and (w / sub).read_text() == "mine" and sorted(os.listdir(w)) == [sub]
