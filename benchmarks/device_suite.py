r"""One accelerator call: everything lmx wants measured on a GPU, in one process, one JSON.

  python benchmarks/device_suite.py --out=benchmarks/results/device_suite_h100.json   # on the GPU machine, < 8 min
  python benchmarks/device_suite.py --dry                                              # CPU host: lower for cuda

Items (each timed after compilation and one warm-up call, median of ``--steps`` calls, ``block_until_ready``):

  attention   causal attention forward and forward+backward at [8, 2048, 12 heads, 64] bfloat16 for every impl
              the backend has (Pallas flash attention, cuDNN, XLA), each checked against XLA's output
              (``max_abs_diff_vs_xla``) and its gradients (``max_abs_grad_diff_vs_xla``)
  lm_125m     the ``configs/lm.py:125m`` train step users run (``benchmarks/lm_step.py``'s measurement: tokens/s,
              analytic and compiled FLOPs, MFU against the spec sheet and against a matmul measured here)
  smollm2     SmolLM2-135M's shapes (``lmx.models.gguf.SMOLLM2_135M``; random bfloat16 weights: speed does not depend
              on their values, and the machine needs no wheel): greedy KV-cache decoding at batch 16 (prompt 128,
              128 new tokens) and the LoRA train step of ``configs/lm.py:smollm2_lora`` at 8 × 512 tokens
  datm_w128   DATM's meta-step at the paper's CIFAR shape (``benchmarks/datm_step.py`` "cifar": ConvNet width 128,
              IPC 10, N = 20 inner steps, DSA): seconds per iteration and XLA's temp memory

``--dry`` builds the same programs from shapes alone and lowers each for ``--platform`` (default cuda) on this host
(nothing runs; attention impls that need a GPU are built for it by ``attention.target_platform``): the JSON lists
what lowered and the size of each program. ``tests/test_benchmarks.py`` runs it, so the script is ready the day a
GPU is at hand. ``--items`` picks a subset.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from benchmarks import common  # noqa: E402
from lmx.kernels import attention as attention_lib  # noqa: E402

ITEMS = ("attention", "lm_125m", "smollm2", "datm_w128")
ATTN = dict(batch=8, seq=2048, heads=12, head_dim=64)
DECODE = dict(batch=16, prompt=128, new=128)
LORA = dict(batch=8, seq=512, rank=8, alpha=16.0)


def _median_seconds(fn, steps: int) -> tuple[float, list[float]]:
  jax.block_until_ready(fn())  # warm-up
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times), times


def _lower(fn, args, platform: str) -> dict:
  t0 = time.perf_counter()
  with attention_lib.target_platform(platform):
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
  return {"lowered_for": platform, "stablehlo_chars": len(text), "lower_seconds": round(time.perf_counter() - t0, 2),
          "pallas_kernel_calls": text.count("__gpu$xla.gpu.triton") + text.count("tpu_custom_call"),
          "cudnn_calls": text.count("cudnn")}


# ---------------------------------------------------------------------------------------------------- attention

def attention_programs(impls, dtype=jnp.bfloat16):
  b, t, h, e = ATTN["batch"], ATTN["seq"], ATTN["heads"], ATTN["head_dim"]
  shape = jax.ShapeDtypeStruct((b, t, h, e), dtype)
  out = {}
  for impl in impls:
    def fwd(q, k, v, impl=impl):
      return attention_lib.attention(q, k, v, causal=True, impl=impl)

    def fwd_bwd(q, k, v, fwd=fwd):
      loss = lambda q, k, v: jnp.sum(fwd(q, k, v).astype(jnp.float32) ** 2)  # noqa: E731
      return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)

    out[impl] = {"fwd": (fwd, (shape, shape, shape)), "fwd_bwd": (fwd_bwd, (shape, shape, shape))}
  return out


def attention_item(dry: bool, platform: str, steps: int) -> dict:
  if dry:  # cuDNN's attention is only traceable where cuDNN is detected: it is measured on the GPU only
    progs = attention_programs(("pallas", "xla"))
    out = {impl: {k: _lower(fn, args, platform) for k, (fn, args) in p.items()} for impl, p in progs.items()}
    return {**out, "cudnn": {"note": "not lowerable on a host without cuDNN; timed on the GPU"}}
  impls = attention_lib.available_impls(jnp.bfloat16)
  progs = attention_programs(impls)
  ks = jax.random.split(jax.random.key(0), 3)
  b, t, h, e = ATTN["batch"], ATTN["seq"], ATTN["heads"], ATTN["head_dim"]
  q, k, v = (jax.random.normal(kk, (b, t, h, e), jnp.bfloat16) for kk in ks)
  ref = {n: jax.jit(fn)(q, k, v) for n, (fn, _) in progs["xla"].items()} if "xla" in progs else None
  out = {"shape": dict(ATTN, dtype="bfloat16")}
  flops = 4.0 * b * t * t * h * e / 2  # QK^T and PV, causal half
  for impl, p in progs.items():
    try:
      f, fb = jax.jit(p["fwd"][0]), jax.jit(p["fwd_bwd"][0])
      t_f, _ = _median_seconds(lambda: f(q, k, v), steps)
      t_fb, _ = _median_seconds(lambda: fb(q, k, v), steps)
      rec = {"fwd_seconds": t_f, "fwd_bwd_seconds": t_fb, "fwd_tflops": flops / t_f / 1e12,
             "fwd_bwd_tflops": 3.5 * flops / t_fb / 1e12}  # flash backward ≈ 2.5 forward matmuls
      if ref is not None:
        o = f(q, k, v).astype(jnp.float32)
        rec["max_abs_diff_vs_xla"] = float(jnp.max(jnp.abs(o - ref["fwd"].astype(jnp.float32))))
        g, g_ref = fb(q, k, v)[1], ref["fwd_bwd"][1]
        rec["max_abs_grad_diff_vs_xla"] = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - r.astype(jnp.float32))))
                                              for a, r in zip(g, g_ref))
      out[impl] = rec
    except Exception as err:  # an impl that cannot run here is reported, not fatal
      out[impl] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
  return out


# ---------------------------------------------------------------------------------------------------- LM 125m

def lm_item(dry: bool, platform: str, steps: int) -> dict:
  from benchmarks import lm_step
  from lmx.core.config import load_config_file

  c = load_config_file(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                                    "lm.py") + ":125m")
  batch, seq = 16, 1024
  if dry:  # the Pallas kernel where "auto" would pick cuDNN (not lowerable without cuDNN)
    c.model.attention_impl = "pallas"
    return lm_step.lower_train_step(c, batch, seq, platform)
  peak = common.measured_matmul_peak("bfloat16")
  return {"matmul_peak": peak, **lm_step.bench_train_step(c, batch, seq, steps, measured_peak=peak["flops_per_sec"])}


# ---------------------------------------------------------------------------------------------------- SmolLM2

def smollm2_programs(attention_impl: str = "auto"):
  """``(decode_fn, decode_args, lora_fn, lora_args, (model, ft, tx))``: abstract args (ShapeDtypeStructs) for
  bfloat16 SmolLM2-135M shapes."""
  from lmx.core import loop
  from lmx.models import finetune, generate as gen, gguf, registry
  from lmx.models.transformer import TransformerConfig
  from lmx.train.lm import lm_loss

  cfg = TransformerConfig(**gguf.SMOLLM2_135M, dtype="bfloat16", param_dtype="bfloat16",
                          attention_impl=attention_impl)
  model = registry.transformer_model(cfg, name="smollm2-135m")
  params = model.abstract_params()
  sample = gen.make_generate_fn(model.graphdef, gen.SamplingConfig(max_new_tokens=DECODE["new"], temperature=0.0))
  b, p = DECODE["batch"], DECODE["prompt"]
  decode_args = (params, jax.ShapeDtypeStruct((b, p), jnp.int32), jax.ShapeDtypeStruct((b,), jnp.int32),
                 jax.random.key(0))
  ft = finetune.Finetune(n_layers=cfg.n_layers, lora_rank=LORA["rank"], lora_alpha=LORA["alpha"])
  tx = optax.adamw(5e-4)
  step = loop.optax_step(lm_loss(model, ft), tx)
  adapters = ft.abstract_trainable(params)
  state = {"params": adapters, "opt_state": jax.eval_shape(tx.init, adapters)}
  lora_args = (state, params, jax.ShapeDtypeStruct((LORA["batch"], LORA["seq"] + 1), jnp.int32), jax.random.key(0))
  return sample, decode_args, step, lora_args, (model, ft, tx)


def smollm2_item(dry: bool, platform: str, steps: int) -> dict:
  # dry: the Pallas kernel where "auto" would pick cuDNN (not lowerable without cuDNN); on the GPU: "auto"
  sample, decode_args, step, lora_args, (model, ft, tx) = smollm2_programs("pallas" if dry else "auto")
  if dry:
    return {"attention_impl": "pallas", "decode_b16": _lower(sample, decode_args, platform),
            "lora_step": _lower(step, lora_args, platform)}
  params = jax.jit(model.init)(jax.random.key(0))
  prompt = jax.random.randint(jax.random.key(1), (DECODE["batch"], DECODE["prompt"]), 3, 49152)
  lens = jnp.full((DECODE["batch"],), DECODE["prompt"], jnp.int32)
  t_dec, _ = _median_seconds(lambda: sample(params, prompt, lens, jax.random.key(0))["tokens"], steps)
  adapters = ft.init_adapters(jax.random.key(2), model.abstract_params())
  holder = {"s": {"params": adapters, "opt_state": tx.init(adapters)}}
  tokens = jax.random.randint(jax.random.key(3), (LORA["batch"], LORA["seq"] + 1), 3, 49152)
  lora = jax.jit(step, donate_argnums=0)

  def run():
    holder["s"], m = lora(holder["s"], params, tokens, jax.random.key(0))
    return m["loss"]

  t_lora, _ = _median_seconds(run, steps)
  return {"decode_b16": {**DECODE, "seconds": t_dec, "new_tokens_per_sec": DECODE["batch"] * DECODE["new"] / t_dec},
          "lora_step": {**LORA, "seconds": t_lora, "tokens_per_sec": LORA["batch"] * LORA["seq"] / t_lora,
                        "loss": float(run())}}


# ---------------------------------------------------------------------------------------------------- DATM

def datm_programs():
  from benchmarks.datm_step import SHAPES, make

  fn, args = make(SHAPES["cifar"], unroll=False, remat=True, hoist=True)
  return fn, args, SHAPES["cifar"]


def datm_item(dry: bool, platform: str, steps: int) -> dict:
  fn, args, shape = datm_programs()
  if dry:
    return {"shape": str(shape), **_lower(fn, args, platform)}
  compiled = jax.jit(fn).lower(*args).compile()
  mem = compiled.memory_analysis()
  holder = {"s": args[0]}

  def run():
    holder["s"], m = compiled(holder["s"], args[1], args[2], args[3])
    return m["loss"]

  sec, _ = _median_seconds(run, steps)
  return {"shape": str(shape), "seconds_per_iteration": sec,
          "xla_temp_MiB": round(getattr(mem, "temp_size_in_bytes", 0) / 2**20, 1) if mem else None}


RUN = {"attention": attention_item, "lm_125m": lm_item, "smollm2": smollm2_item, "datm_w128": datm_item}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--dry", action="store_true", help="lower every program for --platform; run nothing")
  ap.add_argument("--platform", default="cuda", help="--dry: the platform to lower for (cuda | tpu)")
  ap.add_argument("--items", default=",".join(ITEMS))
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--out", default="")
  a = ap.parse_args(argv)
  items = [i for i in a.items.split(",") if i]
  unknown = sorted(set(items) - set(ITEMS))
  if unknown:
    print(f"error: --items: unknown {unknown}; valid: {list(ITEMS)}", file=sys.stderr)
    return 2
  out = a.out or os.path.join(tempfile.gettempdir(), "device_suite.json")
  results = common.environment(mode="dry" if a.dry else "run", platform=a.platform if a.dry else jax.default_backend(),
                               devices=[d.device_kind for d in jax.devices()])
  for item in items:
    t0 = time.perf_counter()
    try:
      rec = RUN[item](a.dry, a.platform, a.steps)
      rec = {"item": item, "ok": True, **rec}
    except Exception as err:  # one failing item does not cost the others
      rec = {"item": item, "ok": False, "error": f"{type(err).__name__}: {str(err)[:1000]}"}
    rec["wall_seconds"] = round(time.perf_counter() - t0, 1)
    common.record(results, rec, out)
  print(f"wrote {out}")
  return 0 if all(r["ok"] for r in results["runs"]) else 1


if __name__ == "__main__":
  sys.exit(main())
