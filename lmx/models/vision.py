"""Small image classifiers for cross-architecture evaluation of distilled sets: MLP, LeNet and ResNet-18.

They follow the networks of the DC/DSA/MTT/DATM code (``networks.py``), as the ConvNet does:
  * ``MLP``       flatten → 128 → ReLU → 128 → ReLU → classes.
  * ``LeNet``     conv5×5 (6, padding 2 for 1-channel images, else 0) → ReLU → max-pool 2 → conv5×5 (16) → ReLU →
                  max-pool 2 → 120 → ReLU → 84 → ReLU → classes (16·5·5 = 400 features at 28×28×1 and 32×32×3).
  * ``ResNet18``  conv3×3 (64, stride 1, no bias) → norm → ReLU → 4 stages × 2 BasicBlocks (64, 128, 256, 512
                  channels, strides 1, 2, 2, 2; 1×1 projection shortcut where the shape changes) → global average pool
                  → linear. "instancenorm" (the reference's default for ``ResNet18``) is GroupNorm(C, C), affine,
                  eps 1e-5, no running statistics, so train and test mode are one function.

Each model has the ConvNet's two faces: an NNX module (PyTorch-default uniform init U(±1/√fan_in)) and a pure
``apply(params, x_NHWC) -> logits`` on a plain parameter dict (``build(name, ...)`` returns the registry's Model
with ``init(key) -> params`` and that ``apply``), so the DATM evaluation trains them like the ConvNet.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
from flax import nnx

from lmx.models.convnet import NORM_EPS, _uniform_fan_in

ARCHS = ("mlp", "lenet", "resnet18")


def _linear(din: int, dout: int, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(din, dout, kernel_init=_uniform_fan_in(din), bias_init=_uniform_fan_in(din), rngs=rngs)


def _conv(cin: int, cout: int, k: int, *, stride: int = 1, padding: int = 0, bias: bool = True,
          rngs: nnx.Rngs) -> nnx.Conv:
  fan_in = k * k * cin
  return nnx.Conv(cin, cout, (k, k), strides=stride, padding=padding, use_bias=bias,
                  kernel_init=_uniform_fan_in(fan_in), bias_init=_uniform_fan_in(fan_in), rngs=rngs)


class MLP(nnx.Module):
  """Flatten → ``width`` → ReLU → ``width`` → ReLU → ``num_classes`` (DC's MLP, width 128)."""

  def __init__(self, image_shape_HWC, num_classes: int, *, width: int = 128, rngs: nnx.Rngs):
    h, w, c = image_shape_HWC
    self.fc1 = _linear(h * w * c, width, rngs)
    self.fc2 = _linear(width, width, rngs)
    self.fc3 = _linear(width, num_classes, rngs)

  def __call__(self, x_NHWC: jax.Array) -> jax.Array:
    h = x_NHWC.reshape(x_NHWC.shape[0], -1)
    return self.fc3(jax.nn.relu(self.fc2(jax.nn.relu(self.fc1(h)))))


def _max_pool2(h_NHWC: jax.Array) -> jax.Array:
  n, hh, ww, c = h_NHWC.shape
  return h_NHWC[:, :hh // 2 * 2, :ww // 2 * 2].reshape(n, hh // 2, 2, ww // 2, 2, c).max(axis=(2, 4))


def lenet_feature_hw(image_hw: int, channels: int) -> int:
  """Spatial size of LeNet's features: (conv5 with padding 2 for 1 channel, else 0) → pool 2 → conv5 → pool 2."""
  hw = image_hw + 2 * (2 if channels == 1 else 0) - 4
  return (hw // 2 - 4) // 2


class LeNet(nnx.Module):
  """DC's LeNet: two conv5×5 + max-pool stages (6, 16 channels) and three linear layers (120, 84, classes)."""

  def __init__(self, image_shape_HWC, num_classes: int, *, rngs: nnx.Rngs):
    h, w, c = image_shape_HWC
    fhw = lenet_feature_hw(h, c)
    if h != w or fhw < 1:
      raise ValueError(f"LeNet needs square images of at least 28×28 (1 channel) or 32×32, got {image_shape_HWC}")
    self.conv1 = _conv(c, 6, 5, padding=2 if c == 1 else 0, rngs=rngs)
    self.conv2 = _conv(6, 16, 5, rngs=rngs)
    self.fc1 = _linear(16 * fhw * fhw, 120, rngs)
    self.fc2 = _linear(120, 84, rngs)
    self.fc3 = _linear(84, num_classes, rngs)

  def __call__(self, x_NHWC: jax.Array) -> jax.Array:
    h = _max_pool2(jax.nn.relu(self.conv1(x_NHWC)))
    h = _max_pool2(jax.nn.relu(self.conv2(h)))
    h = h.reshape(h.shape[0], -1)
    return self.fc3(jax.nn.relu(self.fc2(jax.nn.relu(self.fc1(h)))))


def _norm(c: int, rngs: nnx.Rngs) -> nnx.GroupNorm:
  return nnx.GroupNorm(c, num_groups=c, epsilon=NORM_EPS, rngs=rngs)  # instance norm, PyTorch's eps


class BasicBlock(nnx.Module):
  """conv3×3(stride) → norm → ReLU → conv3×3 → norm, plus the (projected) input, → ReLU."""

  def __init__(self, cin: int, cout: int, stride: int, *, rngs: nnx.Rngs):
    self.conv1 = _conv(cin, cout, 3, stride=stride, padding=1, bias=False, rngs=rngs)
    self.norm1 = _norm(cout, rngs)
    self.conv2 = _conv(cout, cout, 3, padding=1, bias=False, rngs=rngs)
    self.norm2 = _norm(cout, rngs)
    self.proj = stride != 1 or cin != cout
    if self.proj:
      self.short_conv = _conv(cin, cout, 1, stride=stride, bias=False, rngs=rngs)
      self.short_norm = _norm(cout, rngs)

  def __call__(self, x_NHWC: jax.Array) -> jax.Array:
    h = jax.nn.relu(self.norm1(self.conv1(x_NHWC)))
    h = self.norm2(self.conv2(h))
    skip = self.short_norm(self.short_conv(x_NHWC)) if self.proj else x_NHWC
    return jax.nn.relu(h + skip)


class ResNet18(nnx.Module):
  """ResNet-18 (BasicBlock × [2, 2, 2, 2]) with instance norm, as DC/MTT's ``ResNet18``; ``width`` = 64 channels in
  the first stage (doubled per stage)."""

  def __init__(self, image_shape_HWC, num_classes: int, *, width: int = 64, rngs: nnx.Rngs):
    _, _, c = image_shape_HWC
    self.conv1 = _conv(c, width, 3, padding=1, bias=False, rngs=rngs)
    self.norm1 = _norm(width, rngs)
    blocks, cin = [], width
    for i, stride in enumerate((1, 2, 2, 2)):
      cout = width * 2 ** i
      blocks += [BasicBlock(cin, cout, stride, rngs=rngs), BasicBlock(cout, cout, 1, rngs=rngs)]
      cin = cout
    self.blocks = nnx.List(blocks)
    self.fc = _linear(cin, num_classes, rngs)

  def __call__(self, x_NHWC: jax.Array) -> jax.Array:
    h = jax.nn.relu(self.norm1(self.conv1(x_NHWC)))
    for block in self.blocks:
      h = block(h)
    return self.fc(h.mean(axis=(1, 2)))


_CLASSES = {"mlp": MLP, "lenet": LeNet, "resnet18": ResNet18}


def make(name: str, image_shape_HWC, num_classes: int, *, rngs: nnx.Rngs, **kw) -> nnx.Module:
  """The NNX module ``name`` (one of ``ARCHS``)."""
  if name not in _CLASSES:
    raise ValueError(f"unknown architecture {name!r}; valid: {list(ARCHS)}")
  return _CLASSES[name](tuple(image_shape_HWC), int(num_classes), rngs=rngs, **kw)


def num_params(params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))


def build(name: str, model_cfg, *, image_shape, num_classes: int):
  """The registry's :class:`~lmx.models.registry.Model` for ``name``: ``init(key)`` gives a plain parameter dict,
  ``apply(params, x_NHWC)`` the logits (a pure function: the module is merged from its graph inside it).
  ``model_cfg.width`` (optional) sets the MLP's hidden width or the ResNet's first-stage channels."""
  from lmx.core import mesh as mesh_lib
  from lmx.models.registry import Model

  get = model_cfg.get if hasattr(model_cfg, "get") else (lambda k, d=None: d)
  kw: dict[str, Any] = {}
  if name in ("mlp", "resnet18") and get("width", None):
    kw["width"] = int(get("width"))
  shape, classes = tuple(int(s) for s in image_shape), int(num_classes)
  abstract = nnx.eval_shape(lambda: make(name, shape, classes, rngs=nnx.Rngs(0), **kw))
  graphdef = nnx.split(abstract, nnx.Param)[0]

  def init(key: jax.Array) -> dict:
    return nnx.to_pure_dict(nnx.state(make(name, shape, classes, rngs=nnx.Rngs(params=key), **kw), nnx.Param))

  def apply(params, x_NHWC: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, params)(x_NHWC)

  def shardings(mesh, rules):
    del rules
    return jax.tree.map(lambda _: mesh_lib.replicated(mesh), jax.eval_shape(init, jax.random.key(0)))

  return Model(name, dict(kw), init, _cached_apply(name, shape, classes, tuple(sorted(kw.items())), apply),
               shardings, graphdef)


_APPLY_CACHE: dict[tuple, Callable] = {}


def _cached_apply(name, shape, classes, kw_items, apply):
  """One ``apply`` object per (architecture, shapes, options): jitted steps that take it as a static argument
  (the DATM evaluation's SGD step) compile once per architecture, not once per build."""
  return _APPLY_CACHE.setdefault((name, shape, classes, kw_items), apply)
