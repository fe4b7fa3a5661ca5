r"""Seconds and memory per DATM distillation iteration: rolled ``lax.scan`` vs unrolled, with and without remat,
for XLA's native convolution (the baseline), the im2col convolution and 'mixed' (im2col for the first layer only)
(``model.conv_impl``).

    PYTHONPATH=. python benchmarks/datm_step.py [--shapes=default,cifar] [--conv=xla,im2col,mixed] [--iters=3]
        [--variants=unrolled,scan+remat,scan+remat+hoist] [--rounds=1] [--out=F]

Shapes:
  default  the default config's meta-step (MNIST 28×28×1, ConvNet-3 width 16, IPC 10, batch_syn 50, N 10, DSA)
  default25  the same with N 25 inner steps (the paper's N/M ratio at M = 2; --config.distill.syn_steps=25)
  cifar    CIFAR-shaped (32×32×3, ConvNet-3 width 128, IPC 10 = 100 images, batch_syn 100, N 20, DSA)
  w32_ipc10, w32_ipc1   datm_vs_official.py's configurations A and B (width 32, 1×28×28)

For each: compile seconds, steady-state seconds per iteration (median over ``--rounds`` of the mean of ``--iters``
after one warm-up; with several rounds the configurations take turns), XLA's
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
    # benchmarks/datm_vs_official.py's configurations A and B (width 32 on 1×28×28, all six DSA groups)
    "w32_ipc10": dict(image=(28, 28, 1), width=32, ipc=10, batch_syn=100, syn_steps=20,
                      strategy="color_crop_cutout_flip_scale_rotate"),
    "w32_ipc1": dict(image=(28, 28, 1), width=32, ipc=1, batch_syn=10, syn_steps=10,
                     strategy="color_crop_cutout_flip_scale_rotate"),
}


def make(shape: dict, unroll: bool, remat: bool, conv: str = "auto", hoist: bool = False):
  """``(fn, args)``: one meta-step configuration, ``fn(state, start_params, target_params, key)``, and its
  arguments (synthetic expert snapshots)."""
  key = jax.random.key(0)
  p0 = convnet.init_params(key, shape["image"], 10, depth=3, width=shape["width"])
  p1 = jax.tree.map(lambda a: a + 0.01 * jnp.sign(a), p0)
  n = shape["ipc"] * 10
  syn = {"x": jax.random.normal(key, (n,) + shape["image"]), "y": jnp.zeros((n, 10)),
         "lr": jnp.float32(D.lr_raw_from_value(0.01, "log"))}
  inner = D.InnerSpec(syn_steps=shape["syn_steps"], batch_syn=shape["batch_syn"],
                      dsa_strategy=dsa.parse_strategy(shape["strategy"]), unroll=unroll, remat=remat,
                      hoist_dsa=hoist)
  outer = D.OuterSpec(lr_img=100.0, lr_lr=1e-5, lr_y=2.0, threshold=1e9)
  state = D.init_state(syn, D.make_optimizer(outer, inner))
  apply_fn = convnet.apply_with(conv, second_order=True)
  return (lambda s, a, b, k: D.meta_step(s, a, b, k, inner=inner, outer=outer, apply_fn=apply_fn)), (state, p0, p1,
                                                                                                      key)


def build(shape: dict, unroll: bool, remat: bool, conv: str = "auto", hoist: bool = False) -> dict:
  """Compiles one meta-step configuration and runs it once (warm-up)."""
  fn, (state, p0, p1, key) = make(shape, unroll, remat, conv, hoist)
  t0 = time.time()
  compiled = jax.jit(fn).lower(state, p0, p1, key).compile()
  compile_s = time.time() - t0
  mem = compiled.memory_analysis()
  state, m = compiled(state, p0, p1, key)
  jax.block_until_ready(state)
  return {"compiled": compiled, "args": (state, p0, p1, key), "seconds": [], "loss": float(m["loss"]),
          "info": {"loop": "unrolled" if unroll else "scan", "remat": remat, "hoist_dsa": hoist,
                   "conv": convnet.resolve_conv_impl(conv, second_order=True), "compile_seconds": round(compile_s, 2),
                   "xla_temp_MiB": round(getattr(mem, "temp_size_in_bytes", 0) / 2**20, 1) if mem else None}}


def time_round(b: dict, iters: int) -> None:
  """Appends the mean seconds per iteration of ``iters`` calls to ``b['seconds']``."""
  state, p0, p1, key = b["args"]
  t0 = time.time()
  for i in range(iters):
    state, m = b["compiled"](state, p0, p1, jax.random.fold_in(key, i))
  jax.block_until_ready(state)
  b["seconds"].append((time.time() - t0) / iters)


def summary(b: dict) -> dict:
  dev_peak = None
  try:
    stats = jax.devices()[0].memory_stats() or {}
    dev_peak = stats.get("peak_bytes_in_use")
  except Exception:  # noqa: BLE001
    pass
  sec = sorted(b["seconds"])
  return {**b["info"], "seconds_per_iteration": round(sec[len(sec) // 2], 4),
          "round_seconds": [round(x, 4) for x in b["seconds"]],
          "peak_rss_MiB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
          "device_peak_MiB": round(dev_peak / 2**20, 1) if dev_peak else None, "loss": b["loss"]}


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--shapes", default="default,cifar")
  ap.add_argument("--variants", default="unrolled,unrolled+remat,scan,scan+remat",
                  help="loop[+remat][+hoist]: +hoist augments the N minibatches before the loop (distill.hoist_dsa)")
  ap.add_argument("--iters", type=int, default=3)
  ap.add_argument("--rounds", type=int, default=1, help="timing rounds, the variants' order rotated each round")
  ap.add_argument("--conv", default="xla,im2col,mixed", help="convolution implementations to compare (model.conv_impl)")
  ap.add_argument("--out", default="benchmarks/results/datm_step.json")
  args = ap.parse_args()
  results = environment(iters=args.iters, rounds=args.rounds)
  for shape_name in args.shapes.split(","):
    shape = SHAPES[shape_name]
    built = [build(shape, unroll=v.startswith("unrolled"), remat="+remat" in v, conv=c, hoist="+hoist" in v)
             for v in args.variants.split(",") for c in args.conv.split(",")]
    for r in range(args.rounds):
      k = r % len(built)
      for b in built[k:] + built[:k]:
        time_round(b, args.iters)
    for b in built:
      record(results, {"shape": shape_name, **{k: v for k, v in shape.items()}, **summary(b)}, args.out)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
