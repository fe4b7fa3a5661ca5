"""Cable routing: the tanh-Gaussian log-probability and BC loss against hand/numpy values (and distrax), the
selector's cross-entropy, GroupNorm against numpy, the random-shift augmentation against a numpy crop, the
chunked full-data passes against one pass, a selector stage on the loop (learns; a rerun restores it), the sample
std over seeds, the berkeley_cable_routing loader and training stage on a tiny data set written here in the same
RLDS layout, its fail-fast error; and the smoke config through the launcher: workdir layout, SIGTERM + resume to
the same results.json, a NaN in a BC stage and in the selector stage."""
import importlib
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmx.core.config import ConfigError
from lmx.methods.cable_routing import oxe, policy as pol, train as T
from tests import config_check
from tests import resume_check as rc

run_lib = importlib.import_module("lmx.methods.cable_routing.driver")  # the package exports run(), the function


def _np_logprob(mean, log_std, a):
  log_std = np.clip(log_std, -20, 2)
  a = np.clip(a, -0.99, 0.99)
  u = np.arctanh(a)
  std = np.exp(log_std)
  logn = -0.5 * ((u - mean) / std) ** 2 - np.log(std) - 0.5 * np.log(2 * np.pi)
  return (logn - np.log(1 - a ** 2)).sum(-1)


def test_tanh_gaussian_logprob_hand_value():
  # one dimension, mean 0, std 1, a = tanh(0.5): log N(0.5) - log(1 - tanh(0.5)^2)
  a = math.tanh(0.5)
  hand = -0.5 * 0.25 - 0.5 * math.log(2 * math.pi) - math.log(1 - a * a)
  got = float(pol.tanh_gaussian_logprob(jnp.zeros((1, 1)), jnp.zeros((1, 1)), jnp.full((1, 1), a))[0])
  assert got == pytest.approx(hand, abs=1e-5)


def test_tanh_gaussian_logprob_numpy_clipping_and_distrax():
  rng = np.random.default_rng(0)
  mean = rng.normal(size=(5, 4)).astype(np.float32)
  log_std = np.array([[-30, 3, 0.1, -1]] * 5, np.float32)  # two entries outside [-20, 2]: clipped
  a = rng.uniform(-1, 1, (5, 4)).astype(np.float32)
  a[0, 0], a[1, 1] = 1.0, -0.999  # outside +-0.99: clipped
  log_std[:, 0] = -0.5  # keep the -20 clip from dominating everything but test it in one row
  log_std[4, 0] = -30
  got = np.asarray(pol.tanh_gaussian_logprob(jnp.asarray(mean), jnp.asarray(log_std), jnp.asarray(a)))
  np.testing.assert_allclose(got, _np_logprob(mean.astype(np.float64), log_std, a.astype(np.float64)), rtol=2e-4)
  distrax = pytest.importorskip("distrax")
  ls = np.clip(log_std, -20, 2)
  ac = np.clip(a, -0.99, 0.99)
  dist = distrax.Transformed(distrax.MultivariateNormalDiag(jnp.asarray(mean[:4]), jnp.exp(jnp.asarray(ls[:4]))),
                             distrax.Block(distrax.Tanh(), 1))
  np.testing.assert_allclose(got[:4], np.asarray(dist.log_prob(jnp.asarray(ac[:4]))), rtol=1e-3, atol=1e-3)


def test_bc_nll_loss_and_mask():
  mean = jnp.array([[0.0, 0.0], [1.0, -1.0], [5.0, 5.0]])
  log_std = jnp.zeros((3, 2))
  a = jnp.array([[0.1, -0.2], [0.5, 0.5], [0.0, 0.0]])
  mask = jnp.array([1.0, 1.0, 0.0])
  nll, mse = pol.bc_nll_loss(mean, log_std, a, mask)
  lp = _np_logprob(np.asarray(mean), np.asarray(log_std), np.asarray(a))
  assert float(nll) == pytest.approx(-lp[:2].mean(), rel=1e-5)
  hand_mse = ((np.tanh(np.asarray(mean[:2])) - np.asarray(a[:2])) ** 2).sum(-1).mean()
  assert float(mse) == pytest.approx(hand_mse, rel=1e-5)


