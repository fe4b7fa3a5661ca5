"""One run per workdir, and a record of what the workdir holds.

``<workdir>/.lock``   an exclusive ``flock`` held for the run's life. The kernel releases it on any exit (kill -9
                      included), so a lock left by a killed process is never in the way; the pid written into the
                      file names the run that holds it, or the run that died holding it. A lock file deleted under a
                      live run no longer protects it, so taking the lock also reads ``run.json``: a run recorded
                      as running, by a live process on this host that started before the record, holds the workdir.
``<workdir>/run.json`` the run's record: status (running / finished / interrupted / failed), the config, the
                      command, pid and times. A rerun compares its config with the recorded one before any work.

Object-store workdirs (``gs://...``) have neither: they are checked by the writers themselves.
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import re
import socket
import sys
from typing import Any, Iterable, Mapping

from lmx.core.config import ConfigError

LOCK_FILE, RECORD_FILE = ".lock", "run.json"


class WorkdirBusyError(ConfigError):
  """Another live process holds the workdir's lock."""


class StorageError(OSError):
  """Writing an output failed for a reason of the file system's (disk full, quota, a path too long): the message
  names the path, the cause and what to do. An ``OSError`` (not a config error): the run has started and fails."""

  def __init__(self, code: int, message: str, path: str):
    super().__init__(code, message, path)
    self.message = message

  def __str__(self) -> str:
    return self.message


# The errors whose cause lies outside lmx: the user frees space or picks another path.
STORAGE_CAUSES = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                  errno.ENAMETOOLONG: "file name too long", errno.EFBIG: "file too large",
                  errno.EROFS: "read-only file system"}
_TS_ERRNO = re.compile(r"os_error_code='?(\d+)")  # how TensorStore (Orbax's writer) reports an OS error


def storage_errno(err: BaseException | None) -> int | None:
  """The :data:`STORAGE_CAUSES` errno behind ``err`` (an ``OSError``, or TensorStore's ``ValueError`` that quotes
  the OS error code), looking through its causes; None for any other error."""
  seen = 0
  while err is not None and seen < 8:
    if isinstance(err, OSError) and err.errno in STORAGE_CAUSES:
      return err.errno
    for m in _TS_ERRNO.finditer(str(err)):
      if int(m.group(1)) in STORAGE_CAUSES:
        return int(m.group(1))
    err, seen = err.__cause__ or err.__context__, seen + 1
  return None


def storage_error(err: BaseException, doing: str, path: str) -> StorageError | None:
  """A one-line :class:`StorageError` for ``err`` ("<doing> <path>: no space left on device; ..."), or None when
  ``err`` is not a storage error."""
  code = storage_errno(err)
  if code is None:
    return None
  if code == errno.ENAMETOOLONG:
    fix = (f"the path is {len(os.path.abspath(path)) if is_local(path) else len(path)} characters and the files "
           "written inside it add more, past the file system's limit: choose a shorter --workdir")
  elif code == errno.EROFS:
    fix = "choose a writable --workdir"
  else:
    fix = "free space there (or raise the limit) or choose another --workdir, then rerun the same command"
  return StorageError(code, f"{doing} {path}: {STORAGE_CAUSES[code]}; {fix}", path)


def path_max(path: str) -> int:
  """The OS's longest path (PATH_MAX) on the file system of ``path``'s nearest existing ancestor."""
  head = os.path.abspath(path)
  while head != os.path.dirname(head) and not os.path.exists(head):
    head = os.path.dirname(head)
  try:
    return int(os.pathconf(head, "PC_PATH_MAX"))
  except (OSError, ValueError):
    return 4096


def check_path_room(path: str, room: int, what: str | None = None) -> None:
  """Raises :class:`StorageError` (file name too long), naming ``what`` (default: the path), when files ``room``
  characters deeper than ``path`` would pass the OS's path limit: found before any writer starts (Orbax's threads
  wait minutes for a directory that could not be made)."""
  if not is_local(path):
    return
  full, limit = os.path.abspath(path), path_max(path)
  if len(full) + room > limit:
    raise StorageError(errno.ENAMETOOLONG, f"{what or path}: file name too long; the path is {len(full)} "
                       f"characters and the files written inside it need up to {room} more, past the file system's "
                       f"limit of {limit}: choose a shorter --workdir", path)


def is_local(workdir: str) -> bool:
  return "://" not in workdir


def now() -> str:
  return datetime.datetime.now().isoformat(timespec="seconds")


def check_writable_dir(path: str, what: str | None = None) -> str:
  """Creates ``path`` if needed and checks that it is a writable directory (before any compute, so a save can
  never hang on a bad path); ConfigError naming ``what`` (default: the path) otherwise. Object stores pass."""
  what = what or path
  if not is_local(path):
    return path
  if os.path.exists(path) and not os.path.isdir(path):
    raise ConfigError(f"{what} is a file, not a directory: move it out of the way or choose another --workdir")
  try:
    os.makedirs(path, exist_ok=True)
    probe = os.path.join(path, f".write_test_{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise ConfigError(f"{what} is not writable ({e.strerror}); fix its permissions or choose another "
                      "--workdir") from None
  return path


