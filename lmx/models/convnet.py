"""ConvNet-D as used by DC/DSA/MTT/DATM: depth × [conv3×3 → instance norm → ReLU → avg-pool 2×2] → linear.

Two faces of one model:
  * ``ConvNet`` — a Flax NNX module, used to initialise parameters (PyTorch-default uniform init,
    kaiming-uniform with a = √5, i.e. U(±1/√fan_in) for weights and biases) and for ordinary calls.
  * ``apply(params, x_NHWC)`` — a pure function of a plain parameter pytree (a dict of arrays), so that inner
    loops can take SGD steps on the parameters and differentiate through them (trajectory matching).

"instancenorm" is ``GroupNorm(C, C)``: per-sample, per-channel statistics over H×W, affine, eps 1e-5, no running
stats. A 1-channel 28×28 input uses padding 3 in the first conv (→ 32×32), as the reference code does.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

Params = dict[str, Any]
NORM_EPS = 1e-5


def _uniform_fan_in(fan_in: int):
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def first_padding(image_hw: int, channels: int) -> int:
  """Padding of the first conv: 3 for 1-channel 28×28 (MNIST → 32×32 feature map), else 1."""
  return 3 if (image_hw == 28 and channels == 1) else 1


def feature_hw(image_hw: int, channels: int, depth: int) -> int:
  """Spatial size after ``depth`` conv+pool blocks."""
  hw = image_hw + 2 * first_padding(image_hw, channels) - 2
  for _ in range(depth):
    hw //= 2
  return hw


class ConvNet(nnx.Module):
  """ConvNet-D with instance norm ('instancenorm') or no norm ('none'), ReLU and average pooling."""

  def __init__(self, image_shape_HWC: tuple[int, int, int], num_classes: int, *, depth: int = 3,
               width: int = 128, norm: str = "instancenorm", rngs: nnx.Rngs):
    h, w, c = image_shape_HWC
    if h != w:
      raise ValueError(f"ConvNet expects square images, got {image_shape_HWC}")
    if norm not in ("instancenorm", "none"):
      raise ValueError(f"model.norm={norm!r}: expected 'instancenorm' or 'none'")
    if feature_hw(h, c, depth) < 1:
      raise ValueError(f"model.depth={depth} is too deep for {h}×{w} images")
    cin = c
    for i in range(depth):
      pad = first_padding(h, c) if i == 0 else 1
      fan_in = 9 * cin
      setattr(self, f"conv{i}", nnx.Conv(cin, width, (3, 3), padding=pad, kernel_init=_uniform_fan_in(fan_in),
                                         bias_init=_uniform_fan_in(fan_in), rngs=rngs))
      if norm == "instancenorm":
        setattr(self, f"norm{i}", nnx.GroupNorm(width, num_groups=width, epsilon=NORM_EPS, rngs=rngs))
      cin = width
    feat = width * feature_hw(h, c, depth) ** 2
    self.fc = nnx.Linear(feat, num_classes, kernel_init=_uniform_fan_in(feat), bias_init=_uniform_fan_in(feat),
                         rngs=rngs)

  def __call__(self, x_NHWC: jax.Array) -> jax.Array:
    return apply(params_of(self), x_NHWC)


def params_of(model: nnx.Module) -> Params:
  """The model's parameters as a plain nested dict of arrays (the pytree ``apply`` takes)."""
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def init_params(key: jax.Array, image_shape_HWC, num_classes: int, *, depth: int = 3, width: int = 128,
                norm: str = "instancenorm") -> Params:
  """Fresh parameters of a ConvNet (pure function of the key; vmap it for many networks)."""
  model = ConvNet(tuple(image_shape_HWC), num_classes, depth=depth, width=width, norm=norm,
                  rngs=nnx.Rngs(params=key))
  return params_of(model)


def depth_of(params: Params) -> int:
  return sum(1 for k in params if k.startswith("conv"))


def num_params(params: Params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))


def _instance_norm(h_NHWC, scale_C, bias_C):
  mean = h_NHWC.mean(axis=(1, 2), keepdims=True)
  var = jnp.mean(jnp.square(h_NHWC - mean), axis=(1, 2), keepdims=True)
  return (h_NHWC - mean) * jax.lax.rsqrt(var + NORM_EPS) * scale_C + bias_C


