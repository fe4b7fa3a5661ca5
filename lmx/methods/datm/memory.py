"""Peak-memory estimate of a DATM config, part by part, before anything is allocated.

``estimate(config) -> {part: bytes}``:
  expert_buffer_host     all experts' snapshots, (E, T+1) × |θ| float32, held on the host during distillation
  expert_step            ``experts.parallel`` networks' (GSAM) SGD step on batches of ``experts.batch``, plus the
                         training images on the device
  init_forward           one block of the chunked expert forward passes (``experts.fwd_chunk_experts`` networks ×
                         ``experts.fwd_chunk_images`` images; initial-image selection, soft labels, test accuracy)
  init_logits_host       every expert's logits on the chosen images (E × n × classes; soft-label initialisation)
  meta_step              one distillation iteration: the synthetic set with its gradient and momenta, the N inner-step
                         parameter checkpoints of the rolled, rematerialised scan, and one inner step's activations
                         with their second-order backward (``distill.batch_syn`` images; all N steps' when the
                         scan is unrolled, where remat saves nothing)
  eval_train             ``eval.num`` evaluation networks' SGD step (batch ``eval.batch``), plus the largest training
                         set an arm puts on the device (the whole training set with ``eval.full``)

Parts ending in ``_host`` live in host memory; the others are device memory, one part at a time (each stage frees
its arrays before the next), so a config fits a device when every device part fits: ``check(config, budget)``.

The model: a ConvNet's activation floats per image ``A = Σ_blocks H_i·W_i·width`` (the conv outputs) and its first
block's ``a0 = H_0·W_0·width``, with factors fitted to ``compiled.memory_analysis()`` (argument + temp bytes) of the
real jitted steps with native (XLA) convolutions — what ``model.conv_impl='auto'`` picks on GPU/TPU — on XLA:CPU:
forward 2.0·a0 per (network, image), first-order training step 5.5·A, second-order inner step 8.5·A (per image).
``measure(config, part)`` compiles the real step at the config's shapes and returns that number (tests check the
estimate against it within 0.5×–2× at small shapes). XLA:GPU adds convolution workspace; treat the estimate as good
to a factor of two, not to a byte.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

# (train images, image shape HWC, classes) of each dataset, without loading it
DATASET_SHAPES = {"mnist5k": (4000, (28, 28, 1), 10), "digits": (1437, (8, 8, 1), 10),
                  "mnist": (60000, (28, 28, 1), 10), "fashion_mnist": (60000, (28, 28, 1), 10),
                  "cifar10": (50000, (32, 32, 3), 10), "cifar100": (50000, (32, 32, 3), 100),
                  "tiny_imagenet": (100000, (64, 64, 3), 200)}
F32 = 4
FWD_PER_A0 = 2.0  # forward only: a block's conv output and its normalised/activated copy live together
TRAIN_PER_A = 5.5  # first-order step: saved activations + their gradients (GSAM adds ~10%: its passes run in turn)
META_PER_A = 8.5  # second-order inner step under remat: recomputed forward + first-order backward + their cotangents
DEVICE_BUDGET_BYTES = 80 * 10 ** 9  # one 80 GB accelerator (A100/H100 80GB); configs/datm.py documents it
HOST_PARTS = ("expert_buffer_host", "init_logits_host")


def convnet_sizes(image_shape, num_classes: int, depth: int, width: int) -> dict[str, int]:
  """Parameter count ``P`` and activation floats per image ``A`` (all blocks) and ``a0`` (first block)."""
  from lmx.models.convnet import feature_hw, first_padding

  hw, _, c = image_shape
  s = hw + 2 * first_padding(hw, c) - 2
  sizes, cin, p = [], c, 0
  for _ in range(depth):
    sizes.append(s * s * width)
    p += 9 * cin * width + width + 2 * width  # conv + bias + instance-norm scale/shift
    cin, s = width, s // 2
  p += width * feature_hw(hw, c, depth) ** 2 * num_classes + num_classes
  return {"P": p, "A": sum(sizes), "a0": sizes[0]}


def _shapes(config):
  n_train, shape, classes = DATASET_SHAPES[config.data.dataset]
  m = config.model
  return n_train, shape, classes, convnet_sizes(shape, classes, int(m.depth), int(m.width))


def estimate(config) -> dict[str, int]:
  """Bytes per part (see the module docstring) for ``config`` (float32 everywhere)."""
  n_train, shape, classes, z = _shapes(config)
  e, d, v = config.experts, config.distill, config.eval
  img = math.prod(shape)
  p, a, a0 = z["P"], z["A"], z["a0"]
  n_syn = d.ipc * classes
  k = min(e.parallel, e.num)
  out = {"expert_buffer_host": e.num * (e.epochs + 1) * p * F32}
  # K nets: params + momentum in, params + momentum out; augmented batch; the training images on the device
  out["expert_step"] = F32 * (k * e.batch * TRAIN_PER_A * a + 4 * k * p + k * e.batch * img + n_train * img)
  ec, ic = min(e.fwd_chunk_experts, e.num), min(e.fwd_chunk_images, n_train)
  out["init_forward"] = F32 * (ec * ic * FWD_PER_A0 * a0 + ec * p + ic * img + ec * ic * classes)
  out["init_logits_host"] = F32 * e.num * n_syn * classes if d.soft_labels and d.init == "correct" else 0
  syn = n_syn * (img + classes)
  # args: synthetic set + its two momenta (images/labels) + θ*_t, θ*_{t+M}; temp: its gradient and new values,
  # the N + 1 parameter checkpoints of the scan, one inner step's second-order activations
  # unrolled without remat (or unrolled with it: XLA CSEs the recompute away) keeps every step's activations
  live_steps = 1 if (d.remat and not d.unroll) else d.syn_steps
  # distill.hoist_dsa: the N augmented minibatches live through the scan and its backward, with their cotangents
  hoisted = 2 * d.syn_steps * d.batch_syn * img if d.hoist_dsa else 0
  out["meta_step"] = F32 * (3 * syn + 2 * p + (d.syn_steps + 1) * p + live_steps * d.batch_syn * META_PER_A * a
                            + d.syn_steps * d.batch_syn * 16 + hoisted)  # + the DSA parameters for all steps (small)
  data_on_device = n_train if v.full else max(n_syn, d.ipc * classes)
  out["eval_train"] = F32 * (v.num * v.batch * TRAIN_PER_A * a + 4 * v.num * p + v.num * v.batch * img
                             + data_on_device * (img + classes))
  return {kk: int(vv) for kk, vv in out.items()}


def device_parts(est: dict[str, int]) -> dict[str, int]:
  return {k: v for k, v in est.items() if k not in HOST_PARTS}


def check(config, budget: int = DEVICE_BUDGET_BYTES) -> tuple[str, int]:
  """``(largest device part, its bytes)``; raises ConfigError naming the part (and the config fields that size
  it) when a device part exceeds ``budget``."""
  from lmx.core.config import ConfigError

  parts = device_parts(estimate(config))
  name = max(parts, key=parts.get)
  fields = {"expert_step": "experts.parallel / experts.batch", "init_forward":
            "experts.fwd_chunk_experts / experts.fwd_chunk_images", "meta_step": "distill.batch_syn",
            "eval_train": "eval.num / eval.batch"}
  over = {k: v for k, v in parts.items() if v > budget}
  if over:
    worst = max(over, key=over.get)
    raise ConfigError(f"{fields[worst]}: the {worst} needs about {over[worst] / 1e9:.1f} GB, over the "
                      f"{budget / 1e9:.0f} GB device budget; lower it")
  return name, parts[name]


def table(configs: dict) -> str:
  """A Markdown table of the estimates (GB) of ``{name: config}``, the largest device part marked."""
  cols = ["expert_buffer_host", "init_logits_host", "expert_step", "init_forward", "meta_step", "eval_train"]
  lines = ["| preset | " + " | ".join(cols) + " | largest device part |", "|---" * (len(cols) + 2) + "|"]
  for name, c in configs.items():
    est = estimate(c)
    big = max(device_parts(est), key=device_parts(est).get)
    lines.append(f"| {name} | " + " | ".join(f"{est[k] / 1e9:.2f}" for k in cols) + f" | {big} |")
  return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- measurement


def _mem_bytes(compiled) -> int:
  m = compiled.memory_analysis()
  return int(m.argument_size_in_bytes + m.temp_size_in_bytes)


def measure(config, part: str, *, conv_impl: str = "xla") -> int:
  """Argument + temp bytes of the real jitted step of ``part`` ('meta_step', 'expert_step' or 'init_forward') at
  ``config``'s shapes, from XLA's memory analysis on this backend (compiles, allocates nothing)."""
  from lmx.methods.datm import distill as D
  from lmx.methods.datm import experts as E
  from lmx.methods.datm.driver import specs
  from lmx.models import convnet

  n_train, shape, classes, _ = _shapes(config)
  e, d, m = config.experts, config.distill, config.model
  init = functools.partial(convnet.init_params, image_shape_HWC=shape, num_classes=classes, depth=int(m.depth),
                           width=int(m.width), norm=m.norm)
  sds = lambda s, dt=jnp.float32: jax.ShapeDtypeStruct(s, dt)  # noqa: E731
  if part == "meta_step":
    inner, outer = specs(config)
    tx = D.make_optimizer(outer, inner)
    n = d.ipc * classes
    state = jax.eval_shape(lambda: D.init_state({"x": jnp.zeros((n, *shape)), "y": jnp.zeros((n, classes)),
                                                 "lr": jnp.zeros(())}, tx))
    theta = jax.eval_shape(init, jax.random.key(0))
    f = jax.jit(functools.partial(D.meta_step, inner=inner, outer=outer,
                                  apply_fn=convnet.apply_with(conv_impl, second_order=True)))
    return _mem_bytes(f.lower(state, theta, theta, jax.random.key(0)).compile())
  if part == "expert_step":
    k = min(e.parallel, e.num)
    params = jax.eval_shape(jax.vmap(init), jax.random.split(jax.random.key(0), k))
    sgd = jax.jit(E.make_sgd(lr=e.lr, momentum=e.momentum, weight_decay=e.weight_decay, gsam=e.gsam,
                             rho=e.gsam_rho, gsam_alpha=e.gsam_alpha, apply_fn=convnet.apply_with(conv_impl),
                             use_vmap=True))
    args = (params, params, sds((k, e.batch, *shape)), sds((n_train,), jnp.int32), sds((k, e.batch), jnp.int32),
            sds((k, e.batch)))
    # the training images stay on the device beside the step (NetBatches' x_all)
    return _mem_bytes(sgd.lower(*args).compile()) + n_train * math.prod(shape) * F32
  if part == "init_forward":
    ec, ic = min(e.fwd_chunk_experts, e.num), min(e.fwd_chunk_images, n_train)
    params = jax.eval_shape(jax.vmap(init), jax.random.split(jax.random.key(0), ec))
    f = E._chunk_forward(convnet.apply_with(conv_impl), False)  # pylint: disable=protected-access
    return _mem_bytes(f.lower(params, sds((ic, *shape))).compile())
  raise ValueError(f"measure: part={part!r}; expected 'meta_step', 'expert_step' or 'init_forward'")
