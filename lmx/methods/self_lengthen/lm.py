"""The LM side of Self-Lengthen: prompt formats, SFT batches and step, bucketed cached sampling.

Formats (byte tokenizer of :mod:`lmx.datasets.text`; every sequence starts with BOS, a response ends with EOS):
  Generator   ``Topic: {topic}\\n[Length: {constraint}\\n]Text:\\n`` → response
  Extender    ``Topic: {topic}\\nOutline:\\n{outline}\\nEnriched:\\n`` → enriched text (stage 1: outline = the
              first half; stage 2: outline = the whole text, the prompt followed by stage 1's kept part F, which
              the Extender continues as a raw completion)
"""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import optax

from lmx.core import loop
from lmx.datasets import text as text_lib
from lmx.models import generate as gen_lib

BOS, EOS, PAD = text_lib.BOS, text_lib.EOS, text_lib.PAD


def gen_prompt(topic: str, constraint: str | None = None) -> str:
  """The Generator's prompt text (optionally with a length constraint line)."""
  return f"Topic: {topic}\n" + (f"Length: {constraint}\n" if constraint else "") + "Text:\n"


def ext_prompt(topic: str, outline: str) -> str:
  """The Extender's prompt text (the paper's extend template, reduced to its fields)."""
  return f"Topic: {topic}\nOutline:\n{outline}\nEnriched:\n"


def encode_prompt(prompt: str) -> list[int]:
  return [BOS] + text_lib.encode(prompt).tolist()


def encode_pair(prompt: str, response: str):
  """``(ids, n_prompt)``: BOS + prompt bytes + response bytes + EOS; the loss covers the response and EOS."""
  p = encode_prompt(prompt)
  return p + text_lib.encode(response).tolist() + [EOS], len(p)


def sft_arrays(pairs, length: int):
  """Right-padded ``tokens_BT`` (int32 [N, length]) and ``loss_mask_BT`` (float32: 1 on the positions of
  response tokens and EOS, as targets). Pairs longer than ``length`` raise ValueError."""
  n = len(pairs)
  tok = np.full((n, length), PAD, np.int32)
  mask = np.zeros((n, length), np.float32)
  for i, (prompt, response) in enumerate(pairs):
    ids, np_ = encode_pair(prompt, response)
    if len(ids) > length:
      raise ValueError(f"SFT example of {len(ids)} tokens exceeds the sequence length {length}")
    tok[i, :len(ids)] = ids
    mask[i, np_:len(ids)] = 1.0
  return tok, mask


def sft_loss(apply_fn):
  """``loss(params, frozen, batch, rng) -> (loss, metrics)``: next-token cross-entropy averaged over the
  batch's response tokens (``loss_mask_BT`` marks target positions)."""

  def loss_fn(params, frozen, batch, rng):
    del frozen, rng
    tok_BT, m_BT = batch["tokens_BT"], batch["loss_mask_BT"]
    logits_BTV = apply_fn(params, tok_BT[:, :-1]).astype(jnp.float32)
    logp_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)
    nll_BT = -jnp.take_along_axis(logp_BTV, tok_BT[:, 1:, None], axis=-1)[..., 0]
    m = m_BT[:, 1:]
    ce = jnp.sum(nll_BT * m) / jnp.maximum(jnp.sum(m), 1.0)
    return ce, {"ce": ce, "tokens": jnp.sum(m)}

  return loss_fn


def make_tx(optim_cfg):
  """AdamW with the learning rate as a hyperparameter in the optimiser state (``inject_hyperparams``), so one
  compiled step serves every SFT run's schedule; global-norm clipping first."""
  opt = optax.inject_hyperparams(optax.adamw)(learning_rate=float(optim_cfg.lr), b1=optim_cfg.b1, b2=optim_cfg.b2,
                                              weight_decay=optim_cfg.weight_decay)
  return optax.chain(optax.clip_by_global_norm(optim_cfg.clip_norm), opt)


def set_lr(opt_state, lr: float):
  """The optimiser state with its injected learning rate set to ``lr``."""
  opt_state[1].hyperparams["learning_rate"] = jnp.asarray(lr, jnp.float32)
  return opt_state


