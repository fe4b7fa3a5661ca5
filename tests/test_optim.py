"""make_schedule / make_optimizer against numbers computed here: the warmup-cosine formula, AdamW (with weight
decay) and SGD with momentum written in NumPy, global-norm clipping, and ConfigErrors for bad fields."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from lmx.core.config import ConfigError
from lmx.core.optim import make_optimizer, make_schedule


def _cfg(**kw):
  base = dict(name="adamw", lr=0.1, warmup_steps=0, min_lr_ratio=0.0, b1=0.9, b2=0.999, eps=1e-8,
              weight_decay=0.0, clip_norm=0.0)
  base.update(kw)
  return ml_collections.ConfigDict(base)


def _cosine(step, *, lr, warmup, total, end):
  """Linear 0 -> lr over ``warmup`` steps, then lr -> end along half a cosine until ``total``, end after."""
  if step < warmup:
    return lr * step / warmup
  frac = min(step - warmup, total - warmup) / (total - warmup)
  return end + (lr - end) * 0.5 * (1 + math.cos(math.pi * frac))


def test_warmup_cosine_schedule_by_hand():
  lr, warmup, total, ratio = 0.3, 10, 110, 0.1
  sched = make_schedule(_cfg(lr=lr, warmup_steps=warmup, min_lr_ratio=ratio), total)
  end = lr * ratio
  checks = {
      0: 0.0,  # warmup starts from 0
      5: lr / 2,
      warmup: lr,  # the peak
      warmup + 50: (lr + end) / 2,  # half-way through the decay: cos(pi/2) = 0
      warmup + 25: end + (lr - end) * 0.5 * (1 + math.cos(math.pi / 4)),
      total: end,
      total + 40: end,  # constant after the decay
  }
  for step, want in checks.items():
    np.testing.assert_allclose(float(sched(step)), want, rtol=1e-6, atol=1e-9, err_msg=f"step {step}")
    np.testing.assert_allclose(want, _cosine(step, lr=lr, warmup=warmup, total=total, end=end), atol=1e-12)
  for step in range(0, total + 5, 7):
    np.testing.assert_allclose(float(sched(step)), _cosine(step, lr=lr, warmup=warmup, total=total, end=end),
                               rtol=1e-5, atol=1e-8, err_msg=f"step {step}")


def test_schedule_edge_cases():
  # No warmup: starts at the peak. Warmup longer than the run: capped at total - 1 steps.
  np.testing.assert_allclose(float(make_schedule(_cfg(lr=0.2), 100)(0)), 0.2, rtol=1e-6)
  sched = make_schedule(_cfg(lr=0.2, warmup_steps=50), 10)
  np.testing.assert_allclose(float(sched(9)), 0.2, rtol=1e-6)
  np.testing.assert_allclose(float(sched(3)), 0.2 * 3 / 9, rtol=1e-6)
  const = make_schedule(_cfg(lr=0.05, warmup_steps=10, min_lr_ratio=0.1, schedule="constant"), 100)
  for step in (0, 5, 10, 99, 500):
    assert float(const(step)) == pytest.approx(0.05, rel=1e-7)


def _np_adamw(p, grads, lrs, *, b1, b2, eps, wd):
  """AdamW (decoupled weight decay, bias-corrected moments) in float64; returns the params after each step."""
  p = np.asarray(p, np.float64)
  m = np.zeros_like(p)
  v = np.zeros_like(p)
  out = []
  for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
    p = p - lr * (m_hat / (np.sqrt(v_hat) + eps) + wd * p)
    out.append(p)
  return out


def _run(tx, p, grads):
  state = tx.init(p)
  out = []
  for g in grads:
    updates, state = tx.update(g, state, p)
    p = optax.apply_updates(p, updates)
    out.append(np.asarray(p, np.float64))
  return out


GRADS = [np.array([0.5, -1.0, 2.0, 0.01]), np.array([-0.3, -0.2, 1.5, 0.0]), np.array([1.0, 0.4, -0.7, 0.02]),
         np.array([0.2, 0.2, 0.2, -3.0])]
P0 = np.array([1.0, -2.0, 0.5, 3.0])


def test_adamw_step_equals_numpy():
  cfg = _cfg(lr=0.1, warmup_steps=2, min_lr_ratio=0.1, b1=0.8, b2=0.95, eps=1e-3, weight_decay=0.05)
  total = 6
  tx, sched = make_optimizer(cfg, total)
  lrs = [_cosine(t, lr=0.1, warmup=2, total=total, end=0.01) for t in range(len(GRADS))]  # lr at step 0 is 0
  got = _run(tx, jnp.asarray(P0, jnp.float32), [jnp.asarray(g, jnp.float32) for g in GRADS])
  want = _np_adamw(P0, GRADS, lrs, b1=0.8, b2=0.95, eps=1e-3, wd=0.05)
  np.testing.assert_allclose(got[0], P0, rtol=0, atol=0)  # zero learning rate at step 0: nothing moves
  for t, (a, b) in enumerate(zip(got, want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=f"step {t}")


def test_adam_ignores_weight_decay():
  cfg = _cfg(name="adam", lr=0.1, schedule="constant", b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.5)
  tx, _ = make_optimizer(cfg, 10)
  got = _run(tx, jnp.asarray(P0, jnp.float32), [jnp.asarray(g, jnp.float32) for g in GRADS])
  want = _np_adamw(P0, GRADS, [0.1] * len(GRADS), b1=0.9, b2=0.99, eps=1e-8, wd=0.0)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_with_momentum_equals_numpy(momentum):
  tx, _ = make_optimizer(_cfg(name="sgd", lr=0.05, schedule="constant", momentum=momentum), 10)
  got = _run(tx, jnp.asarray(P0, jnp.float32), [jnp.asarray(g, jnp.float32) for g in GRADS])
  p, buf = P0.copy(), np.zeros_like(P0)
  for t, g in enumerate(GRADS):
    buf = g + momentum * buf  # heavy-ball trace, no dampening
    p = p - 0.05 * buf
    np.testing.assert_allclose(got[t], p, rtol=1e-6, atol=1e-7, err_msg=f"step {t}")


def test_clip_norm_clips_the_global_norm():
  tx, _ = make_optimizer(_cfg(name="sgd", lr=1.0, schedule="constant", clip_norm=1.0), 10)
  params = {"a": jnp.zeros(2), "b": jnp.zeros(1)}
  big = {"a": jnp.array([3.0, 0.0]), "b": jnp.array([4.0])}  # global norm 5 (no leaf alone exceeds 4)
  updates, _ = tx.update(big, tx.init(params), params)
  np.testing.assert_allclose(updates["a"], [-0.6, 0.0], rtol=1e-6)
  np.testing.assert_allclose(updates["b"], [-0.8], rtol=1e-6)
  norm = math.sqrt(sum(float(jnp.sum(u ** 2)) for u in jax.tree.leaves(updates)))
  assert norm == pytest.approx(1.0, rel=1e-6)
  small = {"a": jnp.array([0.3, 0.0]), "b": jnp.array([0.4])}  # norm 0.5 < 1: unchanged
  updates, _ = tx.update(small, tx.init(params), params)
  np.testing.assert_allclose(updates["a"], [-0.3, 0.0], rtol=1e-6)
  np.testing.assert_allclose(updates["b"], [-0.4], rtol=1e-6)
  unclipped, _ = make_optimizer(_cfg(name="sgd", lr=1.0, schedule="constant"), 10)
  updates, _ = unclipped.update(big, unclipped.init(params), params)
  np.testing.assert_allclose(updates["b"], [-4.0], rtol=1e-6)


@pytest.mark.parametrize("kw,match", [
    (dict(learning_rate=0.1), r"optim: unknown field\(s\) \['learning_rate'\]"),
    (dict(name="lion"), r"optim.name: 'lion' is not one of"),
    (dict(schedule="linear"), r"optim.schedule: 'linear' is not one of"),
    (dict(lr=float("inf")), r"optim.lr: must be a finite number, got inf"),
    (dict(lr=float("nan")), r"optim.lr: must be a finite number, got nan"),
    (dict(b2=float("nan")), r"optim.b2: must be a finite number"),
    (dict(eps=float("inf")), r"optim.eps: must be a finite number"),
    (dict(weight_decay=float("inf")), r"optim.weight_decay: must be a finite number"),
    (dict(clip_norm=float("inf")), r"optim.clip_norm: must be a finite number"),
    (dict(warmup_steps=float("inf")), r"optim.warmup_steps: must be a finite number"),
    (dict(name="sgd", momentum=float("-inf")), r"optim.momentum: must be a finite number"),
])
def test_bad_config_raises(kw, match):
  with pytest.raises(ConfigError, match=match):
    make_optimizer(_cfg(**kw), 10)
