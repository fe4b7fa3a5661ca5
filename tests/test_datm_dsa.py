"""DSA ops: shapes, differentiability, identity cases, zeroed-pixel counts, determinism."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmx.methods.datm import dsa

X = jax.random.normal(jax.random.key(0), (4, 12, 12, 3))


@pytest.mark.parametrize("group", dsa.GROUPS)
def test_each_op_keeps_shape_and_has_finite_nonzero_gradient(group):
  op = dsa.OPS[group]
  y = op(jax.random.key(1), X)
  assert y.shape == X.shape and bool(jnp.all(jnp.isfinite(y)))
  g = jax.grad(lambda x: jnp.sum(op(jax.random.key(1), x) ** 2))(X)
  assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).sum()) > 0


def test_augment_is_seeded_and_matches_the_chosen_group():
  strat = dsa.DEFAULT_STRATEGY
  for i in range(6):
    key = jax.random.key(i)
    a, b = dsa.augment(key, X, strat), dsa.augment(key, X, strat)
    np.testing.assert_array_equal(a, b)
  assert not np.allclose(dsa.augment(jax.random.key(0), X), dsa.augment(jax.random.key(1), X))
  assert dsa.augment(jax.random.key(0), X, "none") is X


def test_identity_parameters_are_exact_identity():
  p = dsa.identity_params(X.shape[0])
  np.testing.assert_allclose(dsa.apply_params(X, p), X, atol=1e-6)


def test_flip_is_an_involution_and_exact():
  p = dsa.identity_params(4)
  p["A"] = p["A"].at[:, 0, 0].set(-1.0)
  y = dsa.apply_params(X, p)
  np.testing.assert_allclose(y, X[:, :, ::-1], atol=1e-6)
  np.testing.assert_allclose(dsa.apply_params(y, p), X, atol=1e-6)


def test_scale_one_and_rotate_zero_are_identity():
  p = dsa.identity_params(4)
  p["A"] = jnp.broadcast_to(jnp.array([[1.0, 0.0], [0.0, 1.0]]), (4, 2, 2))  # scale 1 / rotate 0
  np.testing.assert_allclose(dsa.apply_params(X, p), X, atol=1e-5)
  u = jnp.full((4, 11), 0.5)  # rotate column 0.5 -> angle 0
  np.testing.assert_allclose(dsa.apply_params(X, dsa.group_params("rotate", u, X.shape)), X, atol=1e-5)


def test_crop_shifts_with_zero_fill():
  x = jnp.ones((1, 8, 8, 1))
  p = dsa.identity_params(1)
  p["t"] = jnp.array([[2, -1]], jnp.int32)
  y = np.asarray(dsa.apply_params(x, p))[0, :, :, 0]
  assert y.sum() == pytest.approx((8 - 2) * (8 - 1))
  assert (y[6:] == 0).all() and (y[:, 0] == 0).all()
  z = np.asarray(dsa.apply_params(X[:1], p))
  np.testing.assert_allclose(z[0, :10, 1:], np.asarray(X)[0, 2:, :11], atol=1e-6)  # out[h, w] = x[h + 2, w - 1]


def test_cutout_zeroes_a_half_size_square():
  x = jnp.ones((1, 12, 12, 1))
  p = dsa.identity_params(1)
  p["cut"] = jnp.array([True])
  p["o"] = jnp.array([[6, 6]], jnp.int32)  # centred: a full 6×6 square
  y = np.asarray(dsa.apply_params(x, p))
  assert (y == 0).sum() == 36
  p["o"] = jnp.array([[0, 0]], jnp.int32)  # clamped at the corner: 3×3
  assert (np.asarray(dsa.apply_params(x, p)) == 0).sum() == 9


def test_unknown_group_is_rejected():
  with pytest.raises(ValueError, match="dsa_strategy"):
    dsa.parse_strategy("color_blur")