# What writing to an object store needs, by scheme: (module, pip package, what uses it). TensorBoard events go
# through tensorboardX (google-cloud-storage / boto3); checkpoints through etils.epath, which uses TensorFlow's
# gfile when TensorFlow is installed and fsspec's gcsfs / s3fs otherwise.
REMOTE_NEEDS = {
    "gs": (("google.cloud.storage", "google-cloud-storage", "TensorBoard events (tensorboardX)"),
           ("gcsfs", "gcsfs", "checkpoints (etils.epath through fsspec)")),
    "s3": (("boto3", "boto3", "TensorBoard events (tensorboardX)"),
           ("s3fs", "s3fs", "checkpoints (etils.epath through fsspec)")),
}


def _have(module: str) -> bool:
  import importlib.util

  try:
    return importlib.util.find_spec(module) is not None
  except (ImportError, ValueError):  # a parent package (google.cloud) that is not there
    return False


def remote_problem(path: str, *, tensorboard: bool = True, checkpoints: bool = True) -> str | None:
  """What is missing to write ``path`` (``gs://`` or ``s3://``), with the pip command that installs it, or None."""
  scheme = path.split("://", 1)[0] if "://" in path else ""
  if scheme not in REMOTE_NEEDS:
    return None
  missing = []
  for (module, package, use), wanted in zip(REMOTE_NEEDS[scheme], (tensorboard, checkpoints)):
    if wanted and not _have(module) and not (module in ("gcsfs", "s3fs") and _have("tensorflow")):
      missing.append((package, use))
  if not missing:
    return None
  uses = " and ".join(f"{package} for its {use}" for package, use in missing)
  return (f"writing to {scheme}:// needs {uses}, which this Python lacks: pip install "
          f"{' '.join(p for p, _ in missing)}")


def pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def process_start_time(pid: int) -> float | None:
  """When process ``pid`` started (seconds since the epoch), from Linux's ``/proc``; None where unknown."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      fields = f.read().rsplit(")", 1)[1].split()
    with open("/proc/stat") as f:
      boot = next(float(line.split()[1]) for line in f if line.startswith("btime "))
    return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime, in clock ticks since boot
  except (OSError, ValueError, IndexError, StopIteration):
    return None


def running_elsewhere(workdir: str) -> dict | None:
  """``run.json``'s record when it says *running* for another process on this host that is alive and started no
  later than the record (a pid reused by a newer process does not count), else None."""
  rec = read_record(workdir)
  if not rec or rec.get("status") != "running":
    return None
  pid = rec.get("pid")
  if not isinstance(pid, int) or pid == os.getpid() or rec.get("host", socket.gethostname()) != socket.gethostname():
    return None
  if not pid_alive(pid):
    return None
  start = process_start_time(pid)
  try:
    recorded = datetime.datetime.fromisoformat(str(rec.get("started"))).timestamp()
  except ValueError:
    recorded = None
  if start is not None and recorded is not None and start > recorded + 2:  # the pid now names a newer process
    return None
  return rec


class WorkdirLock:
  """``with WorkdirLock(workdir):`` holds the workdir's exclusive lock or raises :class:`WorkdirBusyError`.

  ``previous`` is what the lock file said before this run took it (a dict, or None): a pid that is not alive
  there means the last run on this workdir was killed.
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_FILE)
    self.fd = None
    self.previous = None

  def acquire(self) -> "WorkdirLock":
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      os.close(fd)
      if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
        raise
      holder = _read_json(self.path) or {}
      who = (f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}: "
             f"{holder.get('command')}" if holder else "another process")
      raise WorkdirBusyError(f"--workdir={os.path.dirname(self.path)} is in use by a run that is still going "
                             f"({who}); wait for it, stop it, or choose another --workdir") from None
    holder = running_elsewhere(os.path.dirname(self.path))
    if holder is not None:  # its lock file was deleted (or replaced) while it runs
      fcntl.flock(fd, fcntl.LOCK_UN)
      os.close(fd)
      raise WorkdirBusyError(
          f"--workdir={os.path.dirname(self.path)} is in use by a run that is still going (pid {holder.get('pid')} "
          f"on {holder.get('host') or socket.gethostname()}, started {holder.get('started')}: "
          f"{holder.get('command')}), although its {LOCK_FILE} file was deleted; wait for it, stop it, or choose "
          "another --workdir")
    self.previous = _read_json(self.path)
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": now(), "command": " ".join(sys.argv)}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    self.fd = fd
    return self

  def previous_run_died(self) -> bool:
    """The lock file names a process that is gone: the previous run was killed without cleaning up."""
    pid = (self.previous or {}).get("pid")
    return isinstance(pid, int) and pid != os.getpid() and not pid_alive(pid)

  def release(self) -> None:
    if self.fd is not None:
      os.ftruncate(self.fd, 0)  # empty = nobody holds it (the file stays: deleting it would race a waiter)
      fcntl.flock(self.fd, fcntl.LOCK_UN)
      os.close(self.fd)
      self.fd = None

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


