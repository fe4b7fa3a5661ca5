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
