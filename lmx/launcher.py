"""What ``launch/run.py`` does, importable (tests, Colab): distributed init, workdir checks, method dispatch.

A run's life in its workdir (see :mod:`lmx.core.workdir`):
  1. the config is validated by the method (``lmx.methods.<m>.validate``) before the workdir is created;
  2. a workdir whose record says *finished* with the same config is left untouched ("already finished", exit 0);
     asking it for more steps (the method's ``STEPS_FIELD``) continues it, for fewer refuses;
  3. any other config change is refused unless the field is declared safe to change (``F(..., safe=True)`` in the
     config file's schema; then printed);
  4. the workdir's lock is taken (a second run on it refuses, naming the first), ``run.json`` says *running*;
  5. the method runs; ``run.json`` ends as finished / interrupted (a signal, a second Ctrl-C) / failed (any error,
     ``SystemExit`` included). A user error (``ConfigError``) before the run wrote anything leaves the workdir as
     it was (and removes it when this run created it).
"""
from __future__ import annotations

import datetime
import glob
import importlib
import os
import pkgutil
import shutil
import socket
import sys
import traceback

import lmx.methods
from lmx.core import interrupt
from lmx.core import workdir as wd
from lmx.core.config import ConfigError, check_finite_numbers

# Errors that are the user's to fix: print the message alone (no traceback) and exit 2.
USER_ERRORS = (ConfigError, FileNotFoundError, PermissionError, FloatingPointError, wd.StorageError)
# The longest path lmx writes below a workdir (a stage's checkpoint data file while it is being committed) is under
# 200 characters; a workdir whose path leaves less room than this below the OS limit is refused up front.
WORKDIR_PATH_ROOM = 256


def available_methods() -> list[str]:
  return sorted(m.name for m in pkgutil.iter_modules(lmx.methods.__path__) if m.ispkg)


def is_multihost_env() -> bool:
  """LMX_DISTRIBUTED=1, or a multi-worker Cloud TPU VM (detected from its environment)."""
  if os.environ.get("LMX_DISTRIBUTED", "") not in ("", "0"):
    return True
  return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def maybe_initialize_distributed() -> bool:
  """Calls ``jax.distributed.initialize`` when multi-host; coordinator args from LMX_* env vars if given."""
  if not is_multihost_env():
    return False
  import jax

  kw = {}
  if os.environ.get("LMX_COORDINATOR"):
    kw = dict(coordinator_address=os.environ["LMX_COORDINATOR"],
              num_processes=int(os.environ["LMX_NUM_PROCESSES"]), process_id=int(os.environ["LMX_PROCESS_ID"]))
  jax.distributed.initialize(**kw)
  return True


def default_workdir(method: str) -> str:
  return os.path.join("runs", f"{method}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}")


# The folders lmx writes inside every workdir (checkpoints, TensorBoard events, plots).
OUTPUT_DIRS = ("checkpoints", "tb", "plots")


def check_workdir(workdir: str) -> str:
  """Creates ``workdir`` and checks that it and its :data:`OUTPUT_DIRS` are (or can be) writable directories, that
  its path leaves room for the files written inside it, and that an object store's client is installed."""
  try:
    wd.check_path_room(workdir, WORKDIR_PATH_ROOM, f"--workdir={workdir}")
  except wd.StorageError as e:  # found before any work: a config error (nothing is created)
    raise ConfigError(str(e)) from None
  problem = wd.remote_problem(workdir)
  if problem:
    raise ConfigError(f"--workdir={workdir}: {problem}")
  wd.check_writable_dir(workdir, f"--workdir={workdir}")
  for sub in OUTPUT_DIRS:  # a file in their place would fail a save, or the plots after all the training
    path = os.path.join(workdir, sub)
    if os.path.lexists(path):
      wd.check_writable_dir(path)
  return workdir


def method_module(config):
  """``lmx.methods.<config.method>``, after checking the name."""
  method = config.get("method") if hasattr(config, "get") else None
  methods = available_methods()
  if method not in methods:
    raise ConfigError(f"config.method={method!r} is not a known method; valid methods: {methods}")
  return importlib.import_module(f"lmx.methods.{method}")


def _get(flat: dict, field: str | None):
  return flat.get(field) if field else None


