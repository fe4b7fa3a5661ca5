"""Orbax checkpoints: restore onto another mesh, corrupt/partial latest falls back, Grain state round trip."""
import errno
import os
import re
import shutil

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from lmx.core import checkpoint as ckpt_lib
from lmx.core import data as data_lib
from lmx.core import mesh as mesh_lib
from lmx.core.workdir import StorageError


def _state(mesh, spec):
  x = jnp.arange(64 * 16, dtype=jnp.float32).reshape(64, 16)
  return {"w": jax.device_put(x, NamedSharding(mesh, spec)), "step": jnp.int32(7)}


def test_restore_onto_a_different_mesh(tmp_path):
  mesh8 = mesh_lib.make_mesh(dict(data=2, fsdp=2, model=2))
  state = _state(mesh8, P(("data", "fsdp"), "model"))
  with ckpt_lib.Checkpointer(str(tmp_path / "ck")) as ck:
    ck.save(7, state)
  mesh2 = mesh_lib.make_mesh(dict(fsdp=-1), devices=jax.devices()[:2])
  target = {"w": jax.ShapeDtypeStruct((64, 16), jnp.float32, sharding=NamedSharding(mesh2, P(None, "fsdp"))),
            "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh2, P()))}
  with ckpt_lib.Checkpointer(str(tmp_path / "ck")) as ck:
    step, restored = ck.restore(target)
  assert step == 7
  assert restored["w"].sharding.spec == P(None, "fsdp") and len(restored["w"].sharding.device_set) == 2
  np.testing.assert_array_equal(np.asarray(restored["w"]), np.asarray(state["w"]))


def _corrupt_arrays(step_dir):
  n = 0
  for root, _, files in os.walk(os.path.join(step_dir, "state")):
    for f in files:
      p = os.path.join(root, f)
      if os.path.getsize(p) > 0 and not f.startswith("_"):
        with open(p, "r+b") as fh:
          fh.truncate(max(os.path.getsize(p) // 3, 1))
        n += 1
  return n


@pytest.mark.parametrize("damage", ["truncated", "metadata_missing"])
def test_corrupt_latest_falls_back_and_keeps_data(tmp_path, damage):
  mesh = mesh_lib.make_mesh(dict(data=-1))
  d = str(tmp_path / "ck")
  with ckpt_lib.Checkpointer(d, keep=5) as ck:
    for s in (1, 2):
      st = _state(mesh, P())
      ck.save(s, {"w": st["w"] * s, "step": jnp.int32(s)})
  if damage == "truncated":
    assert _corrupt_arrays(os.path.join(d, "2")) > 0
  else:
    shutil.rmtree(os.path.join(d, "2", "state"))
  target = ckpt_lib.abstract_like(_state(mesh, P()))
  with ckpt_lib.Checkpointer(d, keep=5) as ck:
    step, restored = ck.restore(target)
    assert step == 1
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.asarray(_state(mesh, P())["w"]))
    # Saving goes on from the good step; the damaged one was moved aside, not deleted.
    ck.save(2, {"w": restored["w"], "step": jnp.int32(2)})
  assert os.listdir(d + "_corrupt")


def test_grain_iterator_state_round_trip(tmp_path):
  ds = data_lib.make_dataset(np.arange(50), global_batch=4, seed=0)
  it = data_lib.make_iterator(ds)
  for _ in range(5):
    next(it)
  mesh = mesh_lib.make_mesh(dict(data=-1))
  with ckpt_lib.Checkpointer(str(tmp_path / "ck")) as ck:
    ck.save(5, _state(mesh, P()), data_iter=it, config={"a": 1})
  expected = [next(it) for _ in range(3)]
  it2 = data_lib.make_iterator(ds)
  with ckpt_lib.Checkpointer(str(tmp_path / "ck")) as ck:
    step, _ = ck.restore(ckpt_lib.abstract_like(_state(mesh, P())), data_iter=it2)
    assert ck.restore_config() == {"a": 1}
  assert step == 5
  assert all((a == b).all() for a, b in zip(expected, [next(it2) for _ in range(3)]))


def test_no_checkpoint_returns_none(tmp_path):
  with ckpt_lib.Checkpointer(str(tmp_path / "empty")) as ck:
    assert ck.restore({"x": jax.ShapeDtypeStruct((2,), jnp.float32)}) is None


def test_other_state_layout_is_a_clear_error_and_touches_nothing(tmp_path):
  """A complete checkpoint of a differently laid out state (older code, other config) is not corruption: restore
  stops with a message naming the differences and leaves the checkpoint where it is."""
  d = str(tmp_path / "ck")
  with ckpt_lib.Checkpointer(d) as ck:
    ck.save(3, {"x": jnp.ones((4, 2)), "opt": {"mu": jnp.zeros(2)}})
  new_layout = {"x": jax.ShapeDtypeStruct((4, 2), jnp.float32), "opt": {"mu": jax.ShapeDtypeStruct((2,), jnp.float32)},
                "gx_mean": jax.ShapeDtypeStruct((), jnp.float32)}
  other_shape = {"x": jax.ShapeDtypeStruct((8, 2), jnp.float32), "opt": {"mu": jax.ShapeDtypeStruct((2,), jnp.float32)}}
  for target, words in [(new_layout, "missing gx_mean"), (other_shape, "x: saved (4, 2), expected (8, 2)")]:
    with ckpt_lib.Checkpointer(d) as ck:
      with pytest.raises(ckpt_lib.CheckpointMismatchError) as e:
        ck.restore(target)
    assert words in str(e.value) and "step 3" in str(e.value)
  assert os.path.isdir(os.path.join(d, "3")) and not os.path.exists(d + "_corrupt")
  with ckpt_lib.Checkpointer(d) as ck:  # the right layout still restores
    step, st = ck.restore({"x": jax.ShapeDtypeStruct((4, 2), jnp.float32),
                           "opt": {"mu": jax.ShapeDtypeStruct((2,), jnp.float32)}})
  assert step == 3 and float(st["x"].sum()) == 8.0


def _three_steps(d):
  """Steps 1, 2, 3, each with values of its own: params w = s, optimiser mu = -s, a step counter = s."""
  mesh = mesh_lib.make_mesh(dict(data=2, fsdp=2, model=2))
  sh = NamedSharding(mesh, P("fsdp", "model"))
  with ckpt_lib.Checkpointer(d, keep=5) as ck:
    for s in (1, 2, 3):
      w = np.arange(8 * 4, dtype=np.float32).reshape(8, 4) + 100 * s
      ck.save(s, {"params": {"w": jax.device_put(w, sh), "b": jnp.full((4,), s, jnp.float32)},
                  "opt": {"mu": jnp.full((8, 4), -s, jnp.float32)}, "step": jnp.int32(s)})


def _abstract(sharding=None):
  sds = lambda shape, dt=jnp.float32: jax.ShapeDtypeStruct(shape, dt, sharding=sharding)  # noqa: E731
  return {"params": {"w": sds((8, 4)), "b": sds((4,))}, "opt": {"mu": sds((8, 4))}, "step": sds((), jnp.int32)}


def test_restore_a_named_step(tmp_path):
  d = str(tmp_path / "ck")
  _three_steps(d)
  with ckpt_lib.Checkpointer(d, keep=5) as ck:
    assert ck.all_steps() == [1, 2, 3]
    step, st = ck.restore(_abstract(), step=2)
    assert step == 2
    np.testing.assert_array_equal(np.asarray(st["params"]["w"]),
                                  np.arange(32, dtype=np.float32).reshape(8, 4) + 200)
    np.testing.assert_array_equal(np.asarray(st["params"]["b"]), np.full((4,), 2.0))
    np.testing.assert_array_equal(np.asarray(st["opt"]["mu"]), np.full((8, 4), -2.0))
    assert int(st["step"]) == 2
    assert ck.restore(_abstract())[0] == 3  # without a step: the newest
    with pytest.raises(FileNotFoundError):
      ck.restore(_abstract(), step=7)
  # A missing step is not corruption: nothing was moved aside.
  assert sorted(os.listdir(d)) == ["1", "2", "3"] and not os.path.exists(d + "_corrupt")


def test_restore_subset_reads_only_the_named_subtree(tmp_path, orbax_reads):
  d = str(tmp_path / "ck")
  _three_steps(d)
  mesh2 = mesh_lib.make_mesh(dict(model=-1), devices=jax.devices()[:2])  # another mesh than the writer's
  sh = NamedSharding(mesh2, P(None, "model"))
  target = {"params": {"w": jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=sh),
                       "b": jax.ShapeDtypeStruct((4,), jnp.float32, sharding=NamedSharding(mesh2, P()))}}
  seen = orbax_reads()
  with ckpt_lib.Checkpointer(d, keep=5) as ck:
    step, out = ck.restore_subset(target, step=2)
    assert step == 2 and set(out) == {"params"} and set(out["params"]) == {"w", "b"}
    assert sorted(seen) == ["params.b", "params.w"]  # the optimiser and the step counter were never read
    np.testing.assert_array_equal(np.asarray(out["params"]["w"]),
                                  np.arange(32, dtype=np.float32).reshape(8, 4) + 200)
    assert out["params"]["w"].sharding == sh
    seen.clear()
    step, out = ck.restore_subset({"opt": {"mu": jax.ShapeDtypeStruct((8, 4), jnp.float32)}})
    assert step == 3 and sorted(seen) == ["opt.mu"]
    np.testing.assert_array_equal(np.asarray(out["opt"]["mu"]), np.full((8, 4), -3.0))
    # Another shape or a key the checkpoint lacks: a clear mismatch, not a quarantine; a missing step: not found.
    with pytest.raises(ckpt_lib.CheckpointMismatchError, match=r"params/w: saved \(8, 4\), expected \(4, 8\)"):
      ck.restore_subset({"params": {"w": jax.ShapeDtypeStruct((4, 8), jnp.float32)}})
    with pytest.raises(ckpt_lib.CheckpointMismatchError, match="missing params/ema"):
      ck.restore_subset({"params": {"ema": jax.ShapeDtypeStruct((4,), jnp.float32)}})
    with pytest.raises(FileNotFoundError, match="no checkpoint at step 9.*saved steps: \\[1, 2, 3\\]"):
      ck.restore_subset(target, step=9)
  assert not os.path.exists(d + "_corrupt")
  with ckpt_lib.Checkpointer(str(tmp_path / "empty")) as ck:
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
      ck.restore_subset(target)


def test_incomplete_reason_passes_whole_checkpoints_and_names_what_is_missing(tmp_path):
  import optax

  d = str(tmp_path / "ck")
  params = {"w": jnp.ones((4, 3)), "b": jnp.zeros((3,))}
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))  # has None / empty leaves
  state = {"params": params, "opt": tx.init(params), "step": jnp.int32(3), "host": np.arange(5)}
  with ckpt_lib.Checkpointer(d, keep=5) as ck:
    for s in (1, 2, 3, 4):
      ck.save(s, state)
  assert all(ckpt_lib.incomplete_reason(os.path.join(d, str(s))) is None for s in (1, 2, 3, 4))
  os.remove(os.path.join(d, "1", "state", "manifest.ocdbt"))
  assert ckpt_lib.incomplete_reason(os.path.join(d, "1")) == "state/manifest.ocdbt is missing"
  os.remove(os.path.join(d, "2", "state", "_METADATA"))
  assert ckpt_lib.incomplete_reason(os.path.join(d, "2")) == "state/_METADATA is missing"
  os.remove(os.path.join(d, "3", "_CHECKPOINT_METADATA"))
  assert ckpt_lib.incomplete_reason(os.path.join(d, "3")) == "_CHECKPOINT_METADATA is missing"
  assert _corrupt_arrays(os.path.join(d, "4")) > 0
  assert "unreadable" in ckpt_lib.incomplete_reason(os.path.join(d, "4"))


