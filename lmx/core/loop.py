"""The generic train loop: sharded init, restore-if-present, jitted donated step, eval/log/checkpoint, NaN guard.

A method supplies pure functions: ``init_params(key) -> params`` (a pure dict), ``loss_fn(params, batch, rng)
-> (loss, metrics)``, optionally ``eval_fn(params) -> metrics``; and the shardings of its params. The loop owns
the train state ``{"params", "opt_state", "step", "rng", "bad_steps", "first_bad_step"}``.

Determinism: the step's rng is ``fold_in(key(seed), step)`` and the data iterator's position is checkpointed, so
a resumed run is bitwise equal to an uninterrupted one on CPU.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lmx.core import checkpoint as ckpt_lib
from lmx.core.mesh import replicated
from lmx.core.metrics import Writer, progress


class NonFiniteLossError(FloatingPointError):
  """The loss or gradients became NaN/Inf; the last good checkpoint is kept."""


def host(x) -> np.ndarray:
  """Host copy of a (possibly multi-host replicated) array."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(x.addressable_shards[0].data)
  return np.asarray(jax.device_get(x))


@dataclasses.dataclass
class TrainResult:
  state: Any
  last_metrics: dict
  eval_metrics: dict
  steps_per_sec: float
  compile_seconds: float
  resumed_from: int | None


def state_shardings(params_shardings, abstract_opt_state, tx, mesh):
  """Shardings for the whole train state: optimizer moments follow their params, the rest is replicated."""
  rep = replicated(mesh)
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, abstract_opt_state, params_shardings,
                                 transform_non_params=lambda _: rep)
  return {"params": params_shardings, "opt_state": opt_sh, "step": rep, "rng": rep, "bad_steps": rep,
          "first_bad_step": rep}


def make_train_step(loss_fn: Callable, tx: optax.GradientTransformation, schedule: Callable):
  """Pure ``step(state, batch) -> (state, metrics)``. A non-finite loss or gradient leaves params unchanged."""

  def step(state, batch):
    rng = jax.random.fold_in(state["rng"], state["step"])
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], batch, rng)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    gnorm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(gnorm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
    new_state = {
        "params": keep(params, state["params"]),
        "opt_state": keep(opt_state, state["opt_state"]),
        "step": state["step"] + 1,
        "rng": state["rng"],
        "bad_steps": state["bad_steps"] + (~finite).astype(jnp.int32),
        "first_bad_step": jnp.where((state["bad_steps"] == 0) & ~finite, state["step"], state["first_bad_step"]),
    }
    metrics = {"loss": loss, **metrics, "grad_norm": gnorm, "lr": schedule(state["step"])}
    return new_state, metrics

  return step


def train(*, config, workdir: str, mesh, init_params: Callable, loss_fn: Callable, params_shardings,
          tx: optax.GradientTransformation, schedule: Callable, batches, total_steps: int,
          eval_fn: Callable | None = None, writer: Writer | None = None, items_per_step: int = 0,
          item_name: str = "tokens") -> TrainResult:
  """Runs (or resumes) training for ``total_steps`` steps. See the module docstring."""
  tcfg = config.train
  own_writer = writer is None
  writer = writer or Writer(workdir, total_steps=total_steps)
  rep = replicated(mesh)
  seed = int(config.seed)

  def init_state(key):
    params = init_params(key)
    return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key_data(jax.random.key(seed)), "bad_steps": jnp.zeros((), jnp.int32),
            "first_bad_step": jnp.full((), -1, jnp.int32)}

  key = jax.random.key(seed)
  with jax.set_mesh(mesh):
    abstract = jax.eval_shape(init_state, key)
    shardings = state_shardings(params_shardings, abstract["opt_state"], tx, mesh)
    target = ckpt_lib.abstract_like(abstract, shardings)
    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=tcfg.ckpt_keep,
                                 async_save=tcfg.get("async_checkpointing", True))
    restored = ckpt.restore(target, data_iter=batches.iterator)
    if restored is not None:
      start, state = restored
      writer.summary(start, {"resumed_from_step": start})
    else:
      start = 0
      state = jax.jit(init_state, out_shardings=shardings)(key)

    def step_with_key(state, batch):
      s = dict(state, rng=jax.random.wrap_key_data(state["rng"]))
      new, m = make_train_step(loss_fn, tx, schedule)(s, batch)
      return dict(new, rng=jax.random.key_data(new["rng"])), m

    step_fn = jax.jit(step_with_key, in_shardings=(shardings, batches.sharding), out_shardings=(shardings, rep),
                      donate_argnums=(0,))

    last, eval_metrics, acc, n_acc = {}, {}, None, 0
    compile_s, t_window, steps_window, t_run, steps_run = 0.0, time.time(), 0, 0.0, 0
    pbar = progress(total_steps, desc=f"{config.method} train", initial=start)
    step = start
    try:
      while step < total_steps:
        batch = next(batches)
        t0 = time.time()
        state, m = step_fn(state, batch)
        if step == start:
          jax.block_until_ready(m)
          compile_s = time.time() - t0
          t_window, steps_window = time.time(), 0
        acc = m if acc is None else jax.tree.map(jnp.add, acc, m)
        n_acc += 1
        step += 1
        steps_window += 1
        pbar.update(1)
        log_now = step % tcfg.log_every == 0 or step == total_steps
        ckpt_now = step % tcfg.ckpt_every == 0 or step == total_steps
        eval_now = eval_fn is not None and (step % tcfg.eval_every == 0 or step == total_steps)
        if log_now or ckpt_now:
          _check_finite(state, ckpt, workdir)
        if log_now:
          vals = {k: host(v) / n_acc for k, v in acc.items()}
          dt = time.time() - t_window
          if step - start > 1 and dt > 0:
            vals["steps_per_sec"] = steps_window / dt
            if items_per_step:
              vals[f"{item_name}_per_sec"] = steps_window * items_per_step / dt
            t_run += dt
            steps_run += steps_window
          last = writer.summary(step, vals, prefix="train/")
          pbar.set_postfix(loss=f"{vals['loss']:.4f}")
          acc, n_acc, t_window, steps_window = None, 0, time.time(), 0
        if eval_now:
          eval_metrics = writer.summary(step, eval_fn(state["params"]), prefix="eval/")
        if ckpt_now:
          ckpt.save(step, state, data_iter=batches.iterator, config=config)
    finally:
      pbar.close()
      ckpt.wait()
      ckpt.close()
      if own_writer:
        writer.close()
  return TrainResult(state=state, last_metrics=last, eval_metrics=eval_metrics,
                     steps_per_sec=steps_run / t_run if t_run else float("nan"), compile_seconds=compile_s,
                     resumed_from=start if restored is not None else None)


def _check_finite(state, ckpt, workdir) -> None:
  bad = int(host(state["bad_steps"]))
  if bad:
    first = int(host(state["first_bad_step"]))
    last_good = ckpt.latest_step()
    where = (f"the last good checkpoint (step {last_good}) is kept in {os.path.join(workdir, 'checkpoints')}"
             if last_good is not None else "no checkpoint had been written yet")
    raise NonFiniteLossError(
        f"loss or gradient became NaN/Inf at step {first} ({bad} bad step(s)); training stopped and {where}. "
        "Lower optim.lr, check the data, or raise optim.clip_norm's strictness, then rerun to resume.")
