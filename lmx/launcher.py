"""What ``launch/run.py`` does, importable (tests, Colab): distributed init, workdir checks, method dispatch."""
from __future__ import annotations

import datetime
import importlib
import os
import pkgutil
import sys
import traceback

import lmx.methods
from lmx.core.config import ConfigError

# Errors that are the user's to fix: print the message alone (no traceback) and exit 2.
USER_ERRORS = (ConfigError, FileNotFoundError, PermissionError, FloatingPointError)


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


def check_workdir(workdir: str) -> str:
  """Creates ``workdir`` and checks that it is writable (fails early, before any compute)."""
  if "://" in workdir:  # gs:// etc.: checked by the writers themselves
    return workdir
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_test_{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise PermissionError(f"--workdir={workdir} is not writable ({e.strerror}); choose another directory") from None
  return workdir


def dispatch(config, workdir: str | None):
  """Validates ``config.method`` and runs ``lmx.methods.<method>.run(config, workdir)``."""
  method = config.get("method") if hasattr(config, "get") else None
  methods = available_methods()
  if method not in methods:
    raise ConfigError(f"config.method={method!r} is not a known method; valid methods: {methods}")
  module = importlib.import_module(f"lmx.methods.{method}")
  workdir = check_workdir(workdir or default_workdir(method))
  return module.run(config, workdir)


def main(config, workdir: str | None):
  if config is None:
    raise ConfigError("--config is required, e.g. --config=configs/datm.py or configs/lm.py:smoke")
  maybe_initialize_distributed()
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

  try:
    app.run(wrapped, flags_parser=_parse_flags)
  except SystemExit as e:
    return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
  return 0


def _parse_flags(argv):
  """absl's flag parsing, with a short message (not a traceback) for an unknown ``--config.x.y`` field."""
  from absl import flags

  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    msg = str(e)
    if "Traceback" in msg:  # config_flags embeds the config file's traceback: keep its last line
      last = [line.strip() for line in msg.splitlines() if line.strip()][-1]
      msg = f"{msg.splitlines()[0].split(':')[0]}: {last.split('ConfigError: ')[-1]}"
    print(f"error: {msg}\nPass --helpshort or --helpfull to see help on flags.", file=sys.stderr)
    sys.exit(2)
  except (AttributeError, KeyError) as e:
    print(f"error: {_explain_override(argv, e)}", file=sys.stderr)
    sys.exit(2)


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
