"""launch/run.py end to end (twice: the second run resumes), clear errors, launcher argument building, and how
every way a run can end is recorded in run.json."""
import errno
import json
import os
import subprocess
import sys
import types

import ml_collections
import pytest

from lmx import launcher
from lmx.core import workdir as wd
from lmx.core.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = [sys.executable, os.path.join(ROOT, "launch", "run.py")]


def _run(*args, timeout=300):
  env = dict(os.environ, LMX_NO_PROGRESS="1", JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return subprocess.run(RUN + list(args), cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_smoke_twice_second_resumes(tmp_path):
  w = str(tmp_path / "w")
  common = ["--config=configs/lm.py:smoke", f"--workdir={w}", "--config.train.ckpt_every=10",
            "--config.train.eval_every=10"]
  r1 = _run(*common, "--config.train.steps=20")
  assert r1.returncode == 0, r1.stderr[-3000:]
  r2 = _run(*common, "--config.train.steps=30")
  assert r2.returncode == 0, r2.stderr[-3000:]
  assert "resumed_from_step=20" in r2.stdout
  steps = [json.loads(line)["step"] for line in open(os.path.join(w, "metrics.jsonl"))]
  assert max(steps) == 30 and 20 in steps
  res = json.load(open(os.path.join(w, "results.json")))
  assert res["resumed_from"] == 20
  assert os.path.exists(os.path.join(w, "plots", "loss.png"))
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(w, "tb")))
  losses = [json.loads(line).get("train/loss") for line in open(os.path.join(w, "metrics.jsonl"))]
  losses = [x for x in losses if x is not None]
  assert losses[-1] < losses[0]


@pytest.mark.parametrize("args,needle", [
    (["--config=configs/lm.py:smoke", "--config.no_such_field=1"], "config has no field 'no_such_field'"),
    (["--config=configs/lm.py:smoke", "--config.method=nope"], "valid methods"),
    (["--config=configs/lm.py:smoke", "--workdir=/proc/lmx_cannot_write"], "is not writable"),
    (["--config=configs/lm.py:nope"], "valid variants"),
])
def test_bad_input_gives_a_short_clear_error(args, needle, tmp_path):
  if not any(a.startswith("--workdir") for a in args):
    args = args + [f"--workdir={tmp_path}/w"]
  r = _run(*args, timeout=120)
  assert r.returncode != 0
  assert needle in r.stderr, r.stderr[-2000:]
  assert "Traceback" not in r.stderr
  assert len(r.stderr.strip().splitlines()) <= 4


@pytest.mark.parametrize("body,line,error", [
    ("  c.x = [1, 2\n  return c\n", 6, "SyntaxError: '[' was never closed"),
    ("  c.n = int('x')\n  return c\n", 6, "ValueError: invalid literal for int() with base 10: 'x'"),
    ("  return c.steps_typo + 1\n", 6, "AttributeError"),
])
def test_an_error_in_the_users_config_file_is_one_line_with_file_and_line(tmp_path, body, line, error):
  cfg = tmp_path / "my_config.py"
  cfg.write_text("import ml_collections\n\ndef get_config(arg=None):\n  c = ml_collections.ConfigDict()\n"
                 "  c.method = 'lm'\n" + body)
  r = _run(f"--config={cfg}", f"--workdir={tmp_path}/w", timeout=120)
  assert r.returncode == 2
  assert r.stderr.strip().splitlines() == [r.stderr.strip()], r.stderr[-3000:]  # one line, no traceback
  assert r.stderr.startswith(f"error: {cfg}:{line}: {error}"), r.stderr
  assert not os.path.exists(tmp_path / "w")


def test_xm_launch_arguments():
  sys.path.insert(0, ROOT)
  from launch import xm_launch

  jobs = xm_launch.parse_sweep("optim.lr=1e-3,3e-3;seed=0,1")
  assert len(jobs) == 4 and jobs[1] == {"optim.lr": "1e-3", "seed": "1"}
  args = xm_launch.job_args("configs/datm.py:smoke", "gs://b/x/", "datm", 3, jobs[1])
  assert args == {"config": "configs/datm.py:smoke", "workdir": "gs://b/x/datm/3", "config.optim.lr": "1e-3",
                  "config.seed": "1"}
  assert xm_launch.requirements_kwargs("A100=2") == {"A100": 2}
  assert xm_launch.parse_sweep("") == [{}]
  with pytest.raises(ValueError):
    xm_launch.parse_sweep("lr")