def test_no_restorable_checkpoint_needs_consent_to_start_over(tmp_path, capsys):
  d = str(tmp_path / "ck")
  target = {"x": jax.ShapeDtypeStruct((2,), jnp.float32)}
  with ckpt_lib.Checkpointer(d, keep=5) as ck:
    for s in (1, 2):
      ck.save(s, {"x": jnp.ones(2) * s})
  for s in (1, 2):
    os.remove(os.path.join(d, str(s), "state", "manifest.ocdbt"))
  with ckpt_lib.Checkpointer(d) as ck:
    with pytest.raises(ckpt_lib.NoRestorableCheckpointError, match="--allow_fresh_start"):
      ck.restore(target)
  err = capsys.readouterr().err
  assert err.count("WARNING") == 2 and "step 2" in err and "step 1" in err
  assert len(os.listdir(d + "_corrupt")) == 2 and not os.listdir(d)
  with ckpt_lib.Checkpointer(d) as ck:  # a later run: nothing left to restore, but the earlier ones existed
    with pytest.raises(ckpt_lib.NoRestorableCheckpointError):
      ck.restore(target)
    assert ck.restore(target, allow_fresh_start=True) is None
  assert "starting from step 0" in capsys.readouterr().err


def test_a_file_where_the_checkpoint_directory_goes_is_an_error(tmp_path):
  (tmp_path / "ck").write_text("x")
  with pytest.raises(ckpt_lib.ConfigError, match="not a directory"):
    ckpt_lib.Checkpointer(str(tmp_path / "ck"))
  assert (tmp_path / "ck").read_text() == "x"