def cosine_lr(step: int, total: int, lr: float, warmup_ratio: float, min_ratio: float = 0.0) -> float:
  """Linear warmup over ``round(warmup_ratio·total)`` steps, then cosine to ``lr·min_ratio`` at ``total``."""
  w = int(round(warmup_ratio * total))
  if step < w:
    return lr * (step + 1) / w
  frac = (step - w) / max(1, total - w)
  return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + np.cos(np.pi * min(frac, 1.0))))


class SFT:
  """One compiled SFT step per sequence length, shared by every training run of both roles."""

  def __init__(self, model, optim_cfg, *, batch: int):
    self.model, self.optim, self.batch = model, optim_cfg, batch
    self.tx = make_tx(optim_cfg)
    step = loop.optax_step(sft_loss(model.apply), self.tx)
    self._step = jax.jit(lambda state, batch: step(state, None, batch, jax.random.key(0)), donate_argnums=0)
    self._init = jax.jit(self.tx.init)

  def train(self, params, pairs, *, length: int, epochs: float, rng: np.random.Generator, warmup_ratio: float,
            lr: float | None = None):
    """Fine-tunes a copy of ``params`` on ``pairs`` for ``epochs`` passes (shuffled, batches of ``batch``
    drawn without replacement and wrapping around), fresh AdamW state, warmup + cosine to 0 from ``lr``
    (default: the optimiser config's). Returns
    ``(params, {"steps", "first_ce", "last_ce", "examples"})``."""
    tok, mask = sft_arrays(pairs, length)
    n = len(pairs)
    steps = max(1, int(np.ceil(epochs * n / self.batch)))
    order = np.concatenate([rng.permutation(n) for _ in range(int(np.ceil(steps * self.batch / n)) + 1)])
    state = {"params": jax.tree.map(lambda x: x + 0, params), "opt_state": self._init(params)}
    ces = []
    for s in range(steps):
      idx = order[s * self.batch:(s + 1) * self.batch]
      state["opt_state"] = set_lr(state["opt_state"], cosine_lr(s, steps, lr or self.optim.lr, warmup_ratio))
      state, m = self._step(state, {"tokens_BT": jnp.asarray(tok[idx]), "loss_mask_BT": jnp.asarray(mask[idx])})
      ces.append(m["ce"])
    ces = [float(c) for c in ces]
    return state["params"], {"steps": steps, "examples": n, "first_ce": ces[0], "last_ce": float(np.mean(ces[-5:]))}


class Sampler:
  """Cached sampling (:func:`lmx.models.generate.make_generate_fn`) in fixed shapes: batches of ``batch`` rows
  (the last padded with copies), prompts left-padded to the smallest of ``prompt_buckets`` that holds them."""

  def __init__(self, model, *, batch: int, prompt_buckets, max_new_tokens: int, temperature: float, top_k: int,
               top_p: float):
    self.model, self.batch, self.buckets = model, batch, sorted(int(b) for b in prompt_buckets)
    self.max_new = max_new_tokens
    self.sampling = gen_lib.SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                           top_p=top_p, eos_id=EOS, pad_id=PAD)
    self.fn = gen_lib.make_generate_fn(model.graphdef, self.sampling)

  def bucket(self, n: int) -> int:
    for b in self.buckets:
      if n <= b:
        return b
    raise ValueError(f"a prompt of {n} tokens exceeds the largest prompt bucket {self.buckets[-1]}")

  def __call__(self, params, prompts: list[list[int]], key) -> tuple[list[str], np.ndarray]:
    """Texts (decoded up to EOS; invalid UTF-8 dropped) and ``done`` flags (EOS emitted within
    ``max_new_tokens``)."""
    texts, done = [], []
    for start in range(0, len(prompts), self.batch):
      chunk = prompts[start:start + self.batch]
      real = len(chunk)
      chunk = chunk + [chunk[-1]] * (self.batch - real)
      p_BP, l_B = gen_lib.left_pad(chunk, pad_id=PAD, length=self.bucket(max(len(c) for c in chunk)))
      out = self.fn(params, jnp.asarray(p_BP), jnp.asarray(l_B), jax.random.fold_in(key, start))
      new = np.asarray(out["new_tokens"])[:real]
      # bytes that are not valid UTF-8 are dropped (not replaced by U+FFFD, which would re-encode to 3 bytes)
      texts += [text_lib.decode(row).replace("\ufffd", "") for row in new]
      done += np.asarray(out["done"])[:real].tolist()
    return texts, np.asarray(done, bool)
