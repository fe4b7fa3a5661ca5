r"""Seconds per first-order SGD step of K ConvNets (DATM's expert training and evaluation step), per convolution.

    PYTHONPATH=. python benchmarks/convnet_train_step.py [--shapes=default,experts,cifar] [--conv=xla,im2col,mixed]
        [--iters=10] [--out=benchmarks/results/convnet_train_step.json]

Compares ``model.conv_impl`` = xla (XLA's native convolution, the baseline), im2col (patches × matmul in every
layer) and mixed (im2col in the first layer, whose input has ≤ 4 channels; native elsewhere), each with the K
networks as an unrolled loop inside one jit and with ``vmap``, in the same process. The step is
``evaluate._train_step``: DSA on the batch (its own jitted call), soft cross-entropy, SGD with momentum and weight
decay. ``dsa=fused`` rows are the baseline for that split: the same augmentation and step traced into one jitted
computation (how lmx ran before session 3), where XLA:CPU recomputes the resampling inside the convolutions.

Shapes:
  default  the default config's evaluation step: MNIST 28×28×1, ConvNet-3 width 16, 5 nets × batch 128
  experts  the default config's expert-training step: the same net, 3 experts × batch 64
  cifar    CIFAR-shaped: 32×32×3, ConvNet-3 width 128, 2 nets × batch 256
"""
from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import environment, record
from lmx.methods.datm import dsa
from lmx.methods.datm import evaluate
from lmx.methods.datm.evaluate import _train_step
from lmx.models import convnet

SHAPES = {
    "default": dict(image=(28, 28, 1), width=16, nets=5, batch=128, strategy="color_crop_cutout_scale_rotate"),
    "experts": dict(image=(28, 28, 1), width=16, nets=3, batch=64, strategy="color_crop_cutout_scale_rotate"),
    "cifar": dict(image=(32, 32, 3), width=128, nets=2, batch=256,
                  strategy="color_crop_cutout_flip_scale_rotate"),
}


@functools.partial(jax.jit, static_argnames=("strategy", "momentum", "weight_decay", "use_vmap", "apply_fn"))
def _fused_step(params_K, mom_K, x_all, t_all, idx_KB, mask_KB, keys_K, lr, *, strategy, momentum, weight_decay,
                use_vmap, apply_fn):
  """The baseline: augmentation and SGD step in one jitted computation."""
  xb = dsa.augment_batches(keys_K, x_all, idx_KB, strategy)  # inlined into this jit: the fused form
  return evaluate._sgd_step(params_K, mom_K, xb, t_all, idx_KB, mask_KB, lr, momentum=momentum,  # pylint: disable=protected-access
                            weight_decay=weight_decay, use_vmap=use_vmap, apply_fn=apply_fn)


def bench(shape: dict, conv: str, use_vmap: bool, iters: int, fused: bool = False) -> dict:
  """Compiles and times one (convolution, loop/vmap) configuration of the training step."""
  fn = _fused_step if fused else _train_step
  k, b, n = shape["nets"], shape["batch"], 2000
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((n,) + shape["image"]), jnp.float32)
  t = jax.nn.one_hot(rng.integers(0, 10, n), 10)
  params = jax.vmap(lambda key: convnet.init_params(key, shape["image"], 10, depth=3, width=shape["width"]))(
      jax.random.split(jax.random.key(0), k))
  mom = jax.tree.map(jnp.zeros_like, params)
  idx, mask = rng.integers(0, n, (k, b)), np.ones((k, b), np.float32)
  keys = jax.random.split(jax.random.key(1), k)
  kw = dict(strategy=dsa.parse_strategy(shape["strategy"]), momentum=0.9, weight_decay=5e-4, use_vmap=use_vmap,
            apply_fn=convnet.apply_with(conv))
  t0 = time.time()
  out = fn(params, mom, x, t, idx, mask, keys, jnp.float32(0.01), **kw)
  jax.block_until_ready(out)
  compile_s = time.time() - t0
  t0 = time.time()
  for _ in range(iters):
    out = fn(params, mom, x, t, idx, mask, keys, jnp.float32(0.01), **kw)
  jax.block_until_ready(out)
  return {"conv": convnet.resolve_conv_impl(conv), "mapping": "vmap" if use_vmap else "loop",
          "dsa": "fused" if fused else "separate",
          "compile_seconds": round(compile_s, 2), "seconds_per_step": round((time.time() - t0) / iters, 4)}


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--shapes", default="default,experts,cifar")
  ap.add_argument("--conv", default="xla,im2col,mixed")
  ap.add_argument("--iters", type=int, default=10)
  ap.add_argument("--out", default="benchmarks/results/convnet_train_step.json")
  args = ap.parse_args()
  results = environment(iters=args.iters)
  for shape_name in args.shapes.split(","):
    shape = SHAPES[shape_name]
    for conv in args.conv.split(","):
      for use_vmap, fused in ((False, False), (False, True), (True, False)):
        r = {"shape": shape_name, **shape, **bench(shape, conv, use_vmap, args.iters, fused)}
        record(results, r, args.out)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
