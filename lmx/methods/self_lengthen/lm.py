"""The LM side of Self-Lengthen: prompt formats, SFT data, the SFT stage on the shared loop, bucketed cached
sampling.

Formats (byte tokenizer of :mod:`lmx.datasets.text`; every sequence starts with BOS, a response ends with EOS):
  Generator   ``Topic: {topic}\\n[Length: {constraint}\\n]Text:\\n`` → response
  Extender    ``Topic: {topic}\\nOutline:\\n{outline}\\nEnriched:\\n`` → enriched text (stage 1: outline = the
              first half; stage 2: outline = the whole text, the prompt followed by stage 1's kept part F, which
              the Extender continues as a raw completion)
"""
from __future__ import annotations


import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lmx.core import interrupt, loop, stages
from lmx.core.optim import make_optimizer
from lmx.core.rng import np_stream
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


def sft_optimizer(optim_cfg, total_steps: int, *, warmup_ratio: float, lr: float | None = None):
  """``(tx, schedule)`` of one SFT run from the shared builder (:func:`lmx.core.optim.make_optimizer`): the
  ``optim_cfg`` block with linear warmup over ``round(warmup_ratio · total_steps)`` steps, then cosine to
  ``lr · min_lr_ratio``; ``lr`` (default: the block's) is the bootstrap SFT's own rate."""
  cfg = optim_cfg.to_dict() if hasattr(optim_cfg, "to_dict") else dict(optim_cfg)
  cfg.update(warmup_steps=int(round(warmup_ratio * total_steps)), **({"lr": float(lr)} if lr else {}))
  return make_optimizer(ml_collections.ConfigDict(cfg), total_steps)


def sft_steps(n: int, batch: int, epochs: float) -> int:
  """Steps of ``epochs`` passes over ``n`` examples in batches of ``batch`` (at least one)."""
  return max(1, int(np.ceil(epochs * n / batch)))


def wrapped_epoch_rows(n: int, batch: int, k: int, *, seed: int, name: str) -> np.ndarray:
  """The rows of SFT batch ``k``: the concatenation of epochs, epoch ``e`` the permutation
  ``np_stream(seed, name, e)`` of the ``n`` examples, cut into batches of ``batch`` that run on across epoch
  boundaries (so a set smaller than one batch, as the few accepted extensions of a macro-iteration, still fills
  it). A pure function of (seed, name, k)."""
  pos = np.arange(k * batch, (k + 1) * batch)
  epochs, offset = np.divmod(pos, n)
  perms = {int(e): np_stream(seed, name, int(e)).permutation(n) for e in np.unique(epochs)}
  return np.array([perms[int(e)][o] for e, o in zip(epochs, offset)], np.int64)


def sft_batch_fn(tokens_BT: np.ndarray, loss_mask_BT: np.ndarray, batch: int, *, seed: int, name: str):
  """``batch_fn(step, state)`` for the loop: the :func:`wrapped_epoch_rows` batch of the SFT arrays."""
  n = len(tokens_BT)

  def batch_fn(step, state):
    del state
    rows = wrapped_epoch_rows(n, batch, step, seed=seed, name=name)
    return {"tokens_BT": tokens_BT[rows], "loss_mask_BT": loss_mask_BT[rows]}

  return batch_fn


def sft_step(loss_fn, tx, schedule, total_steps: int, tail: int = 5):
  """The loop's step for SFT (:func:`lmx.core.loop.optax_step`) that also keeps, in the train state, the CE of
  the first step and the mean CE of the last ``min(tail, total_steps)`` steps, so a stage's summary is read
  from its (checkpointed) state and does not depend on where a run was interrupted."""
  inner = loop.optax_step(loss_fn, tx, schedule)
  k = min(int(tail), int(total_steps))

  def step(state, frozen, batch, rng):
    new, metrics = inner(state, frozen, batch, rng)
    ce, s = metrics["ce"], state["step"]
    new["ce"] = {"first": jnp.where(s == 0, ce, state["ce"]["first"]),
                 "last": state["ce"]["last"] + jnp.where(s >= total_steps - k, ce / k, 0.0)}
    return new, metrics

  return step


def train_sft(workdir: str, name: str, *, model, params, pairs, length: int, steps: int, optim_cfg,
              warmup_ratio: float, batch: int, seed: int, writer, lr: float | None = None):
  """Fine-tunes a copy of ``params`` on ``pairs`` for ``steps`` steps as the training stage ``name`` of
  ``workdir`` (:func:`lmx.core.stages.train`: checkpoints, resume, NaN guard, progress bar, scalars under
  ``<name>/``), fresh AdamW state from :func:`sft_optimizer`, batches from :func:`sft_batch_fn` under the
  stream ``name``. Returns ``(params, {"steps", "examples", "lr", "first_ce", "last_ce"})``."""
  tok, mask = sft_arrays(pairs, length)
  tx, schedule = sft_optimizer(optim_cfg, steps, warmup_ratio=warmup_ratio, lr=lr)
  zero = jnp.zeros((), jnp.float32)

  def init_fn(key):
    del key
    p = jax.tree.map(jnp.asarray, params)
    return {**loop.optax_state(p, tx), "ce": {"first": zero, "last": zero}}

  res = stages.train(workdir, name, writer=writer, total_steps=steps, seed=seed,
                     step_fn=sft_step(sft_loss(model.apply), tx, schedule, steps), init_fn=init_fn,
                     batch_fn=sft_batch_fn(tok, mask, batch, seed=seed, name=name))
  ce = jax.tree.map(lambda x: float(loop.host(x)), res.state["ce"])
  return res.state["params"], {"steps": int(steps), "examples": len(pairs), "lr": float(lr or optim_cfg.lr),
                               "first_ce": ce["first"], "last_ce": ce["last"]}


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

  def __call__(self, params, prompts: list[list[int]], key, *, bar=None) -> tuple[list[str], np.ndarray]:
    """Texts (decoded up to EOS; invalid UTF-8 dropped) and ``done`` flags (EOS emitted within
    ``max_new_tokens``). Checks for Ctrl-C / SIGTERM before every batch; ``bar`` (a progress bar) advances by
    the rows sampled."""
    texts, done = [], []
    for start in range(0, len(prompts), self.batch):
      interrupt.check("while sampling")
      chunk = prompts[start:start + self.batch]
      real = len(chunk)
      chunk = chunk + [chunk[-1]] * (self.batch - real)
      p_BP, l_B = gen_lib.left_pad(chunk, pad_id=PAD, length=self.bucket(max(len(c) for c in chunk)))
      out = self.fn(params, jnp.asarray(p_BP), jnp.asarray(l_B), jax.random.fold_in(key, start))
      new = np.asarray(out["new_tokens"])[:real]
      # bytes that are not valid UTF-8 are dropped (not replaced by U+FFFD, which would re-encode to 3 bytes)
      texts += [text_lib.decode(row).replace("\ufffd", "") for row in new]
      done += np.asarray(out["done"])[:real].tolist()
      if bar is not None:
        bar.update(real)
    return texts, np.asarray(done, bool)