def plan_resume(module, saved: dict | None, new: dict, record: dict | None, workdir: str, *,
                quiet: bool = False) -> str:
  """What to do with a workdir that may hold a run: ``"fresh"``, ``"resume"`` or ``"finished"`` (nothing to do).

  Raises ConfigError when the config changed in a field the method does not list as safe to change, or when
  fewer steps are asked for than the workdir already holds. Prints the safe changes.
  """
  if saved is None:
    return "fresh"
  from lmx.core import schema

  steps_field = getattr(module, "STEPS_FIELD", None)
  method = (new or {}).get("method") if isinstance(new, dict) else None
  safe = (schema.safe_fields(method) if method else ()) + ((steps_field,) if steps_field else ())
  changes = wd.config_changes(saved, new)
  if method:  # a field the code declared after the run started, at its default, changes nothing
    changes = [c for c in changes if not (c[1] == "<absent>" and schema.default_of(method, c[0]) == (True, c[2]))]
  unsafe = [c for c in changes if not wd.matches(c[0], safe)]
  if unsafe:
    raise ConfigError(
        f"--workdir={workdir} holds a run with another config ({wd.format_changes(unsafe)}): resume it with the "
        "config that started it, or choose a new --workdir (nothing was changed). Fields that may change on "
        f"resume: {', '.join(safe)}")
  old_steps, new_steps = _get(wd.flatten(saved), steps_field), _get(wd.flatten(new), steps_field)
  ckpt_step = wd.newest_checkpoint_step(workdir)
  done = max(s for s in (ckpt_step, old_steps if (record or {}).get("status") == "finished" else None, 0)
             if s is not None)
  if new_steps is not None and new_steps < done:
    raise ConfigError(f"--workdir={workdir} already holds {done} steps but {steps_field}={new_steps}: ask for at "
                      f"least {done} to continue it, or choose a new --workdir (nothing was changed)")
  finished = ((record or {}).get("status") == "finished"
              and os.path.exists(os.path.join(workdir, (record or {}).get("results") or "results.json")))
  if finished and (new_steps is None or new_steps == old_steps):
    if changes and not quiet:
      print(f"note: changed since that run, with no effect on a finished one: {wd.format_changes(changes)}",
            flush=True)
    return "finished"
  if changes and not quiet:
    print(f"note: config changed since the last run on {workdir}: {wd.format_changes(changes)}", flush=True)
  return "resume"


def _say_finished(module, workdir: str, record: dict) -> None:
  print(f"{workdir} holds a finished run with this config; results in "
        f"{os.path.join(workdir, record.get('results') or 'results.json')}. Nothing to do: ask for more steps "
        f"({getattr(module, 'STEPS_FIELD', None) or 'the step count'}) to continue it, or use a new --workdir.",
        flush=True)


RUN, FINISHED, REFUSED = 0, 1, 2


def _agree(decision: int) -> int:
  """Process 0's decision, on every process (a pod's workers must all run, or all not)."""
  import jax

  if jax.process_count() == 1:
    return decision
  import numpy as np
  from jax.experimental import multihost_utils

  return int(multihost_utils.broadcast_one_to_all(np.int32(decision)))


def _prepare(module, workdir: str, new: dict):
  """Process 0's checks before a run: ``(FINISHED, None, None)`` or ``(RUN, lock held, run.json bytes before)``."""
  if os.path.isdir(workdir):  # read-only first: a finished run, or a refused change, leaves every file as it was
    record = wd.read_record(workdir)
    if plan_resume(module, wd.saved_config(workdir), new, record, workdir, quiet=True) == "finished":
      plan_resume(module, wd.saved_config(workdir), new, record, workdir)  # prints what changed, if anything
      _say_finished(module, workdir, record)
      return FINISHED, None, None
  check_workdir(workdir)
  lock = wd.WorkdirLock(workdir).acquire()
  try:
    record_path = os.path.join(workdir, wd.RECORD_FILE)
    before = open(record_path, "rb").read() if os.path.exists(record_path) else None
    record = wd.read_record(workdir)  # again, under the lock: a run that just ended may have changed it
    if plan_resume(module, wd.saved_config(workdir), new, record, workdir) == "finished":
      _say_finished(module, workdir, record)
      lock.release()
      return FINISHED, None, None
  except BaseException:
    lock.release()
    raise
  if lock.previous_run_died() and (record or {}).get("status") == "running":
    print(f"note: the previous run on {workdir} (pid {lock.previous.get('pid')}) was killed; resuming from its "
          "newest checkpoint", flush=True)
  return RUN, lock, before


def _run_method(module, config, workdir: str):
  """``module.run`` with XLA's persistent compilation cache in ``<workdir>/.xla_cache`` (see
  :mod:`lmx.core.compile_cache`; local workdirs only, off with ``LMX_COMPILE_CACHE=0``)."""
  from lmx.core import compile_cache

  if not (compile_cache.enabled() and wd.is_local(workdir)):
    return module.run(config, workdir)
  with compile_cache.persistent(os.path.join(workdir, compile_cache.CACHE_DIR)):
    return module.run(config, workdir)


