"""results.json: NaN/Inf become null, NumPy/JAX scalars and arrays become numbers and lists, a ConfigDict a dict;
the file parses with a strict JSON reader, is written atomically (no temp file left, an old file survives a
failed write). References: hand-written expected JSON and Python's own json parser."""
import json
import math
import os

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from lmx.core import results as results_lib


def _strict_load(path):
  """json.load that refuses NaN/Infinity (Python's json accepts them by default; other readers do not)."""

  def refuse(name):
    raise ValueError(f"non-standard JSON constant {name} in {path}")

  with open(path) as f:
    return json.load(f, parse_constant=refuse)


def test_write_results_converts_to_plain_json(tmp_path):
  cfg = ml_collections.ConfigDict({"model": {"d_model": 32, "name": "transformer"}, "lr": 1e-3})
  res = {
      "nan": float("nan"), "inf": float("inf"), "ninf": -math.inf, "np_nan": np.float32("nan"),
      "f32": np.float32(0.5), "f64": np.float64(0.25), "i64": np.int64(7), "u8": np.uint8(200),
      "bool": np.bool_(True), "jax_scalar": jnp.float32(1.5), "jax_int": jnp.int32(-3),
      "bf16": jnp.asarray([0.5, jnp.inf], jnp.bfloat16),
      "array": np.array([[1.0, np.nan], [np.inf, 2.0]], np.float32), "jax_array": jnp.arange(3),
      "nested": {"a": (1, np.float16(2.0)), 3: [None, "s"]}, "config": cfg,
  }
  path = results_lib.write_results(str(tmp_path), res)
  assert path == str(tmp_path / "results.json")
  got = _strict_load(path)
  assert got == {
      "nan": None, "inf": None, "ninf": None, "np_nan": None,
      "f32": 0.5, "f64": 0.25, "i64": 7, "u8": 200, "bool": True, "jax_scalar": 1.5, "jax_int": -3,
      "bf16": [0.5, None], "array": [[1.0, None], [None, 2.0]], "jax_array": [0, 1, 2],
      "nested": {"a": [1, 2.0], "3": [None, "s"]},
      "config": {"model": {"d_model": 32, "name": "transformer"}, "lr": 1e-3},
  }
  # Types as written: ints stay ints, booleans stay booleans (not 1.0 / 1).
  assert type(got["i64"]) is int and type(got["bool"]) is bool and type(got["f32"]) is float
  assert type(got["jax_array"][0]) is int


def test_jsonable_is_plain_python():
  out = results_lib.jsonable({"x": np.arange(2, dtype=np.int32), "y": jnp.float32(np.nan), "z": object})
  assert out["x"] == [0, 1] and all(type(v) is int for v in out["x"])
  assert out["y"] is None
  assert isinstance(out["z"], str)  # anything else becomes its str(), never an unserialisable object
  json.dumps(out, allow_nan=False)


def test_write_results_is_atomic(tmp_path, monkeypatch):
  results_lib.write_results(str(tmp_path), {"loss": 1.0})
  assert sorted(os.listdir(tmp_path)) == ["results.json"]  # no temp file left after a good write
  # A write that fails half way (here: json.dump raising after some bytes) keeps the previous file intact and
  # leaves no temp file behind.
  real_dump = json.dump

  def failing_dump(obj, f, **kw):
    f.write('{"loss": 2.0, "half')
    raise OSError("disk full")

  monkeypatch.setattr(results_lib.json, "dump", failing_dump)
  with pytest.raises(OSError, match="disk full"):
    results_lib.write_results(str(tmp_path), {"loss": 2.0})
  monkeypatch.setattr(results_lib.json, "dump", real_dump)
  assert sorted(os.listdir(tmp_path)) == ["results.json"]
  assert _strict_load(tmp_path / "results.json") == {"loss": 1.0}
  # A new name in a directory that does not exist yet.
  p = results_lib.write_results(str(tmp_path / "sub"), {"a": [1]}, name="eval.json")
  assert p == str(tmp_path / "sub" / "eval.json") and _strict_load(p) == {"a": [1]}


def test_summary_line_and_plot_path(tmp_path, capsys):
  line = results_lib.summary_line("lm", {"loss": 1.234567, "steps": 4}, "/w/results.json")
  assert line == "lm: loss 1.235 | steps 4 → /w/results.json"
  assert capsys.readouterr().out.strip() == line
  assert results_lib.plot_path(str(tmp_path), "loss") == os.path.join(str(tmp_path), "plots", "loss.png")
