r"""Seconds and memory per DATM distillation iteration: rolled ``lax.scan`` vs unrolled, with and without remat,
for XLA's native convolution (the baseline), the im2col convolution and 'mixed' (im2col for the first layer only)
(``model.conv_impl``).

    PYTHONPATH=. python benchmarks/datm_step.py [--shapes=default,cifar] [--conv=xla,im2col,mixed] [--iters=3] [--out=F]

Shapes:
  default  the default config's meta-step (MNIST 28×28×1, ConvNet-3 width 16, IPC 10, batch_syn 50, N 10, DSA)
  default25  the same with N 25 inner steps (the paper's N/M ratio at M = 2; --config.distill.syn_steps=25)
  cifar    CIFAR-shaped (32×32×3, ConvNet-3 width 128, IPC 10 = 100 images, batch_syn 100, N 20, DSA)

For each: compile seconds, steady-state seconds per iteration (mean of ``--iters`` after one warm-up), XLA's
compiled temp-buffer size, the process's peak RSS so far, and the device's peak bytes where the backend reports
them (GPU). The expert snapshots are synthetic (random perturbations); timing does not depend on their values.
"""
from __future__ import annotations

import argparse
import resource
import time

import jax
import jax.numpy as jnp

from benchmarks.common import environment, record
from lmx.methods.datm import distill as D
from lmx.methods.datm import dsa
from lmx.models import convnet

SHAPES = {
    "default": dict(image=(28, 28, 1), width=16, ipc=10, batch_syn=50, syn_steps=10,
                    strategy="color_crop_cutout_scale_rotate"),
    "default25": dict(image=(28, 28, 1), width=16, ipc=10, batch_syn=50, syn_steps=25,
                      strategy="color_crop_cutout_scale_rotate"),
    "cifar": dict(image=(32, 32, 3), width=128, ipc=10, batch_syn=100, syn_steps=20,
                  strategy="color_crop_cutout_flip_scale_rotate"),
}


def bench(shape: dict, unroll: bool, remat: bool, iters: int, conv: str = "auto") -> dict:
  """Compiles and times one meta-step configuration."""
  key = jax.random.key(0)
  p0 = convnet.init_params(key, shape["image"], 10, depth=3, width=shape["width"])
  p1 = jax.tree.map(lambda a: a + 0.01 * jnp.sign(a), p0)
  n = shape["ipc"] * 10
  syn = {"x": jax.random.normal(key, (n,) + shape["image"]), "y": jnp.zeros((n, 10)),
         "lr": jnp.float32(D.lr_raw_from_value(0.01, "log"))}
  inner = D.InnerSpec(syn_steps=shape["syn_steps"], batch_syn=shape["batch_syn"],
                      dsa_strategy=dsa.parse_strategy(shape["strategy"]), unroll=unroll, remat=remat)
  outer = D.OuterSpec(lr_img=100.0, lr_lr=1e-5, lr_y=2.0, threshold=1e9)
  state = D.init_state(syn, D.make_optimizer(outer, inner))
  apply_fn = convnet.apply_with(conv, second_order=True)
  fn = jax.jit(lambda s, a, b, k: D.meta_step(s, a, b, k, inner=inner, outer=outer, apply_fn=apply_fn))
  t0 = time.time()
  compiled = fn.lower(state, p0, p1, key).compile()
  compile_s = time.time() - t0
  mem = compiled.memory_analysis()
  state, m = compiled(state, p0, p1, key)
  jax.block_until_ready(state)
  t0 = time.time()
  for i in range(iters):
    state, m = compiled(state, p0, p1, jax.random.fold_in(key, i))
  jax.block_until_ready(state)
  sec = (time.time() - t0) / iters
  dev_peak = None
  try:
    stats = jax.devices()[0].memory_stats() or {}
    dev_peak = stats.get("peak_bytes_in_use")
  except Exception:  # noqa: BLE001
    pass
  return {"loop": "unrolled" if unroll else "scan", "remat": remat, "conv": convnet.resolve_conv_impl(conv, second_order=True),
          "compile_seconds": round(compile_s, 2),
          "seconds_per_iteration": round(sec, 4),
          "xla_temp_MiB": round(getattr(mem, "temp_size_in_bytes", 0) / 2**20, 1) if mem else None,
          "peak_rss_MiB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
          "device_peak_MiB": round(dev_peak / 2**20, 1) if dev_peak else None,
          "loss": float(m["loss"])}


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--shapes", default="default,cifar")
  ap.add_argument("--variants", default="unrolled,unrolled+remat,scan,scan+remat")
  ap.add_argument("--iters", type=int, default=3)
  ap.add_argument("--conv", default="xla,im2col,mixed", help="convolution implementations to compare (model.conv_impl)")
  ap.add_argument("--out", default="benchmarks/results/datm_step.json")
  args = ap.parse_args()
  results = environment(iters=args.iters)
  for shape_name in args.shapes.split(","):
    shape = SHAPES[shape_name]
    for var, conv in [(v, c) for v in args.variants.split(",") for c in args.conv.split(",")]:
      r = bench(shape, unroll=var.startswith("unrolled"), remat=var.endswith("+remat"), iters=args.iters, conv=conv)
      r = {"shape": shape_name, **{k: v for k, v in shape.items()}, **r}
      record(results, r, args.out)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