def test_a_workdir_name_with_url_characters_restores_and_is_not_called_corrupt(tmp_path, capsys):
  """'#', '?' and '%' are ordinary characters of a local path (not a URL's fragment, query or escape)."""
  d = str(tmp_path / "run#1?x%20" / "checkpoints")
  with ckpt_lib.Checkpointer(d, keep=5) as ck:
    for s in (1, 2):
      ck.save(s, {"w": jnp.full((4, 2), s, jnp.float32)})
  assert ckpt_lib.incomplete_reason(os.path.join(d, "2")) is None
  with ckpt_lib.Checkpointer(d, keep=5) as ck:
    step, st = ck.restore({"w": jax.ShapeDtypeStruct((4, 2), jnp.float32)})
  assert step == 2
  np.testing.assert_array_equal(np.asarray(st["w"]), np.full((4, 2), 2.0))
  assert sorted(os.listdir(d)) == ["1", "2"] and not os.path.exists(d + "_corrupt")
  assert "WARNING" not in capsys.readouterr().err
  assert _corrupt_arrays(os.path.join(d, "2")) > 0  # the check still reads the database at such a path
  assert "unreadable" in ckpt_lib.incomplete_reason(os.path.join(d, "2"))


def _opt_state(s):
  """A params + optimiser state whose values say which step wrote them."""
  w = np.random.default_rng(s).standard_normal((64, 32)).astype(np.float32)
  return {"params": {"w": jnp.asarray(w)}, "opt": {"mu": jnp.asarray(w * 0.1), "count": jnp.int32(s)}}


