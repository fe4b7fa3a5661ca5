"""Cable routing: the tanh-Gaussian log-probability and BC loss against hand/numpy values (and distrax), the
selector's cross-entropy, GroupNorm against numpy, the oracle's choices, the berkeley_cable_routing loader on a
tiny data set written here in the same RLDS layout, its fail-fast error, and the smoke config end to end."""
import importlib
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmx.core.config import ConfigError
from lmx.methods.cable_routing import oxe, policy as pol


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


# ------------------------------------------------------------------------------------------ end to end

# The CI's run of the smoke config: compiles the episode scan + 4 train steps, about 23 s on one idle core.
def test_smoke_config_end_to_end(tmp_path):
  from configs.cable_routing import get_config
  run_lib = importlib.import_module("lmx.methods.cable_routing.run")  # the package exports run(), the function

  cfg = get_config("smoke")
  res = run_lib.run(cfg, str(tmp_path))
  assert set(res["summary"]) == set(run_lib.ARMS)
  for arm, s in res["summary"].items():
    assert 0.0 <= s["full_mean"] <= 1.0 and len(s["stages_mean"]) == cfg.env.clips
  assert res["demos"][0]["decisions"] > 0
  assert os.path.exists(tmp_path / "results.json") and os.path.exists(tmp_path / "plots" / "success.png")
  bad = get_config("smoke")
  bad.env.decisions = 2
  with pytest.raises(ConfigError, match="env.decisions"):
    run_lib.validate(bad)


def test_real_variant_trains_on_tiny_dataset(tiny_oxe, tmp_path):
  from configs.cable_routing import get_config
  run_lib = importlib.import_module("lmx.methods.cable_routing.run")  # the package exports run(), the function

  cfg = get_config("berkeley_cable_routing")
  cfg.real.update(data_dir=tiny_oxe[0], steps=3, batch=4, res=32)
  cfg.model.update(widths=(4, 8), hidden=(16,))
  cfg.train.update(warmup=1)
  res = run_lib.run(cfg, str(tmp_path))
  assert res["episodes"] == 2 and res["train_steps"] + res["val_steps"] == 5
  assert np.isfinite(res["val_nll"]) and np.isfinite(res["val_mse"])
