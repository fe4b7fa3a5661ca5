r"""Language-model train-step benchmark: tokens/s, compiled vs analytic FLOPs, MFU, attention impl timings.

  python benchmarks/lm_step.py                        # CPU-sized dense + MoE (configs/lm.py default and moe)
  python benchmarks/lm_step.py --size=125m            # accelerator sizes: 125m | 1b | moe_1b7b
  python benchmarks/lm_step.py --size=125m --batch=16 --seq=1024 --out=benchmarks/results/lm_step_gpu.json
  python benchmarks/lm_step.py --size=125m --lower_for=cuda --attention_impl=pallas   # build for GPU on a CPU host

For each model it times the train step users run: the configs/lm.py variant's model from the registry,
``lmx.train.lm.make_step`` (next-token loss + MoE aux losses, the config's AdamW with clipping and schedule)
inside the shared ``lmx.core.loop.Loop`` (step counter, rng, NaN guard), compiled ahead of time by
``Loop.compile`` for a sharded [B, T+1] token batch. It reads ``cost_analysis()["flops"]``, times ``--steps``
steps after warm-up (median, ``block_until_ready``) and reports:

  tokens_per_sec         batch·seq / median step time
  compiled_flops         XLA's count for one step of one device's program, times the number of devices (the
                         work all devices do together, replicated work counted on each)
  analytic_flops_6nd     6·N_active·tokens (N_active: matmul parameters a token touches: attention, the dense
                         FFN or top_k of the experts plus the router, and the unembedding; not the embedding
                         lookup)
  analytic_flops         6·N·D plus attention scores/values, 6·2·B·T²·H·E·L (halved when causal)
  flops_ratio            compiled_flops / analytic_flops (≈1 means no hidden recomputation or waste;
                         > 1 with remat, or for a dropless MoE on backends where ragged_dot runs densely)
  matmul_precision       what the model's matmuls really run in (benchmarks.common.matmul_precision: bf16
                         inputs as bf16; float32 as TF32 on GPUs and one bf16 pass on TPUs under JAX's default
                         precision, true float32 on CPUs); the spec peak is looked up for it
  mfu                    analytic_flops / step time / (devices · spec-sheet peak at that precision); null when the
                         device has no spec entry, e.g. CPU
  of_measured_matmul_peak  analytic_flops / step time / (devices · the FLOP/s of a large square matmul measured
                         on one device in the same run, ``matmul_peak`` at the top of the JSON): meaningful on CPUs
                         too (with fake CPU devices, which share the host's cores, it is a lower bound)
  nonfinite_steps_skipped  steps the loop's NaN guard skipped while timing (0 for a healthy step)

and, for every attention impl available on the backend, forward+backward time at the model's attention
shape. On CPU the Pallas kernel runs in the interpreter (correctness only; its time is not a speed) and cuDNN
is unavailable. GPU numbers are pending until the benchmark runs on an accelerator.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import lm as lm_config  # noqa: E402
from lmx.core import loop, mesh as mesh_lib  # noqa: E402
from lmx.core.config import require  # noqa: E402
from lmx.kernels import attention as attention_lib  # noqa: E402
from lmx.train.lm import make_step  # noqa: E402
from lmx.models.registry import build_model  # noqa: E402
from lmx.models.transformer import TransformerConfig  # noqa: E402
from benchmarks import common  # noqa: E402

def active_params(cfg: TransformerConfig) -> dict:
  """Matmul parameters per token (total and active), by part."""
  d, h, k, e = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim
  attn = d * h * e * 2 + d * k * e * 2
  dense_ffn = 3 * d * cfg.d_ff
  expert = 3 * d * cfg.expert_d_ff
  n_moe = len(cfg.moe_layers)
  n_dense = cfg.n_layers - n_moe
  unembed = d * cfg.vocab_size
  total = cfg.n_layers * attn + n_dense * dense_ffn + n_moe * (cfg.n_experts * expert + d * cfg.n_experts)
  total += unembed + (0 if cfg.tie_embeddings else cfg.vocab_size * d)
  active = cfg.n_layers * attn + n_dense * dense_ffn + n_moe * (cfg.top_k * expert + d * cfg.n_experts) + unembed
  return {"total_matmul_params": int(total), "active_matmul_params": int(active)}


def _timeit(fn, *args, steps: int, warmup: int = 2):
  out = None
  for _ in range(warmup):
    out = fn(*args)
  jax.block_until_ready(out)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    out = fn(*args)
    jax.block_until_ready(out)
    times.append(time.perf_counter() - t0)
  return float(np.median(times)), times


MARKERS = {"cuda": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}  # the Pallas kernels' custom calls


def lower_train_step(c, batch: int, seq: int, platform: str) -> dict:
  """Builds the train step users run for config ``c`` at [batch, seq] on abstract (unallocated) state and lowers
  it for ``platform`` (``cuda`` or ``tpu``) on this host, the attention built for that platform
  (``attention.target_platform``). Reports which attention kernels the StableHLO holds; nothing runs."""
  c.data.update(seq_len=seq, global_batch=batch)
  model = build_model(c.model, axis_rules=c.axis_rules)
  mesh = mesh_lib.make_mesh(c.mesh)
  model.cfg.check_mesh(dict(mesh.shape))
  step_fn, init_fn, shardings = make_step(c, model, mesh)
  workdir = tempfile.mkdtemp(prefix="lm_step_lower_")
  try:
    lp = loop.Loop(step_fn=step_fn, init_fn=init_fn, mesh=mesh, workdir=workdir, total_steps=c.train.steps,
                   seed=c.seed, state_shardings=shardings, config=c)
    tokens = jax.ShapeDtypeStruct((batch, seq + 1), jnp.int32, sharding=mesh_lib.batch_sharding(mesh, c.axis_rules))
    t0 = time.perf_counter()
    with jax.set_mesh(mesh), attention_lib.target_platform(platform):
      text = lp.lower(lp.abstract_state(), tokens, lowering_platforms=(platform,)).as_text()
    seconds = time.perf_counter() - t0
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  return {"platform": platform, "attention_impl": model.cfg.attention_impl, "lower_seconds": round(seconds, 2),
          "stablehlo_chars": len(text), **{f"{k}_kernel_calls": text.count(m) for k, m in MARKERS.items()},
          "all_to_all": text.count("all_to_all")}


def bench_train_step(c, batch: int, seq: int, steps: int, measured_peak: float | None = None) -> dict:
  """Compiles and times the LM train step users run for config ``c`` at [batch, seq] (see the module docstring).

  ``c`` is a configs/lm.py config; its data shape is set to [batch, seq] so the model, mesh and batch checks
  are the ones ``lmx.train.lm`` makes.
  """
  c.data.update(seq_len=seq, global_batch=batch)
  model = build_model(c.model, axis_rules=c.axis_rules)
  cfg = model.cfg
  require(seq <= cfg.max_seq_len, "--seq", f"{seq} exceeds model.max_seq_len={cfg.max_seq_len}")
  mesh = mesh_lib.make_mesh(c.mesh)
  cfg.check_mesh(dict(mesh.shape))
  divisor = mesh_lib.batch_size_divisor(mesh, c.axis_rules)
  require(batch % divisor == 0, "--batch", f"{batch} must be divisible by the batch mesh axes' size {divisor}")
  step_fn, init_fn, shardings = make_step(c, model, mesh)
  workdir = tempfile.mkdtemp(prefix="lm_step_bench_")  # the Loop's checkpoint directory; nothing is saved
  try:
    lp = loop.Loop(step_fn=step_fn, init_fn=init_fn, mesh=mesh, workdir=workdir, total_steps=c.train.steps,
                   seed=c.seed, state_shardings=shardings, config=c)
    state = lp.fresh_state()
    n_params = int(sum(x.size for x in jax.tree.leaves(state["params"])))
    tokens_BT = jax.random.randint(jax.random.key(1), (batch, seq + 1), 0, cfg.vocab_size, dtype=jnp.int32)
    tokens_BT = jax.device_put(tokens_BT, mesh_lib.batch_sharding(mesh, c.axis_rules))
    with jax.set_mesh(mesh):
      t0 = time.perf_counter()
      compiled = lp.compile(state, tokens_BT)
      compile_s = time.perf_counter() - t0
      cost = compiled.cost_analysis()
      cost = cost[0] if isinstance(cost, (list, tuple)) else cost
      compiled_flops = float(cost.get("flops", float("nan"))) * mesh.size if cost else float("nan")
      mem = compiled.memory_analysis()
      holder = {"state": state}  # the step donates its state: keep only the newest

      def run(tokens):
        holder["state"], metrics = compiled(holder["state"], lp.frozen, tokens)
        return metrics

      med, times = _timeit(run, tokens_BT, steps=steps)
      final = jax.device_get(run(tokens_BT))
      guard = jax.device_get(holder["state"]["guard"])
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  n = active_params(cfg)
  n_tok = batch * seq
  flops_6nd = 6.0 * n["active_matmul_params"] * n_tok
  attn_flops = 3 * cfg.n_layers * attention_flops(batch, seq, cfg)  # forward + backward = 3x forward
  analytic = flops_6nd + attn_flops
  precision = common.matmul_precision(cfg.dtype)
  peak = common.spec_peak_flops(jax.devices()[0].device_kind, precision)
  return {
      "timed": "lmx.train.lm.make_step in lmx.core.loop.Loop.compile (NaN guard, config.optim)",
      "params": n_params, **n,
      "batch": batch, "seq": seq, "tokens_per_step": n_tok,
      "compile_seconds": round(compile_s, 2),
      "step_seconds_median": med, "step_seconds": [round(t, 5) for t in times],
      "tokens_per_sec": n_tok / med,
      "compiled_flops": compiled_flops,
      "analytic_flops_6nd": flops_6nd,
      "analytic_flops": analytic,
      "flops_ratio": compiled_flops / analytic if analytic else None,
      "achieved_flops_per_sec": analytic / med,
      "matmul_precision": precision,
      "device_peak_flops": peak,
      "devices": mesh.size,
      "mfu": (analytic / med / (peak * mesh.size)) if peak else None,
      "of_measured_matmul_peak": (analytic / med / (measured_peak * mesh.size)) if measured_peak else None,
      "temp_bytes": getattr(mem, "temp_size_in_bytes", None) if mem else None,
      "argument_bytes": getattr(mem, "argument_size_in_bytes", None) if mem else None,
      "final_loss": float(final["loss"]),
      "nonfinite_steps_skipped": int(guard["bad"]),  # by the loop's NaN guard (0 for a healthy run)
  }


def attention_flops(batch: int, seq: int, cfg: TransformerConfig) -> float:
  """Forward matmul FLOPs of one causal attention layer (QK^T and PV, visible half)."""
  return 4.0 * batch * seq * seq * cfg.n_heads * cfg.head_dim / 2


def bench_attention(cfg: TransformerConfig, batch: int, seq: int, steps: int) -> dict:
  """Forward+backward time of each available attention impl at the model's attention shape."""
  dt = jnp.dtype(cfg.dtype)
  ks = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(ks[0], (batch, seq, cfg.n_heads, cfg.head_dim), dt)
  k = jax.random.normal(ks[1], (batch, seq, cfg.kv_heads, cfg.head_dim), dt)
  v = jax.random.normal(ks[2], (batch, seq, cfg.kv_heads, cfg.head_dim), dt)
  out = {"shape": {"batch": batch, "seq": seq, "heads": cfg.n_heads, "kv_heads": cfg.kv_heads,
                   "head_dim": cfg.head_dim, "dtype": dt.name}}
  q_shape, kv_shape = q.shape, k.shape
  out["auto"] = dict(zip(("chooses", "why"), attention_lib.auto_impl(q_shape, kv_shape, dt, causal=True)))
  ref = None
  for impl in attention_lib.available_impls(dt):
    def loss(q, k, v, impl=impl):
      return jnp.sum(attention_lib.attention(q, k, v, causal=True, impl=impl).astype(jnp.float32) ** 2)
    fwd = jax.jit(lambda q, k, v, impl=impl: attention_lib.attention(q, k, v, causal=True, impl=impl))
    fwd_bwd = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    interpret = impl == "pallas" and jax.default_backend() == "cpu"
    n = 1 if interpret else steps
    try:
      t_f, _ = _timeit(fwd, q, k, v, steps=n, warmup=1)
      t_fb, _ = _timeit(fwd_bwd, q, k, v, steps=n, warmup=1)
      o = fwd(q, k, v).astype(jnp.float32)
      ref = o if ref is None else ref
      out[impl] = {"fwd_seconds": t_f, "fwd_bwd_seconds": t_fb,
                   "max_abs_diff_vs_xla": float(jnp.max(jnp.abs(o - ref))),
                   "note": "Pallas interpreter on CPU: correctness only, not a speed" if interpret else ""}
    except Exception as err:  # an impl that cannot run here is reported, not fatal
      out[impl] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
  return out