def _silently_corrupt(step_dir):
  """Overwrites 8 bytes of the step's largest data file at the first offset where Orbax still reads the state
  (no error) but gets other numbers: the damage a disk or a copy can do without any reader noticing."""
  data = max((os.path.join(r, f) for r, _, fs in os.walk(os.path.join(step_dir, "state")) for f in fs
              if os.sep + "d" + os.sep in os.path.join(r, f)), key=os.path.getsize)
  pristine = open(data, "rb").read()
  target = ckpt_lib.abstract_like(_opt_state(0))
  for off in range(len(pristine) // 2, len(pristine) - 8, 97):
    with open(data, "r+b") as f:
      f.seek(off)
      f.write(bytes(np.random.default_rng(off).integers(0, 256, 8, dtype=np.uint8)))
    try:
      read = ocp.PyTreeCheckpointer().restore(os.path.join(step_dir, "state"), args=ocp.args.PyTreeRestore(
          item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)))
      if not all(np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True)
                 for a, b in zip(jax.tree.leaves(read), jax.tree.leaves(_opt_state(2)))):
        return data
    except Exception:  # noqa: BLE001 - this offset breaks decoding (a corruption Orbax already reports)
      pass
    with open(data, "wb") as f:
      f.write(pristine)
  raise AssertionError("no silent corruption found")