def test_selection_loss_hand_values():
  logits = jnp.array([[0.0, 0.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0]])
  labels = jnp.array([1, 0])
  ce, acc = pol.selection_loss(logits, labels)
  hand = 0.5 * (math.log(4) + (math.log(math.exp(2) + 3) - 2))
  assert float(ce) == pytest.approx(hand, rel=1e-6)
  assert float(acc) == pytest.approx(0.5)  # argmax of a tie is class 0 != 1; the second is right


def test_group_norm_numpy():
  x = np.random.default_rng(1).normal(size=(2, 3, 3, 8)).astype(np.float32)
  p = dict(scale=jnp.arange(8.0), bias=jnp.ones(8))
  got = np.asarray(pol.group_norm(p, jnp.asarray(x), 4))
  g = x.reshape(2, 3, 3, 4, 2)
  ref = ((g - g.mean((1, 2, 4), keepdims=True)) / np.sqrt(g.var((1, 2, 4), keepdims=True) + 1e-5)).reshape(x.shape)
  np.testing.assert_allclose(got, ref * np.arange(8.0) + 1, rtol=1e-4, atol=1e-5)


def test_selector_history_embedding_changes_logits():
  h = jnp.array([[0, 0, 0, 0, 0, 0], [4, 1, 4, 1, 2, 3]])
  out = np.asarray(jax.jit(lambda h: pol.selector_apply(pol.init_selector(jax.random.key(0), 10, 4, 6, 4, 16),
                                                          jnp.zeros((2, 10)), h))(h))
  assert out.shape == (2, 4) and not np.allclose(out[0], out[1])


# ------------------------------------------------------------------------------------------ the real data path

def test_oxe_missing_dataset_fails_fast(tmp_path):
  with pytest.raises(FileNotFoundError, match="tfds build berkeley_cable_routing"):
    oxe.open_episodes(str(tmp_path))


@pytest.fixture(scope="module")
def tiny_oxe(tmp_path_factory):
  tfds = pytest.importorskip("tensorflow_datasets")
  pytest.importorskip("array_record")
  rng = np.random.default_rng(0)
  episodes = []
  for e, n in enumerate((3, 2)):
    steps = []
    for t in range(n):
      obs = {k: rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)
             for k in ("image", "top_image", "wrist45_image", "wrist225_image")}
      obs["robot_state"] = rng.normal(size=7).astype(np.float32)
      steps.append({"action": {"rotation_delta": rng.normal(size=3).astype(np.float32),
                               "terminate_episode": np.float32(t == n - 1),
                               "world_vector": (2 * rng.normal(size=3)).astype(np.float32)},
                    "is_first": t == 0, "is_last": t == n - 1, "is_terminal": t == n - 1, "observation": obs,
                    "reward": np.float32(t == n - 1)})
    episodes.append(steps)

  class BerkeleyCableRouting(tfds.core.GeneratorBasedBuilder):  # the catalog's features; images as raw tensors
    VERSION = tfds.core.Version("0.1.0")

    def _info(self):
      img = lambda: tfds.features.Tensor(shape=(128, 128, 3), dtype=np.uint8)
      f32 = lambda *s: tfds.features.Tensor(shape=s, dtype=np.float32)
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"steps": tfds.features.Dataset({
          "action": tfds.features.FeaturesDict({"rotation_delta": f32(3), "terminate_episode": np.float32,
                                                "world_vector": f32(3)}),
          "is_first": np.bool_, "is_last": np.bool_, "is_terminal": np.bool_,
          "observation": tfds.features.FeaturesDict({"image": img(), "top_image": img(), "wrist45_image": img(),
                                                     "wrist225_image": img(), "robot_state": f32(7)}),
          "reward": np.float32})}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i, steps in enumerate(episodes):
        yield i, {"steps": steps}

  data_dir = str(tmp_path_factory.mktemp("oxe"))
  BerkeleyCableRouting(data_dir=data_dir, file_format="array_record").download_and_prepare()
  return data_dir, episodes


