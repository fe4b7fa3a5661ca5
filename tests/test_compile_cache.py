"""lmx.core.compile_cache: a run's persistent XLA cache keeps every program, small ones too, and restores jax's
settings afterwards."""
import os

import jax
import jax.numpy as jnp

from lmx.core import compile_cache


def test_a_program_compiled_in_well_under_a_second_is_written_to_the_cache(tmp_path):
  assert not jax.config.jax_compilation_cache_dir  # the test process configures none (tests/conftest.py)
  before = jax.config.jax_persistent_cache_min_compile_time_secs
  d = str(tmp_path / "xla")
  with compile_cache.persistent(d):
    jax.jit(lambda x: x * 3 + 1)(jnp.arange(7)).block_until_ready()
  assert [f for f in os.listdir(d) if f.startswith("jit_")], os.listdir(d)
  assert jax.config.jax_persistent_cache_min_compile_time_secs == before
  assert not jax.config.jax_compilation_cache_dir