def test_silently_corrupted_data_is_quarantined_and_the_previous_step_restored(tmp_path, capsys):
  """Bytes that decode to other numbers (a NaN in the optimiser state, say) fail the checksums written at save:
  the step is moved aside with one warning and the previous one restored, exactly as it was saved."""
  d = str(tmp_path / "ck")
  with ckpt_lib.Checkpointer(d, keep=5) as ck:  # async saves, as the loop's
    for s in (1, 2):
      ck.save(s, _opt_state(s))
  _silently_corrupt(os.path.join(d, "2"))
  target = ckpt_lib.abstract_like(_opt_state(0))
  with ckpt_lib.Checkpointer(d, keep=5) as ck:
    # the changed bytes fail the checksum, or decode to a NaN/Inf where the saved leaf was finite (found first)
    detected = r"step 2.*(checksum|NaN/Inf values but was finite)"
    with pytest.raises(ckpt_lib.CorruptCheckpointError, match=detected):
      ck.restore(target, step=2)  # a named step: an error, nothing moved
    assert ck.all_steps() == [1, 2]
    with pytest.raises(ckpt_lib.CorruptCheckpointError, match=detected):
      ck.restore_subset({"params": target["params"], "opt": target["opt"]})
    capsys.readouterr()
    step, st = ck.restore(target)
  assert step == 1
  for a, b in zip(jax.tree.leaves(st), jax.tree.leaves(_opt_state(1))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  warnings = [line for line in capsys.readouterr().err.splitlines() if "WARNING" in line]
  assert len(warnings) == 1 and re.search(detected, warnings[0]), warnings
  moved = os.listdir(d + "_corrupt")
  assert len(moved) == 1 and moved[0].startswith("2-") and sorted(os.listdir(d)) == ["1"]


def test_checkpoints_without_checksums_restore_and_nan_in_them_is_corrupt(tmp_path, capsys):
  """A checkpoint written before checksums existed restores (nothing to compare), but a NaN/Inf floating leaf
  in it is corruption; a leaf saved non-finite on purpose restores as saved."""
  d = str(tmp_path / "ck")
  good, bad = _opt_state(1), _opt_state(2)
  bad["opt"]["mu"] = bad["opt"]["mu"].at[3, 4].set(jnp.nan)
  with ckpt_lib.Checkpointer(d, keep=5) as ck:
    ck.save(1, good)
    ck.save(2, bad)
  for s in (1, 2):
    shutil.rmtree(os.path.join(d, str(s), ckpt_lib.CHECKSUMS_ITEM))  # as an older lmx wrote them
  with ckpt_lib.Checkpointer(d, keep=5) as ck:
    step, st = ck.restore(ckpt_lib.abstract_like(good))
  assert step == 1 and float(st["opt"]["mu"][0, 0]) == float(good["opt"]["mu"][0, 0])
  err = capsys.readouterr().err
  assert err.count("WARNING") == 1 and "opt/mu holds NaN/Inf" in err and "step 2" in err
  e = str(tmp_path / "inf")
  state = {"best": jnp.full((2,), jnp.inf), "w": jnp.ones(3)}  # an intended inf (e.g. "best loss so far")
  with ckpt_lib.Checkpointer(e) as ck:
    ck.save(1, state)
  with ckpt_lib.Checkpointer(e) as ck:
    step, st = ck.restore(ckpt_lib.abstract_like(state))
  assert step == 1 and np.isinf(np.asarray(st["best"])).all() and not os.path.exists(e + "_corrupt")


def test_checksums_do_not_depend_on_sharding_or_on_host_versus_device():
  mesh = mesh_lib.make_mesh(dict(data=2, fsdp=2, model=2))
  rng = np.random.default_rng(0)
  for dt in (np.float32, jnp.bfloat16, np.int32, np.uint8, np.bool_):
    x = (rng.standard_normal((8, 16)) * 50).astype(dt)
    sums = [ckpt_lib.checksums({"x": v})["x"]["checksum"] for v in (
        x, jnp.asarray(x), jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"), "model"))),
        jax.device_put(x, NamedSharding(mesh, P(None, ("data", "fsdp", "model")))))]
    assert all(c == sums[0] for c in sums) and sums[0] is not None, (dt, sums)
    y = x.copy()
    y[5, 7] = y[2, 3] if y[2, 3] != y[5, 7] else ~y[5, 7] if dt == np.bool_ else y[5, 7] + 1
    assert ckpt_lib.checksums({"x": y})["x"]["checksum"] != sums[0]


def _no_tracebacks_logged(caplog):
  shown = [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]
  assert not shown, [r.getMessage()[:200] for r in shown]


def test_disk_full_during_an_async_save_is_one_error_naming_the_directory(tmp_path, monkeypatch, caplog):
  """ENOSPC in Orbax's background commit: one StorageError (an OSError) naming the directory and the cause, from
  whichever call first sees it; Orbax's own tracebacks of it are not logged, and closing adds no second error."""
  d = str(tmp_path / "ck")

  async def full(self, x, directory):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))

  ck = ckpt_lib.Checkpointer(d)
  ck.save(1, {"w": jnp.ones(4)})
  ck.wait()
  monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, "_save_fn", full)
  with pytest.raises(StorageError) as e:
    ck.save(2, {"w": jnp.ones(4)})
    ck.wait()
  assert e.value.errno == errno.ENOSPC and isinstance(e.value, OSError)
  assert str(e.value).startswith(f"cannot write a checkpoint in {d}: no space left on device;"), str(e.value)
  assert "\n" not in str(e.value)
  ck.close()  # the failure was reported once
  _no_tracebacks_logged(caplog)
  monkeypatch.undo()
  with ckpt_lib.Checkpointer(d) as ck:  # the checkpoint written before the disk filled up is intact
    assert ck.restore({"w": jax.ShapeDtypeStruct((4,), jnp.float32)})[0] == 1


def test_a_path_past_the_os_limit_is_one_error_saying_file_name_too_long(tmp_path, caplog):
  """The directory itself can be made, but the files a checkpoint writes inside it cannot: one StorageError when the
  Checkpointer opens (an Orbax save would fail in its threads, and others would wait minutes for the directory)."""
  d = str(tmp_path)
  while len(d) < 4060:
    d = os.path.join(d, "x" * min(200, 4060 - len(d) - 1))
  os.makedirs(d)
  with pytest.raises(StorageError) as e:
    ckpt_lib.Checkpointer(d)
  assert e.value.errno == errno.ENAMETOOLONG
  assert str(e.value).startswith(f"cannot write checkpoints in {d}: file name too long;"), str(e.value)[-300:]
  assert "shorter --workdir" in str(e.value) and os.listdir(d) == []
  _no_tracebacks_logged(caplog)