def test_oxe_loader_on_tiny_dataset(tiny_oxe):
  data_dir, episodes = tiny_oxe
  src = oxe.open_episodes(data_dir)
  arr = oxe.step_arrays(src, res=32)
  assert arr["top"].shape == (5, 32, 32, 3) and arr["wrist"].shape == (5, 32, 32, 3)
  assert arr["episode"].tolist() == [0, 0, 0, 1, 1]
  order = [(e, t) for e in range(2) for t in range(len(episodes[e]))]
  for i, (e, t) in enumerate(order):  # episodes come back in some order: match on the state
    s = episodes[e][t]
    j = int(np.argmin(np.abs(arr["grasped"] - s["observation"]["robot_state"][2])))
    want = np.clip(np.concatenate([s["action"]["world_vector"], s["action"]["rotation_delta"][2:3]]), -1, 1)
    np.testing.assert_allclose(arr["action"][j], want, rtol=1e-6)
    img = s["observation"]["wrist45_image"].astype(np.float64).reshape(32, 4, 32, 4, 3).mean((1, 3))
    np.testing.assert_array_equal(arr["top"][j], np.round(img).astype(np.uint8))
  with pytest.raises(ConfigError, match="cannot be read"):
    oxe.open_episodes(data_dir, split="validation")


# ------------------------------------------------------------------------------------------ training pieces

def test_random_shift_is_an_edge_padded_crop_at_the_drawn_offsets():
  rng = np.random.default_rng(2)
  views = [rng.uniform(size=(3, 6, 5, 2)).astype(np.float32) for _ in range(2)]
  key, pad = jax.random.key(4), 2
  got = T.random_shift(key, [jnp.asarray(v) for v in views], pad)
  off = np.asarray(jax.random.randint(key, (2, 3, 2), 0, 2 * pad + 1))  # the draw random_shift makes
  for v, g, o in zip(views, got, off):
    padded = np.pad(v, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="edge")
    want = np.stack([padded[b, o[b, 0]:o[b, 0] + 6, o[b, 1]:o[b, 1] + 5] for b in range(3)])
    np.testing.assert_array_equal(np.asarray(g), want)
  assert not np.array_equal(off[0], off[1])  # the views get their own offsets
  assert T.random_shift(key, views, 0)[1] is views[1]


def test_flat_normal_draw_equals_the_shaped_one():
  key = jax.random.key(5)
  np.testing.assert_array_equal(np.asarray(pol._normal(key, (6, 7))), np.asarray(jax.random.normal(key, (6, 7))))


def _bc_data(m, res=8, seed=0):
  rng = np.random.default_rng(seed)
  return dict(top=rng.integers(0, 256, (m, res, res, 3), dtype=np.uint8),
              wrist=rng.integers(0, 256, (m, res, res, 3), dtype=np.uint8),
              grasped=rng.integers(0, 2, m).astype(bool), action=rng.uniform(-1, 1, (m, 2)).astype(np.float32))


def test_full_data_passes_match_one_unchunked_pass():
  d = _bc_data(11)
  p = pol.init_bc(jax.random.key(1), 2, 2, (4, 8), (16,))
  x = [np.float32(d["top"]) / 255, np.float32(d["wrist"]) / 255]
  g = np.float32(d["grasped"])[:, None]

  @jax.jit
  def one_pass(p, x, g, a):
    mean, log_std = pol.bc_apply(p, x, g)
    return pol.bc_nll_loss(mean, log_std, a), pol.features(p, x, g)

  (nll, mse), feat = one_pass(p, x, g, d["action"])
  got = T.bc_eval(p, d, chunk=4)  # 4 + 4 + 3 rows: the last chunk padded and masked
  assert got["nll"] == pytest.approx(float(nll), rel=1e-5) and got["mse"] == pytest.approx(float(mse), rel=1e-5)
  np.testing.assert_allclose(T.features(p, d["top"], d["wrist"], d["grasped"], chunk=4), np.asarray(feat),
                             rtol=1e-5, atol=1e-6)