def dispatch(config, workdir: str | None):
  """Validates the config, guards the workdir (see the module docstring) and runs the method."""
  import jax

  from lmx.core.results import jsonable

  module = method_module(config)
  check_finite_numbers(config)
  if hasattr(module, "validate"):
    module.validate(config)
  if workdir is None and jax.process_count() > 1:  # each host would stamp its own default name
    raise ConfigError("a multi-host run needs --workdir (the same path on every host, e.g. gs://BUCKET/run)")
  workdir = workdir or default_workdir(config.method)
  if not wd.is_local(workdir):
    return module.run(config, check_workdir(workdir))
  if jax.process_index() != 0:
    decision = _agree(RUN)
    if decision == REFUSED:
      raise ConfigError("process 0 refused to start this run (its message says why)")
    return None if decision == FINISHED else module.run(config, workdir)
  new = jsonable(config.to_dict() if hasattr(config, "to_dict") else dict(config))
  existed = os.path.isdir(workdir)
  try:
    decision, lock, before = _prepare(module, workdir, new)
  except BaseException:
    _agree(REFUSED)
    raise
  _agree(decision)
  if decision == FINISHED:
    return None
  record_path = os.path.join(workdir, wd.RECORD_FILE)
  try:
    files_before = wd.snapshot(workdir)
    wd.write_record(workdir, replace=True, status="running", method=config.method, config=new,
                    command=" ".join(sys.argv), pid=os.getpid(), host=socket.gethostname(), started=wd.now(),
                    results="results.json")
    try:
      out = _run_method(module, config, workdir)
    except interrupt.Interrupted as e:
      _end_record(workdir, status="interrupted", stopped=str(e))
      raise
    except KeyboardInterrupt:  # a second Ctrl-C (or one outside lmx's handler): stopped at once
      _end_record(workdir, status="interrupted", stopped=STOPPED_AT_ONCE)
      raise
    except ConfigError as e:
      if wd.snapshot(workdir) != files_before:  # found after the run wrote something: the run failed
        _end_record(workdir, status="failed", error=_first_line(e))
      elif not existed and wd.only_bookkeeping(workdir):  # before any work: leave the workdir as it was
        lock.release()
        shutil.rmtree(workdir, ignore_errors=True)
      elif before is None:
        os.remove(record_path)
      else:
        with open(record_path, "wb") as f:
          f.write(before)
      raise
    except BaseException as e:  # SystemExit included: a library that exits still leaves a failed record
      _end_record(workdir, status="failed", error=_first_line(e))
      raise
    wd.write_record(workdir, status="finished", finished=wd.now())
    return out
  finally:
    lock.release()


STOPPED_AT_ONCE = ("interrupted by SIGINT: stopped at once (checkpoints already written are kept); rerun the same "
                   "command to resume")


def _first_line(e: BaseException) -> str:
  first = str(e).splitlines()[0] if str(e) else ""
  return f"{type(e).__name__}: {first}"


def _end_record(workdir: str, **fields) -> None:
  """Writes how the run stopped into ``run.json``; a failure to write it (the disk that is full) does not replace
  the error being reported."""
  try:
    wd.write_record(workdir, **fields)
  except Exception:  # noqa: BLE001 - the run's own error (or success) is what the user must see
    pass


def main(config, workdir: str | None):
  if config is None:
    raise ConfigError("--config is required, e.g. --config=configs/datm.py or configs/lm.py:smoke")
  maybe_initialize_distributed()
  with interrupt.handling():
    dispatch(config, workdir)
  return 0


def run_cli(main_fn) -> int:
  """Runs an absl main; user errors print one clear line instead of a traceback."""
  from absl import app

  def wrapped(argv):
    from absl import flags, logging

    if not flags.FLAGS["verbosity"].present:  # Orbax logs every save at INFO; keep the console readable
      logging.set_verbosity(logging.WARNING)
    try:
      return main_fn(argv)
    except USER_ERRORS as e:
      if os.environ.get("LMX_TRACEBACK"):
        traceback.print_exc()
      print(f"error: {e}", file=sys.stderr)
      return 2
    except interrupt.Interrupted as e:
      print(str(e), file=sys.stderr, flush=True)
      return e.exit_code
    except KeyboardInterrupt:
      print(STOPPED_AT_ONCE, file=sys.stderr, flush=True)
      return 130

  try:
    app.run(wrapped, flags_parser=_parse_flags)
  except SystemExit as e:
    return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
  return 0


