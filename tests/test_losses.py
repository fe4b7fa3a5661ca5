"""Shared losses against NumPy float64 re-implementations and optax: integer-label and soft-target cross-entropy,
next-token loss, masks (all-zero gives 0, weights, shapes checked), bfloat16 logits upcast before log-softmax."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lmx.core.losses import cross_entropy, next_token_loss, soft_cross_entropy

RTOL, ATOL = 2e-6, 2e-6  # float32 log-softmax vs float64


def _np_log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max(axis=-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def _np_ce(logits, labels, mask=None):
  """Mean over the (masked) positions of −log softmax(logits)[label], in float64."""
  nll = -np.take_along_axis(_np_log_softmax(logits), np.asarray(labels)[..., None], axis=-1)[..., 0]
  if mask is None:
    return nll.mean()
  mask = np.asarray(mask, np.float64)
  return (nll * mask).sum() / mask.sum() if mask.sum() > 0 else 0.0


def _np_soft_ce(logits, targets, mask=None):
  per = -(np.asarray(targets, np.float64) * _np_log_softmax(logits)).sum(-1)
  if mask is None:
    return per.mean()
  mask = np.asarray(mask, np.float64)
  return (per * mask).sum() / mask.sum() if mask.sum() > 0 else 0.0


def _data(shape=(6, 11), seed=0, scale=3.0):
  rng = np.random.default_rng(seed)
  logits = (scale * rng.standard_normal(shape)).astype(np.float32)
  labels = rng.integers(0, shape[-1], size=shape[:-1])
  probs = rng.random(shape)
  return logits, labels, probs / probs.sum(-1, keepdims=True)


def test_cross_entropy_hand_computed():
  # Uniform logits over C classes: −log(1/C) for every label. Logits [0, ln 3] give p = [1/4, 3/4].
  assert float(cross_entropy(jnp.zeros((3, 5)), jnp.array([0, 2, 4]))) == pytest.approx(np.log(5), rel=1e-6)
  logits = jnp.array([[0.0, np.log(3.0)], [0.0, np.log(3.0)]])
  assert float(cross_entropy(logits, jnp.array([0, 1]))) == pytest.approx(
      (np.log(4) + np.log(4 / 3)) / 2, rel=1e-6)
  assert float(cross_entropy(logits, jnp.array([0, 1]), jnp.array([0, 1]))) == pytest.approx(np.log(4 / 3), rel=1e-6)


@pytest.mark.parametrize("shape", [(6, 11), (3, 4, 7)])
def test_cross_entropy_matches_numpy_and_optax(shape):
  logits, labels, _ = _data(shape)
  got = float(cross_entropy(jnp.asarray(logits), jnp.asarray(labels)))
  np.testing.assert_allclose(got, _np_ce(logits, labels), rtol=RTOL, atol=ATOL)
  ref = float(optax.softmax_cross_entropy_with_integer_labels(jnp.asarray(logits), jnp.asarray(labels)).mean())
  np.testing.assert_allclose(got, ref, rtol=RTOL, atol=ATOL)


def test_cross_entropy_masks():
  logits, labels, _ = _data((3, 4, 7), seed=1)
  mask = np.random.default_rng(1).random((3, 4)) < 0.5
  mask[0, 0] = True  # at least one position counts
  got = float(cross_entropy(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask)))
  np.testing.assert_allclose(got, _np_ce(logits, labels, mask), rtol=RTOL, atol=ATOL)
  # Against optax: the mean of its per-position losses over the valid positions only.
  per = np.asarray(optax.softmax_cross_entropy_with_integer_labels(jnp.asarray(logits), jnp.asarray(labels)))
  np.testing.assert_allclose(got, per[mask].mean(), rtol=RTOL, atol=ATOL)
  # Masked-out positions do not matter, whatever their logits or labels.
  logits2 = np.where(mask[..., None], logits, 1e4).astype(np.float32)
  labels2 = np.where(mask, labels, 0)
  np.testing.assert_allclose(float(cross_entropy(jnp.asarray(logits2), jnp.asarray(labels2), jnp.asarray(mask))),
                             got, rtol=RTOL, atol=ATOL)
  # Non-negative weights: the weighted mean, also when the weights sum below 1.
  w = np.full((3, 4), 0.05, np.float32)
  w[1] = 0.0
  np.testing.assert_allclose(float(cross_entropy(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(w))),
                             _np_ce(logits, labels, w), rtol=RTOL, atol=ATOL)


def test_all_zero_mask_gives_zero_with_zero_gradient():
  logits, labels, probs = _data((4, 5))
  zero = jnp.zeros((4,), jnp.float32)
  assert float(cross_entropy(jnp.asarray(logits), jnp.asarray(labels), zero)) == 0.0
  assert float(soft_cross_entropy(jnp.asarray(logits), jnp.asarray(probs), zero)) == 0.0
  g = jax.grad(lambda lg: cross_entropy(lg, jnp.asarray(labels), zero))(jnp.asarray(logits))
  assert np.all(np.asarray(g) == 0.0)


def test_mask_of_another_shape_is_refused():
  """A [B, 1] mask would broadcast over a [B, T] loss while its sum counts only B entries: T times the mean."""
  logits, labels, _ = _data((2, 3, 5))
  with pytest.raises(ValueError, match=r"mask has shape \(2, 1\).*\(2, 3\)"):
    cross_entropy(jnp.asarray(logits), jnp.asarray(labels), jnp.ones((2, 1)))


def test_soft_cross_entropy_matches_numpy_and_optax():
  logits, labels, probs = _data((5, 9), seed=2)
  got = float(soft_cross_entropy(jnp.asarray(logits), jnp.asarray(probs)))
  np.testing.assert_allclose(got, _np_soft_ce(logits, probs), rtol=RTOL, atol=ATOL)
  ref = float(optax.softmax_cross_entropy(jnp.asarray(logits), jnp.asarray(probs)).mean())
  np.testing.assert_allclose(got, ref, rtol=RTOL, atol=ATOL)
  # One-hot targets are the integer-label loss.
  onehot = np.eye(9, dtype=np.float32)[labels]
  np.testing.assert_allclose(float(soft_cross_entropy(jnp.asarray(logits), jnp.asarray(onehot))),
                             _np_ce(logits, labels), rtol=RTOL, atol=ATOL)
  mask = np.array([1, 0, 1, 1, 0], np.float32)
  np.testing.assert_allclose(float(soft_cross_entropy(jnp.asarray(logits), jnp.asarray(probs), jnp.asarray(mask))),
                             _np_soft_ce(logits, probs, mask), rtol=RTOL, atol=ATOL)


def test_next_token_loss_matches_numpy_with_and_without_mask():
  rng = np.random.default_rng(3)
  b, t, v = 3, 6, 13
  tokens = rng.integers(0, v, size=(b, t + 1))
  logits = (2 * rng.standard_normal((b, t, v))).astype(np.float32)
  # Reference: position i predicts token i + 1, written as an explicit loop over (b, i).
  lsm = _np_log_softmax(logits)
  nll = np.array([[-lsm[bi, i, tokens[bi, i + 1]] for i in range(t)] for bi in range(b)])
  np.testing.assert_allclose(float(next_token_loss(jnp.asarray(logits), jnp.asarray(tokens))), nll.mean(),
                             rtol=RTOL, atol=ATOL)
  mask = np.ones((b, t), np.float32)
  mask[0, 3:] = 0  # padding after the third target of row 0
  mask[2, :] = 0
  np.testing.assert_allclose(float(next_token_loss(jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(mask))),
                             nll[mask > 0].mean(), rtol=RTOL, atol=ATOL)
  assert float(next_token_loss(jnp.asarray(logits), jnp.asarray(tokens), jnp.zeros((b, t)))) == 0.0
  ref = optax.softmax_cross_entropy_with_integer_labels(jnp.asarray(logits), jnp.asarray(tokens[:, 1:])).mean()
  np.testing.assert_allclose(float(next_token_loss(jnp.asarray(logits), jnp.asarray(tokens))), float(ref),
                             rtol=RTOL, atol=ATOL)


def test_next_token_loss_refuses_unshifted_logits():
  """Logits for all T + 1 tokens (not tokens[:, :-1]) are a caller bug; say so rather than fail in a gather."""
  with pytest.raises(ValueError, match="must be \\[B, T, V\\]"):
    next_token_loss(jnp.zeros((2, 5, 7)), jnp.zeros((2, 5), jnp.int32))


def test_bfloat16_logits_are_upcast_before_log_softmax():
  """The reference is float64 of the very bfloat16 values: a log-softmax computed in bfloat16 would be off by
  ~1e-2, far above the float32 tolerance."""
  logits, labels, probs = _data((16, 50), seed=4, scale=8.0)
  lbf = jnp.asarray(logits).astype(jnp.bfloat16)
  exact = np.asarray(lbf.astype(jnp.float32), np.float64)
  got = cross_entropy(lbf, jnp.asarray(labels))
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(float(got), _np_ce(exact, labels), rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(float(soft_cross_entropy(lbf, jnp.asarray(probs))), _np_soft_ce(exact, probs),
                             rtol=RTOL, atol=ATOL)
  tokens = np.random.default_rng(5).integers(0, 50, size=(4, 6))
  lg = jnp.concatenate([lbf, lbf[:4]]).reshape(4, 5, 50)
  lsm = _np_log_softmax(np.asarray(lg.astype(jnp.float32), np.float64))
  ref = -np.mean([[lsm[bi, i, tokens[bi, i + 1]] for i in range(5)] for bi in range(4)])
  np.testing.assert_allclose(float(next_token_loss(lg, jnp.asarray(tokens))), ref, rtol=RTOL, atol=ATOL)
