"""Test setup: 8 fake CPU devices before JAX initialises, absl flags parsed (Grain needs them)."""
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

from absl import flags  # noqa: E402

if not flags.FLAGS.is_parsed():
    flags.FLAGS(sys.argv[:1])

# A test runner started as a background job (`cmd &`, nohup) inherits SIGINT ignored, and so would every run the
# tests start; lmx rightly leaves an ignored SIGINT alone. The Ctrl-C tests test a terminal's Ctrl-C, so the test
# process (and, through exec, its children) get the default disposition back.
import signal  # noqa: E402

if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# The runs the tests start through launch/run.py share one XLA compilation cache per test process (a folder per
# xdist worker below this one: a worker runs its tests one at a time, so each cache has one writer), so the
# reference, interrupted and resumed runs of a smoke config compile each program once.
if "LMX_TEST_XLA_CACHE" not in os.environ:
    import tempfile

    os.environ["LMX_TEST_XLA_CACHE"] = tempfile.mkdtemp(prefix="lmx-xla-")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


import pytest  # noqa: E402


@pytest.fixture
def orbax_reads(monkeypatch):
  """``orbax_reads()`` starts recording the name of every array Orbax deserialises (all its array handlers) and
  returns the list it fills: what a restore actually read."""
  import orbax.checkpoint as ocp

  def start() -> list[str]:
    seen = []
    for cls in (ocp.type_handlers.ArrayHandler, ocp.type_handlers.NumpyHandler, ocp.type_handlers.ScalarHandler):
      orig = cls.deserialize

      async def spy(self, infos, *a, _orig=orig, **kw):
        seen.extend(str(i.name) for i in infos)
        return await _orig(self, infos, *a, **kw)

      monkeypatch.setattr(cls, "deserialize", spy)
    return seen

  return start


# End-to-end and reliability tests of the shared runtime that the non-slow tier already covers more cheaply
# elsewhere, moved to the slow tier to keep the README's test command under ~20 minutes on 2 cores; the
# seconds are one measured CI run (28 min on a 2-core machine before the move). Run them with `-m slow`.
SLOW_TIER = {
    "test_reliability.py::test_truncated_expert_buffer_is_moved_aside_and_retrained": 172,
    "test_reliability.py::test_signal_stops_with_a_checkpoint_at_the_interrupt": 172,  # 3 variants
    "test_reliability.py::test_a_lock_left_by_a_killed_run_is_detected_by_pid": 63,
    "test_reliability.py::test_no_restorable_checkpoint_asks_before_starting_over": 51,
    "test_reliability.py::test_second_run_on_a_busy_workdir_refuses_naming_the_first": 47,
    "test_reliability.py::test_rerun_of_a_finished_run_says_so_and_changes_nothing": 38,
    "test_reliability.py::test_missing_manifest_falls_back_with_one_full_warning": 26,
    "test_reliability.py::test_safe_changes_continue_and_say_what_changed": 22,
    "test_datm_run.py::test_cross_evaluations_pair_final_images_with_initial_labels_and_back": 95,
    "test_datm_run.py::test_run_of_nonfinite_losses_stops_clearly": 45,
    "test_loop.py::test_lm_resume_is_bitwise_equal": 72,
    "test_loop.py::test_signal_checkpoints_at_the_interrupt_and_the_resume_is_bitwise_equal": 64,
    "test_loop.py::test_resumed_at_the_end_finishes_outputs_and_past_the_end_is_refused": 30,
    "test_transformer_sharding.py::test_sharded_train_step_equals_unsharded[True-mesh_sizes1]": 63,
    "test_transformer_sharding.py::test_sharded_train_step_equals_unsharded[False-mesh_sizes0]": 39,
    "test_datm.py::test_spike_guard_skips_an_outsized_image_gradient": 50,
    "test_datm.py::test_meta_gradient_matches_central_finite_differences[True-True]": 28,
    "test_datm.py::test_meta_gradient_matches_central_finite_differences[True-False]": 37,
    "test_datm.py::test_skipped_update_leaves_all_state_unchanged": 28,
    "test_datm.py::test_conv_impls_give_the_same_network_and_auto_resolves_per_use": 28,
    "test_launch.py::test_smoke_twice_second_resumes": 47,
    "test_interfaces.py::test_continuation_from_cache_equals_generating_from_scratch[capacity]": 27,
    "test_benchmarks.py::test_lm_step_writes_consistent_json": 10,  # the benchmark script, not the runtime
    # the shared LM pretraining stage's NaN stop, also tested through let's teacher and lm's own run
    "test_self_lengthen.py::test_nan_in_the_base_pretraining_stops": 17,
}


def pytest_collection_modifyitems(config, items):
  for item in items:
    rel = item.nodeid.split("tests/", 1)[-1]
    if rel in SLOW_TIER or rel.split("[", 1)[0] in SLOW_TIER:
      item.add_marker(pytest.mark.slow)