def test_selector_stage_learns_and_a_rerun_restores_it(tmp_path):
  """The selector on the loop (ArrayBatches, the optimiser block) fits a separable toy labelling; calling the
  finished stage again restores its last checkpoint instead of training."""
  from lmx.core.metrics import Writer
  import ml_collections

  rng = np.random.default_rng(0)
  feat = rng.normal(size=(64, 6)).astype(np.float32)
  data = dict(feat=feat, hist=rng.integers(0, 5, (64, 6)), label=feat[:, :4].argmax(-1))
  optim = ml_collections.ConfigDict(dict(name="adamw", lr=1e-2, warmup_steps=5, weight_decay=1e-2, clip_norm=1.0))
  p0 = pol.init_selector(jax.random.key(0), 6, 4, 6, 4, 32)
  kw = dict(optim=optim, steps=150, batch=16, seed=0, stream="selector")
  with Writer(str(tmp_path)) as w:
    p = T.train_selector(str(tmp_path), "sel", p0, data, writer=w, **kw)
    assert T.selector_eval(p0, data)["acc"] < 0.5 and T.selector_eval(p, data)["acc"] > 0.9
    again = T.train_selector(str(tmp_path), "sel", p0, data, writer=w, **kw)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(again)))
  assert os.path.isdir(tmp_path / "checkpoints" / "sel")


def test_summary_is_the_sample_std_over_seeds():
  from configs.cable_routing import get_config

  cfg = get_config("smoke")
  arms = lambda full, st: {a: dict(full=full, stages=st) for a in run_lib.ARMS}  # noqa: E731
  done = {0: dict(arms=arms(0.5, [0.9, 0.7, 0.5]), demos={}, training={}),
          1: dict(arms=arms(0.25, [0.8, 0.5, 0.25]), demos={}, training={})}
  done[1]["arms"]["flat_bc"] = dict(full=0.0, stages=[0.3, 0.0, 0.0])
  cfg.seeds = (0, 1)
  res = run_lib.summarize(cfg, done, 0.0)
  full = res["summary"]["hier_dagger"]["full"]
  assert full["n"] == 2 and full["mean"] == pytest.approx(0.375)
  assert full["std"] == pytest.approx(np.std([0.5, 0.25], ddof=1))
  assert res["summary"]["hier"]["stages"][1]["std"] == pytest.approx(np.std([0.7, 0.5], ddof=1))
  gap = res["paired"]["hier_dagger-flat_bc"]
  assert gap["values"] == [0.0, 0.25] and gap["std"] == pytest.approx(np.std([0.0, 0.25], ddof=1))


# ------------------------------------------------------------------------------------------ end to end

SMOKE = "configs/cable_routing.py:smoke"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  """One uninterrupted run of the smoke config through the launcher: the reference of the resume and NaN tests
  (the runs share the test process's compilation cache, tests/conftest.py)."""
  return rc.reference_run(tmp_path_factory, "cable", SMOKE)


def _tensorboard_image_tags(workdir) -> set:
  """The image tags in a workdir's TensorBoard event files (read with tensorboardX's protobufs)."""
  import glob
  import struct

  from tensorboardX.proto import event_pb2

  tags = set()
  for path in glob.glob(os.path.join(workdir, "tb", "events.out.tfevents.*")):
    data, i = open(path, "rb").read(), 0
    while i + 12 <= len(data):  # records: length (8 bytes), its crc (4), the event, its crc (4)
      n = struct.unpack("<Q", data[i:i + 8])[0]
      ev = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
      tags |= {v.tag for v in ev.summary.value if v.HasField("image")}
      i += n + 16
  return tags


def test_smoke_end_to_end(smoke):
  from configs.cable_routing import get_config

  ref, r = smoke
  rc.check_layout(ref)
  res = rc.results(ref)
  cfg = get_config("smoke")
  assert set(res["summary"]) == set(run_lib.ARMS) and res["seeds"] == [0] and res["wall_s"] > 0
  for arm, s in res["summary"].items():
    assert 0.0 <= s["full"]["mean"] <= 1.0 and s["full"]["n"] == 1 and s["full"]["std"] is None
    assert len(s["stages"]) == cfg.env.clips
  assert res["demos"]["0"]["decisions"] > 0 and res["training"]["0"]["dagger_decisions"] > 0
  for stage in ("demos", "route", "flat", "selector", "dagger_rollouts", "dagger", "eval/hier_dagger"):
    assert os.path.isfile(ref / "stages" / "s0" / stage / "stage.json"), stage
  for stage in ("route", "flat", "selector", "dagger"):
    assert os.path.isdir(ref / "checkpoints" / "s0" / stage), stage
  for arm in run_lib.STRIP_ARMS:
    assert os.path.isfile(ref / "plots" / f"rollouts_{arm}.png")
  assert _tensorboard_image_tags(ref) == {"plots/success"} | {f"plots/rollouts_{a}" for a in run_lib.STRIP_ARMS}
  assert "Traceback" not in r.stderr and "{'" not in r.stdout  # console lines, not raw dicts
  bad = get_config("smoke")
  bad.env.decisions = 2
  with pytest.raises(ConfigError, match="env.decisions"):
    run_lib.validate(bad)
  bad = get_config("smoke")
  bad.dagger.optim.lr = 0.0
  with pytest.raises(ConfigError, match="dagger.optim.lr"):
    run_lib.validate(bad)



