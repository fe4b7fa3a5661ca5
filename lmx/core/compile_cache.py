"""XLA's persistent compilation cache for the span of a run (the launcher turns it on in ``<workdir>/.xla_cache``).

Every :class:`lmx.core.loop.Loop` jits its own step, so a method whose stages train identically shaped steps (the
arms of a comparison, one loop each) would compile the same program once per loop, and a resumed run would compile
everything again. With the cache on, a program already compiled (same HLO, compile options, device and jax/XLA
versions) is read back from disk instead. One directory per workdir: only the run holding the workdir's lock
writes to it. ``LMX_COMPILE_CACHE=0`` turns it off.
"""
from __future__ import annotations

import contextlib
import os

import jax
from jax.experimental.compilation_cache import compilation_cache as cc


CACHE_DIR = ".xla_cache"


def enabled() -> bool:
  return os.environ.get("LMX_COMPILE_CACHE", "1") not in ("0", "", "false")


@contextlib.contextmanager
def persistent(directory: str):
  """Compiles inside the block go through the persistent cache in ``directory``; a cache directory the user
  already configured (``JAX_COMPILATION_CACHE_DIR`` / ``jax_compilation_cache_dir``) is kept as it is.
  The previous setting is restored on exit."""
  previous = jax.config.jax_compilation_cache_dir
  if previous:
    yield previous
    return
  os.makedirs(directory, exist_ok=True)
  cc.set_cache_dir(directory)
  cc.reset_cache()  # the cache reads its directory once; make it read this one
  # every program, not only those that took over a second: a run's many small programs (environment steps,
  # evaluations, samplers) add up to most of a short stage's compile time, and a resume compiles them all again
  min_secs = jax.config.jax_persistent_cache_min_compile_time_secs
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  try:
    yield directory
  finally:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_secs)
    cc.set_cache_dir(previous)
    cc.reset_cache()
