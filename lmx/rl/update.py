"""One jitted policy update over a fixed-size rollout buffer: epochs × minibatches as ``lax.scan``.

``minibatch_update(loss_fn, tx, epochs=..., minibatch=...)`` gives ``step(state, frozen, buffer, rng) ->
(state, metrics)`` for :class:`lmx.core.loop.Loop`: ``buffer`` is a dict of ``[N, ...]`` arrays with a ``mask``
``[N]`` (1 for real rows, 0 for padding, so N is fixed and the step compiles once). Each epoch permutes the real
rows first (in random order) and the padding after them, and walks ``ceil(N / minibatch)`` minibatches; a
minibatch with no real row changes nothing (Adam's moments included). ``loss_fn(params, frozen, mb, rng) ->
(loss, metrics)`` must weight rows by ``mb["mask"]``. Metrics are the mean over the minibatches that had real
rows, plus ``grad_norm`` (for the loop's NaN guard) and ``updates`` (their count).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax


def minibatch_update(loss_fn: Callable, tx: optax.GradientTransformation, *, epochs: int, minibatch: int,
                     params_key: str = "params") -> Callable:
  """The update step (see the module docstring); ``state`` holds ``params_key`` and ``opt_state``."""
  epochs, minibatch = int(epochs), int(minibatch)

  def step(state, frozen, buffer, rng):
    n = buffer["mask"].shape[0]
    n_mb = -(-n // minibatch)
    pad = n_mb * minibatch - n

    def epoch(carry, key):
      # real rows first, in a random order; padding rows (mask 0) last
      order = jnp.argsort(jnp.where(buffer["mask"] > 0, jax.random.uniform(key, (n,)), 2.0))
      order = jnp.concatenate([order, jnp.broadcast_to(order[-1:], (pad,))]) if pad else order
      mb_mask = jnp.concatenate([jnp.ones((n,)), jnp.zeros((pad,))]) if pad else jnp.ones((n,))

      def one(carry, sel):
        params, opt_state = carry
        idx, extra = sel
        mb = jax.tree.map(lambda x: x[idx], buffer)
        mb["mask"] = mb["mask"] * extra
        any_real = jnp.sum(mb["mask"]) > 0
        (loss, m), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, frozen, mb,
                                                                     jax.random.fold_in(key, idx[0]))
        updates, new_opt = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        keep = lambda a, b: jax.tree.map(lambda x, y: jnp.where(any_real, x, y), a, b)  # noqa: E731
        m = {"loss": loss, **m, "grad_norm": optax.tree.norm(grads)}
        m = {k: jnp.where(any_real, v, 0.0) for k, v in m.items()}
        return (keep(new_params, params), keep(new_opt, opt_state)), (m, any_real.astype(jnp.float32))

      sel = (order.reshape(n_mb, minibatch), mb_mask.reshape(n_mb, minibatch))
      return jax.lax.scan(one, carry, sel)

    (params, opt_state), (m, real) = jax.lax.scan(epoch, (state[params_key], state["opt_state"]),
                                                  jax.random.split(rng, epochs))
    count = jnp.maximum(real.sum(), 1.0)
    metrics = {k: v.sum() / count for k, v in m.items()}
    metrics["updates"] = real.sum()
    return dict(state, **{params_key: params}, opt_state=opt_state), metrics

  return step