def test_tpu_vm_script_is_valid_bash():
  assert subprocess.run(["bash", "-n", os.path.join(ROOT, "launch", "tpu_vm.sh")]).returncode == 0


# ------------------------------------------------------------------------------ how a run's end is recorded


@pytest.fixture
def method(monkeypatch):
  """``method(run)`` makes the launcher dispatch to a method whose ``run(config, workdir)`` is ``run``."""
  def use(run):
    monkeypatch.setattr(launcher, "method_module", lambda config: types.SimpleNamespace(run=run))
    return ml_collections.ConfigDict({"method": "fake", "seed": 0})
  return use


def _status(w):
  return json.load(open(os.path.join(w, "run.json")))


def test_a_second_ctrl_c_records_interrupted(tmp_path, method):
  def run(config, workdir):
    raise KeyboardInterrupt  # what the second Ctrl-C raises wherever the run is
  w = str(tmp_path / "w")
  with pytest.raises(KeyboardInterrupt):
    launcher.dispatch(method(run), w)
  rec = _status(w)
  assert rec["status"] == "interrupted" and "stopped at once" in rec["stopped"], rec


def test_system_exit_inside_a_run_records_failed(tmp_path, method):
  def run(config, workdir):
    open(os.path.join(workdir, "metrics.jsonl"), "w").close()
    sys.exit(3)  # a library that exits
  w = str(tmp_path / "w")
  with pytest.raises(SystemExit):
    launcher.dispatch(method(run), w)
  assert _status(w)["status"] == "failed" and _status(w)["error"] == "SystemExit: 3"


def test_a_config_error_after_the_run_wrote_something_records_failed(tmp_path, method):
  """A user error found before any work leaves the workdir as it was (a new one is removed); found after the run
  wrote its first outputs, it is a failed run like any other."""
  def late(config, workdir):
    open(os.path.join(workdir, "metrics.jsonl"), "w").write("{}\n")
    raise ConfigError("games.cache_dir: game file x.z8: truncated")

  def early(config, workdir):
    raise ConfigError("experts.dir: no such directory")
  w = str(tmp_path / "w")
  with pytest.raises(ConfigError, match="truncated"):
    launcher.dispatch(method(late), w)
  assert _status(w)["status"] == "failed" and "truncated" in _status(w)["error"]
  fresh = str(tmp_path / "fresh")
  with pytest.raises(ConfigError):
    launcher.dispatch(method(early), fresh)
  assert not os.path.exists(fresh)


def test_disk_full_is_a_user_error_recorded_failed_even_when_run_json_cannot_be_written(tmp_path, method, monkeypatch):
  err = wd.StorageError(errno.ENOSPC, "cannot write a checkpoint in /x: no space left on device; free space", "/x")

  def run(config, workdir):
    open(os.path.join(workdir, "metrics.jsonl"), "w").close()
    raise err
  w = str(tmp_path / "w")
  with pytest.raises(wd.StorageError) as e:
    launcher.dispatch(method(run), w)
  assert e.value is err and isinstance(err, launcher.USER_ERRORS) and isinstance(err, OSError)
  assert _status(w)["status"] == "failed" and "no space left on device" in _status(w)["error"]
  real = wd.write_record

  def full(workdir, **fields):  # the disk is full for run.json too: the run's own error is still the one raised
    if fields.get("status") == "failed":
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real(workdir, **fields)
  monkeypatch.setattr(wd, "write_record", full)
  with pytest.raises(wd.StorageError) as e:
    launcher.dispatch(method(run), str(tmp_path / "w2"))
  assert e.value is err


def test_a_workdir_path_past_the_os_limit_is_refused_before_anything_is_created(tmp_path):
  w = str(tmp_path)
  while len(w) < 3950:
    w = os.path.join(w, "y" * 200)
  with pytest.raises(ConfigError, match=r"--workdir=.*yyy: file name too long; the path is \d+ characters"):
    launcher.check_workdir(w)
  assert os.listdir(tmp_path) == []
