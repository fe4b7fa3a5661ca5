"""A clean stop on Ctrl-C (SIGINT) and on SIGTERM (what a pod's preemption sends).

While :func:`handling` is active the first signal only sets a flag. The loop checks it after every step
(:func:`requested`): it finishes that step, writes a checkpoint at it, waits for pending saves and raises
:class:`Interrupted`, which the launcher turns into one line and exit status 130 (SIGINT) or 143 (SIGTERM).
A second Ctrl-C stops at once (``KeyboardInterrupt``), keeping the checkpoints already written; a save it cuts
short is abandoned (:func:`stopped_at_once` tells the checkpointer to keep that save's errors off the console), and
the launcher records the run as interrupted.

A SIGINT that the parent process ignores (``cmd &`` in a non-interactive shell) stays ignored, as Python does.
"""
from __future__ import annotations

import contextlib
import signal
import threading

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}

_requested: int | None = None
_depth = 0
_at_once = False


class Interrupted(Exception):
  """The run stopped at a signal; ``exit_code`` is 128 + the signal number."""

  def __init__(self, signum: int, message: str):
    super().__init__(message)
    self.signum = int(signum)
    self.exit_code = EXIT_CODES.get(signum, 128 + int(signum))


def signal_name(signum: int) -> str:
  return signal.Signals(signum).name


def requested() -> int | None:
  """The signal number received since :func:`handling` started, or None."""
  return _requested


def stopped_at_once() -> bool:
  """A second Ctrl-C arrived since :func:`handling` started: work in flight (a checkpoint save) was cut short."""
  return _at_once


def _handler(signum, frame):
  global _requested, _at_once
  del frame
  if _requested == signal.SIGINT and signum == signal.SIGINT:
    _at_once = True
    raise KeyboardInterrupt  # the second Ctrl-C: stop now
  if _requested is None:
    _requested = signum
    import sys

    again = " (Ctrl-C again to stop at once)" if signum == signal.SIGINT else ""
    print(f"\n{signal_name(signum)} received: stopping after the current step and writing a checkpoint{again}",
          file=sys.stderr, flush=True)


@contextlib.contextmanager
def handling():
  """Installs the handlers for the duration (nestable; a no-op outside the main thread)."""
  global _depth, _requested, _at_once
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  previous = {}
  if _depth == 0:
    _requested, _at_once = None, False
    for sig in (signal.SIGINT, signal.SIGTERM):
      current = signal.getsignal(sig)
      if sig == signal.SIGINT and current == signal.SIG_IGN:
        continue
      previous[sig] = current
      signal.signal(sig, _handler)
  _depth += 1
  try:
    yield
  finally:
    _depth -= 1
    for sig, h in previous.items():
      signal.signal(sig, h)
    if _depth == 0:
      _requested = None


def check(where: str) -> None:
  """Raises :class:`Interrupted` if a signal arrived (for stage boundaries outside the loop)."""
  if _requested is not None:
    raise Interrupted(_requested, f"interrupted by {signal_name(_requested)} {where}; rerun the same command "
                                  "to resume")