CONV_IMPLS = ("auto", "xla", "im2col", "mixed")
# 'mixed': im2col for convolutions with at most this many input channels (the first layer), XLA's native
# convolution for the rest: on XLA:CPU the native filter gradient of a 1-channel conv is slow, and im2col of a
# 16-channel conv is slower than native (benchmarks/convnet_train_step.py compares the three whole steps).
MIXED_MAX_CIN = 4


def conv_xla(x_NHWC: jax.Array, kernel_HWIO: jax.Array, pad: int) -> jax.Array:
  """Stride-1 'same'-style convolution with symmetric zero padding ``pad`` (XLA's native convolution)."""
  return jax.lax.conv_general_dilated(x_NHWC, kernel_HWIO, (1, 1), [(pad, pad), (pad, pad)],
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def conv_im2col(x_NHWC: jax.Array, kernel_HWIO: jax.Array, pad: int) -> jax.Array:
  """The same convolution as one matmul over explicit k×k patches (im2col).

  The same sum as ``conv_xla`` (up to float rounding order). On XLA:CPU the native convolution's backward passes are
  slow, and the DATM meta-step (second order through N SGD steps) runs faster with im2col, most of all as a
  ``lax.scan``; numbers in benchmarks/results/datm_step*.json (``benchmarks/datm_step.py``).
  """
  n, h, w, c = x_NHWC.shape
  kh, kw, ci, co = kernel_HWIO.shape
  xp = jnp.pad(x_NHWC, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  ho, wo = h + 2 * pad - kh + 1, w + 2 * pad - kw + 1
  cols = jnp.concatenate([xp[:, i:i + ho, j:j + wo, :] for i in range(kh) for j in range(kw)], axis=-1)
  out = cols.reshape(n * ho * wo, kh * kw * ci) @ kernel_HWIO.reshape(kh * kw * ci, co)
  return out.reshape(n, ho, wo, co)


def resolve_conv_impl(impl: str = "auto", *, second_order: bool = False) -> str:
  """The convolution 'auto' stands for, per backend and use.

  On accelerators: 'xla' (cuDNN / TPU convolutions). On CPU, measured fastest per use (benchmarks/):
  'mixed' for ordinary training (first-order: expert training, evaluation) and 'im2col' when differentiating
  through SGD steps (``second_order``: DATM's inner loop).
  """
  if impl not in CONV_IMPLS:
    raise ValueError(f"model.conv_impl={impl!r}: expected one of {list(CONV_IMPLS)}")
  if impl == "auto":
    if jax.default_backend() != "cpu":
      return "xla"
    return "im2col" if second_order else "mixed"
  return impl


@functools.lru_cache(maxsize=None)
def apply_with(conv_impl: str = "auto", *, second_order: bool = False) -> Callable:
  """``apply`` with the convolution fixed (resolved for this backend and use); one object per choice, so jitted
  functions that take it as a static argument compile once."""
  return functools.partial(apply, conv_impl=resolve_conv_impl(conv_impl, second_order=second_order))


def apply(params: Params, x_NHWC: jax.Array, conv_impl: str = "auto") -> jax.Array:
  """Logits (N, num_classes) of the ConvNet with parameters ``params`` on images ``x_NHWC``.

  ``conv_impl``: 'xla' (native convolution), 'im2col' (patches × matmul), 'mixed' (im2col where the input has
  ≤ ``MIXED_MAX_CIN`` channels, native elsewhere) or 'auto' (see ``resolve_conv_impl``). All give the same
  function.
  """
  impl = resolve_conv_impl(conv_impl)
  h = x_NHWC
  _, hw, _, c = x_NHWC.shape
  for i in range(depth_of(params)):
    conv = params[f"conv{i}"]
    pad = first_padding(hw, c) if i == 0 else 1
    cin = conv["kernel"].shape[2]
    use_im2col = impl == "im2col" or (impl == "mixed" and cin <= MIXED_MAX_CIN)
    h = (conv_im2col if use_im2col else conv_xla)(h, conv["kernel"], pad) + conv["bias"]
    if f"norm{i}" in params:
      h = _instance_norm(h, params[f"norm{i}"]["scale"], params[f"norm{i}"]["bias"])
    h = jax.nn.relu(h)
    n, hh, ww, cc = h.shape
    h = h[:, :hh // 2 * 2, :ww // 2 * 2].reshape(n, hh // 2, 2, ww // 2, 2, cc).mean(axis=(2, 4))
  h = h.reshape(h.shape[0], -1)
  return h @ params["fc"]["kernel"] + params["fc"]["bias"]
