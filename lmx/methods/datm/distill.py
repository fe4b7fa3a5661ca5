"""The DATM / MTT meta-step as pure functions.

One distillation iteration:
  1. θ̂₀ = θ*_t (an expert's parameters at start epoch t, drawn from the difficulty window [T⁻, T⁺(it)));
  2. N plain-SGD steps θ̂ᵢ₊₁ = θ̂ᵢ − α ∇ℓ(θ̂ᵢ; DSA(X[idxᵢ]), Ŷ[idxᵢ]) with soft cross-entropy against softmax(Ŷ)
     (DATM) or hard one-hot labels (MTT);
  3. L = ‖θ̂_N − θ*_{t+M}‖² / ‖θ*_t − θ*_{t+M}‖²;
  4. exact gradient of L w.r.t. images X, label logits Ŷ and the step size (second order through every step),
     with per-step ``jax.checkpoint`` (remat) and the N steps as a rolled ``lax.scan`` or unrolled (config);
  5. SGD updates (images: momentum 0.5, step size: 0.5, labels: 0.9), all skipped when L > threshold or when
     anything is non-finite.

The step size α is parametrised so it cannot go negative (``lr_param='log'``: α = exp(ρ); ``'log_sgd'``: α = exp(ρ)
with ρ's gradient divided by α² so that α moves as the paper's raw-α SGD at every α; ``'raw'``: α = ρ
clipped to [lr_min, lr_max]) and is clipped to [lr_min, lr_max] after every update (the blow-up guard).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lmx.core.losses import soft_cross_entropy
from lmx.core.rng import np_stream
from lmx.methods.datm import dsa
from lmx.models import convnet

Syn = dict[str, jax.Array]  # {"x": images NHWC, "y": label logits (soft) or one-hot targets (hard) NC, "lr": ()}


@dataclasses.dataclass(frozen=True)
class InnerSpec:
  """Static description of the inner loop (hashable: a jit static argument)."""
  syn_steps: int
  batch_syn: int
  soft_labels: bool = True
  learn_labels: bool = True
  learn_lr: bool = True
  dsa_strategy: tuple[str, ...] = dsa.parse_strategy(dsa.DEFAULT_STRATEGY)
  unroll: bool = True
  remat: bool = True
  lr_param: str = "log"
  # Augment all N minibatches before the inner loop (one batched DSA call whose backward is one scatter) instead of
  # inside each step, where per-step remat recomputes it; DSA does not depend on θ, so the function is the same.
  hoist_dsa: bool = False


# ----------------------------------------------------------------------------------------------- small pieces


def lr_value(lr_raw: jax.Array, lr_param: str) -> jax.Array:
  """The step size α from its parameter: exp(ρ) for 'log', ρ itself for 'raw'."""
  return jnp.exp(lr_raw) if lr_param.startswith("log") else lr_raw


def lr_raw_from_value(lr: float, lr_param: str) -> float:
  return math.log(lr) if lr_param.startswith("log") else float(lr)


def targets_of(y_NC: jax.Array, soft_labels: bool) -> jax.Array:
  return jax.nn.softmax(y_NC, axis=-1) if soft_labels else y_NC


def sq_dist(a, b) -> jax.Array:
  return sum(jnp.sum(jnp.square(x - y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def matching_loss(theta_hat, theta_start, theta_target) -> jax.Array:
  """‖θ̂ − θ*_{t+M}‖² / ‖θ*_t − θ*_{t+M}‖² (the denominator carries no gradient)."""
  return sq_dist(theta_hat, theta_target) / jax.lax.stop_gradient(sq_dist(theta_start, theta_target))


def minibatch_schedule(key: jax.Array, n: int, steps: int, batch: int) -> jax.Array:
  """(steps, batch) indices: consecutive random permutations of range(n), cut into chunks of ``batch``.

  Every image appears once per pass when ``batch`` divides ``n`` (as MTT's popped permutation chunks); otherwise
  chunks run on into the next permutation so the shape stays static.
  """
  n_perm = -(-steps * batch // n)
  perms = jax.vmap(lambda k: jax.random.permutation(k, n))(jax.random.split(key, n_perm))
  return perms.reshape(-1)[:steps * batch].reshape(steps, batch).astype(jnp.int32)


# ----------------------------------------------------------------------------------------------- inner loop


def inner_loop(syn: Syn, theta_start, key: jax.Array, spec: InnerSpec, apply_fn: Callable | None = None):
  """θ̂_N after N SGD steps on synthetic minibatches, differentiable w.r.t. ``syn`` (exactly).

  ``apply_fn`` defaults to the ConvNet with the convolution measured fastest when differentiated through SGD
  steps on this backend (``convnet.apply_with("auto", second_order=True)``).
  """
  apply_fn = apply_fn or convnet.apply_with("auto", second_order=True)
  x_NHWC = syn["x"]
  y_NC = syn["y"] if spec.learn_labels else jax.lax.stop_gradient(syn["y"])
  lr_raw = syn["lr"] if spec.learn_lr else jax.lax.stop_gradient(syn["lr"])
  alpha = lr_value(lr_raw, spec.lr_param)
  targets_NC = targets_of(y_NC, spec.soft_labels)
  k_sched, k_aug = jax.random.split(key)
  idx_SB = minibatch_schedule(k_sched, x_NHWC.shape[0], spec.syn_steps, spec.batch_syn)
  batch_shape = (spec.batch_syn,) + tuple(x_NHWC.shape[1:])
  # Augmentation parameters do not depend on the images: drawn for all steps up front, outside the gradient.
  aug_S = jax.vmap(lambda k: dsa.draw(k, batch_shape, spec.dsa_strategy))(jax.random.split(k_aug, spec.syn_steps))

  def augmented(aug, idx_B):
    return dsa.apply_params(x_NHWC[idx_B], aug) if spec.dsa_strategy else x_NHWC[idx_B]

  def step(theta, inputs):
    aug, idx_B = inputs
    xb = aug if spec.hoist_dsa else augmented(aug, idx_B)
    g = jax.grad(lambda th: soft_cross_entropy(apply_fn(th, xb), targets_NC[idx_B]))(theta)
    return jax.tree.map(lambda p, gp: p - alpha * gp, theta, g), None

  if spec.hoist_dsa:  # (N, B, H, W, C) augmented minibatches, computed once outside the differentiated steps' remat
    aug_S = jax.vmap(augmented)(aug_S, idx_SB)
  if spec.remat:
    step = jax.checkpoint(step)
  if spec.unroll:
    theta = theta_start
    for i in range(spec.syn_steps):
      theta, _ = step(theta, (jax.tree.map(lambda a: a[i], aug_S), idx_SB[i]))
    return theta
  theta, _ = jax.lax.scan(step, theta_start, (aug_S, idx_SB))
  return theta


def meta_loss(syn: Syn, theta_start, theta_target, key: jax.Array, spec: InnerSpec,
              apply_fn: Callable | None = None) -> jax.Array:
  """The normalised parameter-matching loss of one iteration as a function of the synthetic state."""
  theta_hat = inner_loop(syn, theta_start, key, spec, apply_fn)
  return matching_loss(theta_hat, theta_start, theta_target)


# ----------------------------------------------------------------------------------------------- outer step


@dataclasses.dataclass(frozen=True)
class OuterSpec:
  """Outer optimisers and guards (hashable)."""
  lr_img: float
  lr_lr: float
  lr_y: float
  momentum_img: float = 0.5
  momentum_lr: float = 0.5
  momentum_y: float = 0.9
  threshold: float = 1.0
  lr_min: float = 1e-5
  lr_max: float = 1.0
  lr_init: float = 0.01
  spike_factor: float = 0.0  # > 0: skip an update whose ‖∇X‖ exceeds spike_factor × its running mean (0 = off)


def make_optimizer(outer: OuterSpec, inner: InnerSpec) -> optax.GradientTransformation:
  """SGD with momentum on images, step size and labels, as DATM.

  With ``lr_param='log'`` the step-size SGD runs on ρ = log α with learning rate lr_lr / α₀², so that its first
  update of α equals the paper's update of the raw α (dα ≈ α dρ = α · lr_ρ · α g_α).
  """
  lr_rate = outer.lr_lr / outer.lr_init ** 2 if inner.lr_param == "log" else outer.lr_lr
  txs = {"x": optax.sgd(outer.lr_img, momentum=outer.momentum_img),
         "lr": optax.sgd(lr_rate, momentum=outer.momentum_lr) if inner.learn_lr else optax.set_to_zero(),
         "y": optax.sgd(outer.lr_y, momentum=outer.momentum_y) if inner.learn_labels else optax.set_to_zero()}
  return optax.multi_transform(txs, {"x": "x", "y": "y", "lr": "lr"})


def init_state(syn: Syn, tx: optax.GradientTransformation) -> dict[str, Any]:
  """The distillation state: synthetic set + optimiser state."""
  syn = {k: jnp.asarray(v, jnp.float32) for k, v in syn.items()}
  # gx_mean: running mean of the image-gradient norm over accepted updates (the spike guard's reference).
  return {"syn": syn, "opt": tx.init(syn), "gx_mean": jnp.zeros((), jnp.float32)}


def clip_lr(lr_raw: jax.Array, outer: OuterSpec, lr_param: str) -> jax.Array:
  lo, hi = ((math.log(outer.lr_min), math.log(outer.lr_max)) if lr_param.startswith("log")
            else (outer.lr_min, outer.lr_max))
  return jnp.clip(lr_raw, lo, hi)


def meta_step(state: dict[str, Any], theta_start, theta_target, key: jax.Array, *, inner: InnerSpec,
              outer: OuterSpec, apply_fn: Callable | None = None):
  """One distillation iteration: (state, θ*_t, θ*_{t+M}, key) -> (state, metrics). Pure; jit it once.

  The update (parameters *and* optimiser state) is skipped when the loss exceeds ``outer.threshold``, when the
  loss or any gradient is not finite, or (``outer.spike_factor`` > 0, not in the reference code) when the image
  gradient's norm exceeds spike_factor × its running mean over accepted updates.
  """
  tx = make_optimizer(outer, inner)
  loss, grads = jax.value_and_grad(meta_loss)(state["syn"], theta_start, theta_target, key, inner, apply_fn)
  if inner.lr_param == "log_sgd":  # precondition ρ by 1/α²: dα ≈ α·dρ = lr_lr·∂L/∂α, the paper's raw-α SGD step
    grads = dict(grads, lr=grads["lr"] * jnp.exp(-2.0 * state["syn"]["lr"]))
  updates, new_opt = tx.update(grads, state["opt"], state["syn"])
  new_syn = optax.apply_updates(state["syn"], updates)
  new_syn["lr"] = clip_lr(new_syn["lr"], outer, inner.lr_param)
  finite = jnp.isfinite(loss) & jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
  gx = optax.tree.norm(grads["x"])
  gx_mean = state["gx_mean"]
  spike = (outer.spike_factor > 0) & (gx_mean > 0) & (gx > outer.spike_factor * gx_mean)
  ok = finite & (loss <= outer.threshold) & ~spike
  new_gx_mean = jnp.where(gx_mean > 0, 0.9 * gx_mean + 0.1 * gx, gx)
  new_state = jax.tree.map(lambda a, b: jnp.where(ok, a, b),
                           {"syn": new_syn, "opt": new_opt, "gx_mean": new_gx_mean}, state)
  metrics = {"loss": loss, "skipped": 1.0 - ok.astype(jnp.float32), "nonfinite": 1.0 - finite.astype(jnp.float32),
             "spike": spike.astype(jnp.float32),
             "lr": lr_value(new_state["syn"]["lr"], inner.lr_param),
             "grad_norm": optax.tree.norm(grads), "grad_norm_x": gx, "grad_norm_y": optax.tree.norm(grads["y"]),
             "grad_lr": grads["lr"]}
  return new_state, metrics


# ----------------------------------------------------------------------------------------------- schedule


def window_upper_bound(it: int, *, min_start: int, max_start: int, sequential: bool, current_max_start: int,
                       expansion_end: int) -> int:
  """T⁺(it): with sequential generation it grows linearly from ``current_max_start`` to ``max_start`` over
  ``expansion_end`` iterations (DATM.py L484–491), else it is ``max_start``. Exclusive bound."""
  del min_start
  if not sequential:
    return max_start
  grown = current_max_start + int((max_start - current_max_start) * it / max(expansion_end, 1))
  return min(grown, max_start)


def sample_start_epoch(seed: int, it: int, lo: int, hi: int) -> int:
  """t ~ U{lo, …, hi−1}, a pure function of (seed, it) so a resumed run draws the same epochs."""
  return int(np_stream(seed, "start_epoch", it).integers(lo, hi))


def expert_for(seed: int, it: int, num_experts: int) -> int:
  """Experts in a shuffled order, reshuffled after each pass; a pure function of (seed, it)."""
  order = np_stream(seed, "expert_order", it // num_experts).permutation(num_experts)
  return int(order[it % num_experts])


# ----------------------------------------------------------------------------------------------- initialisation


def select_correct(preds_EN: np.ndarray, y_N: np.ndarray, num_classes: int, ipc: int,
                   rng: np.random.Generator) -> np.ndarray:
  """DATM's ``samples_predicted_correctly``: per class, real images in random order that expert 0 classifies
  correctly; when a class runs out, the next expert's correct ones. Classes with too few correct images are
  filled with the remaining images (a warning case; never happens for trained experts). Returns (C·ipc,) indices
  grouped by class."""
  out = []
  for c in range(num_classes):
    idx = np.flatnonzero(y_N == c)
    if len(idx) < ipc:
      raise ValueError(f"distill.ipc={ipc}: class {c} has only {len(idx)} training images")
    idx = idx[rng.permutation(len(idx))]
    chosen: list[int] = []
    for e in range(preds_EN.shape[0]):
      for i in idx[preds_EN[e, idx] == c]:
        if len(chosen) == ipc:
          break
        if i not in chosen:
          chosen.append(int(i))
      if len(chosen) == ipc:
        break
    for i in idx:  # fill (only when no expert classifies enough images of class c correctly)
      if len(chosen) == ipc:
        break
      if i not in chosen:
        chosen.append(int(i))
    out.extend(chosen)
  return np.asarray(out, np.int64)


def soft_label_init(logits_EnC: np.ndarray, y_n: np.ndarray) -> np.ndarray:
  """Mean of the experts' logits over the experts that classify each image correctly (all experts when none do)."""
  correct_En = (logits_EnC.argmax(-1) == y_n[None]).astype(np.float64)
  none = correct_En.sum(0) == 0
  correct_En[:, none] = 1.0
  return ((correct_En[..., None] * logits_EnC).sum(0) / correct_En.sum(0)[:, None]).astype(np.float32)


class ExpertWindows:
  """The distillation's data source: iteration ``it`` yields the expert segment (θ*_t, θ*_{t+M}) it matches.

  Expert and start epoch are pure functions of (seed, it) (:func:`expert_for`, :func:`sample_start_epoch` within
  :func:`window_upper_bound`), so the position ``{"it": it}`` is the whole state (``get_state``/``set_state``:
  the shared loop checkpoints it). Batches are host arrays: ``theta_start``, ``theta_target`` and the scalars
  ``start_epoch``, ``window_upper``, ``expert`` (logged as metrics).
  """

  def __init__(self, buf, config):
    self.buf, self.seed, self.d, self.it = buf, int(config.seed), config.distill, 0

  def __iter__(self):
    return self

  def __next__(self):
    d, it = self.d, self.it
    e = expert_for(self.seed, it, self.buf.num_experts)
    ub = window_upper_bound(it, min_start=d.min_start_epoch, max_start=d.max_start_epoch, sequential=d.sequential,
                            current_max_start=d.current_max_start_epoch, expansion_end=d.expansion_end)
    t = sample_start_epoch(self.seed, it, d.min_start_epoch, ub)
    self.it += 1
    return {"theta_start": self.buf.snapshot(e, t), "theta_target": self.buf.snapshot(e, t + d.expert_epochs),
            "start_epoch": np.float32(t), "window_upper": np.float32(ub), "expert": np.float32(e)}

  def get_state(self) -> dict:
    return {"it": self.it}

  def set_state(self, state: dict) -> None:
    self.it = int(state["it"])


def make_step(inner: InnerSpec, outer: OuterSpec, apply_fn: Callable | None = None):
  """The loop's ``step(state, frozen, batch, rng)``: one :func:`meta_step` on the batch's expert segment.

  ``state`` holds the distillation parts (``syn``, ``opt``, ``gx_mean``) and ``counts`` of updates skipped by
  the loss threshold and by the spike guard (non-finite steps are counted by the loop's guard).
  """

  def step(state, frozen, batch, rng):
    del frozen
    parts = {k: state[k] for k in ("syn", "opt", "gx_mean")}
    new, m = meta_step(parts, batch["theta_start"], batch["theta_target"], rng, inner=inner, outer=outer,
                       apply_fn=apply_fn)
    counts = {"skipped": state["counts"]["skipped"] + m["skipped"], "spikes": state["counts"]["spikes"] + m["spike"]}
    extra = {k: batch[k] for k in ("start_epoch", "window_upper", "expert")}
    return dict(state, **new, counts=counts), {**m, **extra}

  return step


def init_loop_state(syn: Syn, tx: optax.GradientTransformation) -> dict[str, Any]:
  """:func:`init_state` plus the skip counters of :func:`make_step`."""
  return {**init_state(syn, tx), "counts": {"skipped": jnp.zeros((), jnp.float32), "spikes": jnp.zeros((), jnp.float32)}}