def test_schema_errors_name_the_field_and_safe_fields():
  """A typo'd field, an out-of-range value and an unknown choice each give a one-line ConfigError naming the
  field; every variant's config validates; no field may change on resume."""
  from configs.cable_routing import VARIANTS, get_config
  from lmx.core import schema

  for v in VARIANTS:
    run_lib.validate(get_config(v or None))
  for field, value, match in [
      ("env.n_clips", 2, r"env: unknown field\(s\) \['n_clips'\]"),
      ("env.particles", 4, r"env.particles: must be a whole number and >= 8, got 4"),
      ("env.p_snag", 1.5, r"env.p_snag: must be >= 0 and <= 1, got 1.5"),
      ("train.batch", 0, r"train.batch: must be a whole number and >= 1, got 0"),
      ("model.widths", (), "model.widths: must not be empty"),
      ("source", "real", "source: 'real' is not one of"),
      ("dagger.optim.lr", 0.0, r"dagger.optim.lr: must be > 0, got 0.0"),
  ]:
    config_check.refuses(run_lib.validate, get_config("smoke"), field, value, match)
  c = get_config("smoke")
  c.env.decisions = 2
  with pytest.raises(ConfigError, match=r"env.decisions: must be >= 2 \* env.clips"):
    run_lib.validate(c)
  assert set(schema.safe_fields("cable_routing")) == set()

def test_sigterm_after_the_first_checkpoint_resumes_to_the_same_results(smoke, tmp_path):
  rc.check_sigterm_resume(tmp_path, SMOKE, reference=smoke[0])


def _resumed_from(ref, work, keep):
  """``work``: a copy of the reference run stopped after the stages ``keep`` of seed 0 (a rerun resumes there)."""
  shutil.copytree(ref, work)
  os.remove(work / "results.json")
  shutil.rmtree(work / "stages")
  for name in keep:
    shutil.copytree(ref / "stages" / "s0" / name, work / "stages" / "s0" / name)
  for name in os.listdir(work / "checkpoints" / "s0"):
    if name not in keep:
      shutil.rmtree(work / "checkpoints" / "s0" / name)


def test_nan_in_a_bc_stage_stops_with_one_line(smoke, tmp_path):
  """A run resumed after its demonstrations whose route BC loss turns NaN at step 2."""
  _resumed_from(smoke[0], tmp_path / "nan-s0_route", keep=("demos",))
  rc.check_nan_stops(tmp_path, SMOKE, "s0/route", 2)


def test_nan_in_the_selector_stage_stops_with_one_line(smoke, tmp_path):
  _resumed_from(smoke[0], tmp_path / "nan-s0_selector", keep=("demos", "route", "flat"))
  line = rc.check_nan_stops(tmp_path, SMOKE, "s0/selector", 1)
  assert "no checkpoint had been written yet" in line


def test_real_variant_trains_on_tiny_dataset(tiny_oxe, tmp_path):
  from configs.cable_routing import get_config

  cfg = get_config("berkeley_cable_routing")
  cfg.real.update(data_dir=tiny_oxe[0], steps=3, batch=4, res=32)
  cfg.model.update(widths=(4, 8), hidden=(16,))
  cfg.train.bc_optim.warmup_steps = 1
  res = run_lib.run(cfg, str(tmp_path))
  assert res["episodes"] == 2 and res["train_steps"] + res["val_steps"] == 5
  assert np.isfinite(res["val_nll"]) and np.isfinite(res["val_mse"]) and res["wall_s"] >= 0
  assert os.path.isdir(tmp_path / "checkpoints" / "real" / "route") and os.path.isdir(tmp_path / "tb")
  again = run_lib.run(cfg, str(tmp_path))  # the finished training stage is read back
  assert (again["val_nll"], again["final_train"]) == (res["val_nll"], res["final_train"])