# size -> (name, configs/lm.py variant, model overrides)
SIZES = {
    "cpu": (("dense", "", {}), ("moe", "moe", {}), ("moe_ragged", "moe", {"moe_impl": "ragged"})),
    "125m": (("125m", "125m", {}),),
    "1b": (("1b", "1b", {}),),
    "moe_1b7b": (("moe_1b7b", "moe_1b7b", {}), ("moe_1b7b_tiled", "moe_1b7b", {"moe_impl": "tiled"})),
}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--size", default="cpu", choices=sorted(SIZES))
  ap.add_argument("--batch", type=int, default=0, help="default: 8 on CPU, else 8")
  ap.add_argument("--seq", type=int, default=0, help="default: 128 on CPU, else the config's data.seq_len")
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--attention_impl", default="", help="override model.attention_impl (default: the config's)")
  ap.add_argument("--skip_attention", action="store_true")
  ap.add_argument("--lower_for", default="", choices=("", "cuda", "tpu"),
                  help="do not run: lower each model's train step for this platform on this host (abstract state) "
                       "and report the attention kernels in it")
  ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                "lm_step.json"))
  args = ap.parse_args(argv)
  backend = jax.default_backend()
  results = {
      "backend": backend, "device_kind": jax.devices()[0].device_kind, "num_devices": jax.device_count(),
      "jax": jax.__version__, "python": platform.python_version(), "size": args.size,
      "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "models": {},
  }
  if args.lower_for:
    results["note"] = (f"lowered for {args.lower_for} on a {backend} host, not run: *_kernel_calls count the "
                       "Pallas kernels' custom calls in the StableHLO text (a kernel shared by every layer can "
                       "appear once, in one function)")
  elif backend == "cpu":
    results["note"] = ("CPU run (2 shared cores): tokens/s are CPU numbers, MFU unknown (no spec peak; see "
                       "of_measured_matmul_peak), Pallas runs in the interpreter. GPU numbers are pending: no "
                       "accelerator was available in this "
                       "session; run `python benchmarks/lm_step.py --size=125m` on a GPU.")
  peaks = {}  # dtype -> measured matmul FLOP/s in this run
  for name, variant, overrides in SIZES[args.size]:
    c = lm_config.get_config(variant)
    c.model.update(overrides)
    if args.attention_impl:
      c.model.attention_impl = args.attention_impl
    cfg = build_model(c.model, axis_rules=c.axis_rules).cfg
    batch = args.batch or 8
    seq = args.seq or (128 if args.size == "cpu" else int(c.data.seq_len))
    print(f"[{name}] d_model={cfg.d_model} layers={cfg.n_layers} experts={cfg.n_experts} batch={batch} "
          f"seq={seq} dtype={cfg.dtype} attention={cfg.attention_impl}", flush=True)
    r = {"model": {k: getattr(cfg, k) for k in ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff",
                                                "vocab_size", "dtype", "remat", "attention_impl", "moe_every",
                                                "n_experts", "top_k", "moe_d_ff", "capacity_factor",
                                                "moe_impl")}}
    if cfg.dtype not in peaks and not args.lower_for:
      peaks[cfg.dtype] = common.measured_matmul_peak(cfg.dtype)
      results.setdefault("matmul_peak", {})[cfg.dtype] = peaks[cfg.dtype]
      print(f"  measured matmul peak ({cfg.dtype}): {peaks[cfg.dtype]['flops_per_sec'] / 1e9:.1f} GFLOP/s",
            flush=True)
    if args.lower_for:
      r["lowered"] = lower_train_step(c, batch, seq, args.lower_for)
      print(f"  lowered for {args.lower_for}: {r['lowered']}", flush=True)
      results["models"][name] = r
      continue
    r["train_step"] = bench_train_step(c, batch, seq, args.steps, peaks[cfg.dtype]["flops_per_sec"])
    ts = r["train_step"]
    print(f"  {ts['tokens_per_sec']:.0f} tokens/s, step {ts['step_seconds_median'] * 1e3:.1f} ms, compiled/analytic "
          f"FLOPs {ts['flops_ratio']:.2f}, MFU {ts['mfu']}, of measured matmul peak "
          f"{ts['of_measured_matmul_peak']:.2f}", flush=True)
    if not args.skip_attention and name in ("dense", "125m", "1b"):
      ab = min(batch, 4) if backend == "cpu" else batch
      r["attention"] = bench_attention(cfg, ab, seq, args.steps)
      for impl, v in r["attention"].items():
        if impl not in ("shape", "auto"):
          print(f"  attention {impl}: {v}", flush=True)
    results["models"][name] = r
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(results, f, indent=2)
  print(f"wrote {args.out}")
  return results


if __name__ == "__main__":
  main()