def _read_json(path: str) -> dict | None:
  try:
    with open(path) as f:
      out = json.load(f)
    return out if isinstance(out, dict) else None
  except (OSError, ValueError):
    return None


def read_record(workdir: str) -> dict | None:
  """``run.json`` as a dict, or None when there is none (or it cannot be read)."""
  return _read_json(os.path.join(workdir, RECORD_FILE)) if is_local(workdir) else None


def write_record(workdir: str, *, replace: bool = False, **fields: Any) -> dict:
  """Updates (or with ``replace`` rewrites) ``run.json`` atomically with ``fields``; returns the new record."""
  from lmx.core.results import jsonable

  rec = {**({} if replace else read_record(workdir) or {}), **jsonable(fields), "updated": now()}
  path = os.path.join(workdir, RECORD_FILE)
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    with open(tmp, "w") as f:
      json.dump(rec, f, indent=1, allow_nan=False)
    os.replace(tmp, path)
  except OSError as e:
    if os.path.exists(tmp):
      os.remove(tmp)
    failed = storage_error(e, "cannot write", path)
    if failed is None:
      raise
    raise failed from None
  return rec


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """``{"train.steps": 100, ...}`` of a nested dict (a ConfigDict's ``to_dict()``), lists as JSON values."""
  out = {}
  for k, v in tree.items():
    key = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out.update(flatten(v, key + "."))
    else:
      out[key] = json.loads(json.dumps(v, default=str))
  return out


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
  """``[(field, old value, new value)]`` for every field that differs (``<absent>`` for a missing one)."""
  a, b = flatten(old), flatten(new)
  missing = "<absent>"
  return [(k, a.get(k, missing), b.get(k, missing)) for k in sorted(set(a) | set(b)) if a.get(k, missing) !=
          b.get(k, missing)]


def matches(field: str, patterns: Iterable[str]) -> bool:
  """``field`` is one of ``patterns`` or inside one ending in ``.*`` (``eval.*`` matches ``eval.num``)."""
  return any(field == p or (p.endswith(".*") and field.startswith(p[:-1])) for p in patterns)


def format_changes(changes: Iterable[tuple[str, Any, Any]], limit: int = 8) -> str:
  changes = list(changes)
  parts = [f"{k}: {a!r} → {b!r}" for k, a, b in changes[:limit]]
  if len(changes) > limit:
    parts.append(f"... {len(changes) - limit} more")
  return "; ".join(parts)


def newest_checkpoint_step(workdir: str) -> int | None:
  """The highest finished step directory under ``<workdir>/checkpoints`` (no Orbax needed), or None."""
  root = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(root):
    return None
  steps = [int(d) for d in os.listdir(root) if d.isdigit() and os.path.isdir(os.path.join(root, d))]
  return max(steps) if steps else None


def saved_config(workdir: str) -> dict | None:
  """The config recorded with the run: ``run.json``, else the newest checkpoint's config item."""
  rec = read_record(workdir)
  if rec and isinstance(rec.get("config"), dict):
    return rec["config"]
  step = newest_checkpoint_step(workdir) if is_local(workdir) else None
  if step is None:
    return None
  return _read_json(os.path.join(workdir, "checkpoints", str(step), "config", "metadata"))


def snapshot(workdir: str) -> dict[str, tuple[int, int]]:
  """``{relative path: (size, mtime_ns)}`` of the files in ``workdir`` other than this module's: compared before
  and after a run to tell whether the run wrote anything."""
  out = {}
  for root, _, files in os.walk(workdir):
    for f in files:
      if root == workdir and (f in (LOCK_FILE, RECORD_FILE) or f.startswith(RECORD_FILE + ".tmp")):
        continue
      p = os.path.join(root, f)
      try:
        st = os.stat(p)
      except OSError:  # removed while walking
        continue
      out[os.path.relpath(p, workdir)] = (st.st_size, st.st_mtime_ns)
  return out


def only_bookkeeping(workdir: str) -> bool:
  """The workdir holds nothing but this module's files, empty folders and the compilation cache: nothing a user
  would miss."""
  for root, dirs, files in os.walk(workdir):
    dirs[:] = [d for d in dirs if not (root == workdir and d == ".xla_cache")]
    for f in files:
      if root != workdir or (f not in (LOCK_FILE, RECORD_FILE) and not f.startswith(RECORD_FILE + ".tmp")):
        return False
  return True