def config_spec_problem(spec: str) -> str | None:
  """Why ``--config=<spec>`` cannot name a config file (with the likely intended spelling), or None."""
  path, _, arg = spec.partition(":")
  if os.path.isfile(path):
    if arg and len([p for p in arg.split(",") if p.strip() and "=" not in p]) > 1:
      return f"--config={spec}: give one variant after ':' (e.g. {path}:{arg.split(',')[0]})"
    return None
  guess = None
  for sep in (".py.", ".py,", ".py;", ".py/"):
    if sep in path:
      head, tail = path.split(sep, 1)
      guess = f"{head}.py:{tail}" + (f",{arg}" if arg else "")
  if guess is None and os.path.isfile(path + ".py"):
    guess = f"{path}.py" + (f":{arg}" if arg else "")
  if guess is not None and os.path.isfile(guess.partition(":")[0]):
    return f"--config={spec}: no such config file; did you mean --config={guess}? (a variant follows a ':')"
  folder = os.path.dirname(path) or "."
  found = sorted(glob.glob(os.path.join(folder, "*.py"))) or sorted(glob.glob(os.path.join("configs", "*.py")))
  found = [f for f in found if not os.path.basename(f).startswith("_")]
  return f"--config={spec}: no config file {path!r}" + (f"; available: {', '.join(found)}" if found else "")


def _config_arg(argv) -> str | None:
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      return a.split("=", 1)[1]
    if a == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _parse_flags(argv):
  """absl's flag parsing, with a short message (not a traceback) for an unknown ``--config.x.y`` field, a
  ``--config`` that names no file, or an error in the config file itself (``<file>:<line>: <error>``)."""
  from absl import flags

  spec = _config_arg(argv)
  problem = config_spec_problem(spec) if spec is not None else None
  if problem:
    print(f"error: {problem}", file=sys.stderr)
    sys.exit(2)
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    cause = e  # what the config file raised, when it raised: absl and config_flags wrap its ValueErrors twice
    while (cause.__cause__ or cause.__context__) is not None:
      cause = cause.__cause__ or cause.__context__
    where = None if cause is e or isinstance(cause, ConfigError) else _config_file_error(cause, spec)
    if where:
      print(f"error: {where}", file=sys.stderr)
      sys.exit(2)
    msg = str(e)
    if "Traceback" in msg:  # config_flags embeds the config file's traceback: keep its last line
      last = [line.strip() for line in msg.splitlines() if line.strip()][-1]
      msg = f"{msg.splitlines()[0].split(':')[0]}: {last.split('ConfigError: ')[-1]}"
    print(f"error: {msg}\nPass --helpshort or --helpfull to see help on flags.", file=sys.stderr)
    sys.exit(2)
  except (AttributeError, KeyError) as e:
    print(f"error: {_config_file_error(e, spec) or _explain_override(argv, e)}", file=sys.stderr)
    sys.exit(2)
  except Exception as e:  # noqa: BLE001 - raised by the user's config file itself: name the line, not absl's stack
    where = _config_file_error(e, spec)
    if where is None:
      raise
    print(f"error: {where}", file=sys.stderr)
    sys.exit(2)


def _config_file_error(err: BaseException, spec: str | None) -> str | None:
  """``"<file>:<line>: <Type>: <message>"`` for an error in the config file that ``--config=<spec>`` names (a
  syntax error anywhere it imports, or an error raised while running its code: the deepest line of that file on the
  stack), else None."""
  if isinstance(err, SyntaxError) and err.filename:
    return f"{err.filename}:{err.lineno}: SyntaxError: {err.msg}"
  path = os.path.abspath(spec.partition(":")[0]) if spec else None
  where = None
  for frame, lineno in traceback.walk_tb(err.__traceback__):
    if path and os.path.abspath(frame.f_code.co_filename) == path:
      where = f"{frame.f_code.co_filename}:{lineno}"
  if where is None:
    return None
  lines = str(err).strip().splitlines()
  return f"{where}: {type(err).__name__}" + (f": {lines[0]}" if lines else "")


def _explain_override(argv, err) -> str:
  """Names the bad ``--config.a.b`` override and the valid fields at that level."""
  from lmx.core.config import load_config_file

  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  overrides = [a[len("--config."):].split("=", 1)[0] for a in argv if a.startswith("--config.")]
  try:
    cfg = load_config_file(spec)
  except Exception:  # noqa: BLE001
    return f"bad config override ({err})"
  for path in overrides:
    node, parts = cfg, path.split(".")
    for i, part in enumerate(parts):
      if not hasattr(node, "keys") or part not in node.keys():
        where = ".".join(parts[:i]) or "config"
        valid = sorted(node.keys()) if hasattr(node, "keys") else []
        return f"--config.{path}: {where} has no field {part!r}; valid fields: {valid}"
      node = node[part]
  return f"bad config override ({err})"
