"""The 2-D PBD cable simulator: segment lengths, post collisions, gate passage and order (hand-built cables),
determinism by seed, renderer shapes and pixels, and the scripted demonstrator succeeding on every layout."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmx.envs import cable

PRM = cable.Params(p_snag=0.0)


def _hand_layout():
  """Clips at x = 0.3, 0.5, 0.7 on y = 0.5, channels along +x: gates are vertical segments of half-length 0.045."""
  c = jnp.array([[0.3, 0.5], [0.5, 0.5], [0.7, 0.5]], jnp.float32)
  u = jnp.array([[1.0, 0.0]] * 3, jnp.float32)
  return cable.Layout(jnp.array([0.06, 0.5], jnp.float32), c, u)


def _polyline(points, n=PRM.n):
  """n points along the polyline through ``points`` (uniform in arc length)."""
  pts = np.asarray(points, np.float64)
  seg = np.linalg.norm(np.diff(pts, axis=0), axis=1)
  s = np.concatenate([[0], np.cumsum(seg)])
  t = np.linspace(0, s[-1], n)
  return jnp.asarray(np.stack([np.interp(t, s, pts[:, 0]), np.interp(t, s, pts[:, 1])], -1), jnp.float32)


_progress = jax.jit(lambda p, lay: cable.progress(p, lay, PRM))
_crossings = jax.jit(lambda p, lay: (cable.gate_crossings(p, lay, PRM), cable.first_crossings(p, lay, PRM)))


def test_gate_passage_and_order_on_hand_built_cables():
  lay = _hand_layout()
  straight = _polyline([(0.06, 0.5), (0.9, 0.5)])  # through all three gates, in order
  assert int(_progress(straight, lay)) == 3
  two = _polyline([(0.06, 0.5), (0.6, 0.5), (0.6, 0.9)])  # through clips 0 and 1, then up: 2
  assert int(_progress(two, lay)) == 2
  miss = _polyline([(0.06, 0.5), (0.2, 0.5), (0.3, 0.6), (0.4, 0.5), (0.9, 0.5)])  # above clip 0's upper post
  c = np.asarray(_crossings(miss, lay)[0])
  assert not c[0].any() and c[1].any() and c[2].any()
  assert int(_progress(miss, lay)) == 0  # clips 1, 2 crossed but clip 0 missed: no progress
  back = _polyline([(0.06, 0.5), (0.06, 0.2), (0.9, 0.2), (0.9, 0.5), (0.1, 0.5)])  # back through 2, 1, 0
  assert int(_progress(back, lay)) == 1  # clip 0 is passed, clips 1 and 2 in the wrong order
  assert np.asarray(_crossings(straight, lay)[1]).tolist() == [
      int(np.floor((0.3 - 0.06) / (0.84 / (PRM.n - 1)))), int(np.floor((0.5 - 0.06) / (0.84 / (PRM.n - 1)))),
      int(np.floor((0.7 - 0.06) / (0.84 / (PRM.n - 1))))]


def test_segments_cross_hand_values():
  z = lambda *a: jnp.array(a, jnp.float32)
  assert bool(cable.segments_cross(z(0, 0), z(1, 1), z(0, 1), z(1, 0)))
  assert not bool(cable.segments_cross(z(0, 0), z(1, 0), z(0, 1), z(1, 1)))
  assert not bool(cable.segments_cross(z(0, 0), z(0.4, 0.4), z(0, 1), z(1, 0)))


@pytest.fixture(scope="module")
def stepper():
  return jax.jit(lambda k, lay, s, a: cable.step(k, lay, s, a, PRM))


def test_segment_lengths_posts_and_determinism(stepper):
  lay = jax.jit(lambda: cable.layout_from_id(3, PRM))()
  reset = jax.jit(lambda k: cable.reset(k, lay, PRM))
  s, s2, s3 = reset(jax.random.key(0)), reset(jax.random.key(0)), reset(jax.random.key(1))
  assert np.array_equal(np.asarray(s.p_N2), np.asarray(s2.p_N2))
  assert not np.array_equal(np.asarray(s.p_N2), np.asarray(s3.p_N2))
  posts = np.asarray(jax.jit(lambda: cable.posts_of(lay, PRM))())
  rng = np.random.default_rng(0)
  acts = rng.uniform(-1, 1, (25, 2)).astype(np.float32)
  traj = []
  for i, a in enumerate(acts):
    s, info = stepper(jax.random.key(i), lay, s, jnp.asarray(a))
    traj.append(np.asarray(s.p_N2))
    p = np.asarray(s.p_N2)
    seg = np.linalg.norm(np.diff(p, axis=0), axis=1)
    if float(info["stretch"]) < 1.01:  # slack: every segment at its rest length (PBD tolerance 3%)
      np.testing.assert_allclose(seg, PRM.seg, rtol=0.03)
    assert float(info["stretch"]) <= PRM.slip_stretch + 0.05
    assert np.allclose(p[0], np.asarray(lay.anchor), atol=1e-6)  # the fixed end
    if bool(s.grasped):
      assert np.allclose(p[-1], np.asarray(s.grip), atol=1e-6)  # the held end
    d = np.linalg.norm(p[:, None] - posts[None], axis=-1)
    assert d.min() > PRM.post_r - 0.01  # particles stay (nearly) out of the posts
  # determinism: the same keys and actions give the same trajectory
  s = reset(jax.random.key(0))
  for i, a in enumerate(acts):
    s, _ = stepper(jax.random.key(i), lay, s, jnp.asarray(a))
  assert np.array_equal(np.asarray(s.p_N2), traj[-1])


def test_layouts_by_id_heldout_disjoint():
  f = jax.jit(lambda i: cable.layouts(i, PRM).clip_c_K2)
  a, b = np.asarray(f(jnp.arange(4))), np.asarray(f(jnp.arange(4)))
  h = np.asarray(f(cable.HELDOUT_BASE + jnp.arange(4)))
  assert np.array_equal(a, b) and not np.allclose(a, h)
  assert (a[..., 0] >= 0.39).all() and (a[..., 0] <= 0.89).all() and (a[..., 1] >= 0.25).all()


def test_renderer_shapes_and_pixels():
  lay = _hand_layout()
  p = _polyline([(0.06, 0.5), (0.9, 0.5)])
  s = cable.State(p, jnp.array([0.9, 0.5]), jnp.bool_(True), jnp.int32(-1), jnp.zeros(2), jnp.int32(0),
                  jnp.zeros(3, jnp.int32), jnp.int32(0), jnp.int32(0))
  rend = jax.jit(lambda s: (cable.render_top(s, lay, 32, PRM), cable.render_wrist(s, lay, 32, 0.12, PRM)))
  top, wrist = (np.asarray(x) for x in rend(s))
  assert top.shape == (32, 32, 3) and wrist.shape == (32, 32, 3) and top.dtype == np.float32
  assert top.min() >= 0 and top.max() <= 1
  # the pixel containing (x, y): column floor(x * 32), row floor((1 - y) * 32)
  px = lambda x, y: (int((1 - y) * 32), int(x * 32))
  assert top[px(0.55, 0.5)][0] > 0.5  # the cable at y = 0.5
  assert top[px(0.55, 0.9)][0] == 0  # no cable far above it
  assert top[px(0.3, 0.545)][1] > 0.5  # clip 0's upper post
  assert top[px(0.9, 0.5)][2] > 0.5  # the (grasping: filled) gripper
  assert wrist[16, 16][2] > 0.5  # the wrist view is centred on the gripper
  s_open = s._replace(grasped=jnp.bool_(False))
  ring = np.asarray(rend(s_open)[1])
  assert ring[16, 16, 2] < 0.5 and ring[16, 18, 2] > 0.5  # open: a ring (radius 0.018 = 2.4 px), hollow


def test_scripted_demos_succeed_on_all_layouts_without_noise():
  from lmx.methods.cable_routing import rollout as R

  ec = R.EpisodeCfg(goto_sigma=0.0, action_sigma=0.0)
  ids = np.concatenate([np.arange(16), cable.HELDOUT_BASE + np.arange(16)])
  lay = cable.layouts(ids, PRM)
  f = jax.jit(jax.vmap(lambda k, l: cable.progress(
      R.hier_episode(k, l, R.oracle_selector(PRM), R.expert_route_fn(PRM), PRM, ec)[0].p_N2, l, PRM)))
  prog = np.asarray(f(jax.random.split(jax.random.key(0), len(ids)), lay))
  assert (prog == PRM.k).all(), prog
