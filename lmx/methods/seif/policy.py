"""Tiny byte-level LM policies for SEIF's two roles: encoding, SFT, sampling and the GRPO step.

One :class:`Policy` per role (Instructor, Follower) holds the built transformer, its jitted SFT and GRPO steps
and its sampler; all are compiled once per process and reused across seeds, rounds and variants (same shapes),
so a rerun of a round costs no compilation. The GRPO step is :func:`lmx.rl.rollout.policy_loss_fn` (clipped PPO
with dual clip, k3 KL to the frozen reference ``frozen["ref_params"]``, token-mean) in
:func:`lmx.core.loop.optax_step`, wrapped by :func:`lmx.core.loop.guarded` (NaN guard, step rng).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lmx.core import loop
from lmx.datasets import text
from lmx.models.generate import left_pad
from lmx.models.registry import Model, build_model
from lmx.rl import rollout
from lmx.rl.advantages import grpo_advantages
from lmx.rl.losses import agg_loss

PAD, BOS, EOS = text.PAD, text.BOS, text.EOS


def encode_prompt(s: str) -> list[int]:
  return [BOS] + list(s.encode("utf-8"))


def encode_prompts(prompts: Sequence[str], length: int) -> tuple[np.ndarray, np.ndarray]:
  """Left-padded ``[B, length]`` prompts (BOS + bytes); a prompt longer than ``length`` keeps its last bytes."""
  ids = [encode_prompt(p)[-length:] for p in prompts]
  return left_pad(ids, PAD, length)


def decode(ids) -> str:
  return text.decode([int(t) for t in ids if int(t) < 256 or int(t) == EOS])


def sft_rows(prompts: Sequence[str], targets: Sequence[str], length: int) -> dict:
  """Right-padded SFT rows ``BOS prompt target EOS``: tokens, segment ids, positions, loss mask on target+EOS
  (a row that does not fit is cut at ``length``, keeping the prompt)."""
  b = len(prompts)
  tokens = np.full((b, length), PAD, np.int32)
  seg = np.zeros((b, length), np.int32)
  mask = np.zeros((b, length), np.float32)
  for i, (p, t) in enumerate(zip(prompts, targets)):
    pi = encode_prompt(p)
    ti = list(t.encode("utf-8")) + [EOS]
    row = (pi + ti)[:length]
    tokens[i, :len(row)] = row
    seg[i, :len(row)] = 1
    mask[i, len(pi):len(row)] = 1.0
  return {"tokens_BT": tokens, "segment_ids_BT": seg, "positions_BT": rollout.positions_from_segments(seg),
          "loss_mask_BT": mask}


def make_tx(optim) -> optax.GradientTransformation:
  """AdamW with global-norm clipping and linear warmup (``optim``: lr, warmup_steps, weight_decay, clip_norm)."""
  sched = optax.linear_schedule(0.0, float(optim.lr), max(1, int(optim.warmup_steps))) \
      if int(optim.warmup_steps) > 0 else float(optim.lr)
  return optax.chain(optax.clip_by_global_norm(float(optim.clip_norm)),
                     optax.adamw(sched, b1=0.9, b2=0.99, weight_decay=float(optim.weight_decay)))


@dataclasses.dataclass
class Policy:
  """A role's model plus its compiled pieces. ``prompt_len`` / ``new_tokens`` fix the sampling shapes."""
  model: Model
  prompt_len: int
  new_tokens: int
  sft_tx: optax.GradientTransformation
  rl_tx: optax.GradientTransformation
  rl_cfg: dict

  def __post_init__(self):
    apply = self.model.apply

    def sft_loss(params, frozen, batch, rng):
      del frozen, rng
      m = batch["loss_mask_BT"]
      nll = -agg_loss(rollout.score(apply, params, batch), m, "token-mean")
      return nll, {"nll": nll}

    self._sft = jax.jit(loop.guarded(loop.optax_step(sft_loss, self.sft_tx), seed=0), donate_argnums=(0,))
    self._grpo = jax.jit(loop.guarded(loop.optax_step(rollout.policy_loss_fn(apply, **self.rl_cfg), self.rl_tx),
                                      seed=0), donate_argnums=(0,))
    self._sample = rollout.sampler(self.model, max_new_tokens=self.new_tokens, temperature=1.0, eos_id=EOS,
                                   pad_id=PAD)

  @classmethod
  def build(cls, model_cfg, *, prompt_len: int, new_tokens: int, sft_optim, rl_optim, rl_cfg: dict) -> "Policy":
    model = build_model(model_cfg)
    if prompt_len + new_tokens > model.cfg.max_seq_len:
      raise ValueError(f"prompt_len {prompt_len} + new_tokens {new_tokens} exceed max_seq_len {model.cfg.max_seq_len}")
    return cls(model, prompt_len, new_tokens, make_tx(sft_optim), make_tx(rl_optim), dict(rl_cfg))

  # -------------------------------------------------------------------------------------------- training state
  def init_state(self, key, tx: str = "sft", params=None) -> dict:
    params = self.model.init(key) if params is None else params
    t = self.sft_tx if tx == "sft" else self.rl_tx
    z = lambda: jnp.zeros((), jnp.int32)  # noqa: E731  (distinct buffers: the state is donated)
    return {"params": params, "opt_state": t.init(params), "step": z(),
            "guard": {"bad": z(), "run": z(), "max_run": z(), "first": jnp.full((), -1, jnp.int32)}}

  def sft_step(self, state, batch):
    return self._sft(state, None, batch)

  def grpo_step(self, state, ref_params, batch):
    return self._grpo(state, {"ref_params": ref_params}, batch)

  # -------------------------------------------------------------------------------------------- sampling
  def sample(self, params, prompts: Sequence[str], key, temperature: float) -> dict:
    """Samples one completion per prompt (``temperature`` 0: greedy) -> the generate dict plus ``texts``."""
    p_BP, lens_B = encode_prompts(prompts, self.prompt_len)
    temp_B = jnp.full((len(prompts),), float(temperature), jnp.float32)
    out = self._sample(params, p_BP, lens_B, key, temp_B)
    new = np.asarray(out["new_tokens"])
    msk = np.asarray(out["mask"])
    out["texts"] = [decode(r[m.astype(bool)]) for r, m in zip(new, msk)]
    return out

  def sample_batched(self, params, prompts: Sequence[str], key, temperature: float, batch: int) -> list[str]:
    """Texts for any number of prompts, in fixed-size calls of ``batch`` (the last one padded)."""
    texts = []
    for i in range(0, len(prompts), batch):
      chunk = list(prompts[i:i + batch])
      n = len(chunk)
      chunk += [chunk[-1]] * (batch - n)
      texts += self.sample(params, chunk, jax.random.fold_in(key, i), temperature)["texts"][:n]
    return texts


def grpo_batch(gen_out: dict, rewards_B, group_size: int) -> tuple[dict, np.ndarray]:
  """The GRPO training batch of one sampling call (rows grouped by prompt, ``group_size`` consecutive rows per
  prompt) and the advantages: ``(R − mean_g R)/(std_g R + 1e-6)`` with the unbiased std."""
  adv_B = grpo_advantages(jnp.asarray(rewards_B, jnp.float32), group_size)
  keys = ("tokens", "new_tokens", "mask", "sequence_mask", "logprobs")
  return rollout.completion_batch({k: gen_out[k] for k in keys}, advantages_B=adv_B), np.asarray(adv_B)


def split_batch(batch: dict, n: int) -> list[dict]:
  """``n`` equal minibatches (rows in order; rows of one group stay together when the group size divides)."""
  b = batch["tokens_BT"].shape[0]
  if b % n:
    raise ValueError(f"batch of {b} rows does not split into {n} minibatches")
  k = b // n
  return [{key: v[i * k:(i + 1) * k] for key, v in batch.items()} for i in range(n)]
