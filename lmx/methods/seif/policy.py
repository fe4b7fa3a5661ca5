"""Tiny byte-level LM policies for SEIF's two roles: encoding, the SFT and GRPO steps of the loop, sampling.

One :class:`Policy` per role shape holds the built transformer, its sampler (jitted once per process) and a
``compile_cache`` for :class:`lmx.core.loop.Loop`: every SFT and GRPO stage of a role is its own loop (own
checkpoints, own progress bar) but reuses the role's compiled step, so the many short GRPO stages of a run (one
per variant, seed, round and role) compile their update once.

The GRPO step (:meth:`Policy.grpo_step`) is one jitted update over the fixed-size rollout batch of a training step
(:func:`lmx.rl.update.minibatch_update`, ``grpo.minibatches`` minibatches as a scan) of the loss
:func:`lmx.rl.rollout.policy_loss_fn` (clipped PPO with dual clip, KL to the frozen reference
``frozen["ref_params"]``, token-mean). Its randomness (the minibatch order) comes from the batch's named stream,
not from the loop's seed, so one compiled step serves every seed.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lmx.core import interrupt, loop, stages
from lmx.core.mesh import replicated
from lmx.core.optim import make_optimizer
from lmx.datasets import text
from lmx.models.generate import left_pad
from lmx.models.registry import Model, build_model
from lmx.rl import rollout
from lmx.rl.advantages import grpo_advantages
from lmx.rl.losses import agg_loss
from lmx.rl.update import minibatch_update

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


def grpo_batch(gen_out: dict, rewards_B, group_size: int) -> tuple[dict, np.ndarray]:
  """The GRPO rollout buffer of one sampling call (rows grouped by prompt, ``group_size`` consecutive rows per
  prompt; NumPy, with an all-ones row ``mask``) and the advantages: ``(R − mean_g R)/(std_g R + 1e-6)`` with the
  unbiased std."""
  adv_B = grpo_advantages(jnp.asarray(rewards_B, jnp.float32), group_size)
  keys = ("tokens", "new_tokens", "mask", "sequence_mask", "logprobs")
  rows = rollout.completion_batch({k: gen_out[k] for k in keys}, advantages_B=adv_B)
  rows = {k: np.asarray(v) for k, v in rows.items()}
  rows["mask"] = np.ones((rows["tokens_BT"].shape[0],), np.float32)
  return rows, np.asarray(adv_B)


def with_batch_stats(update):
  """The loop step of a rollout update ``update(state, frozen, buffer, key) -> (state, metrics)`` for batches
  ``{"rows": buffer, "stats": {name: scalar}, "key": key data}``: the update with the batch's key, then the
  batch's scalars written to row ``state["step"]`` of ``state["stats"]`` (names in sorted order) and returned
  with the update's metrics."""

  def step(state, frozen, batch, rng):
    del rng
    new, metrics = update(state, frozen, batch["rows"], jax.random.wrap_key_data(batch["key"]))
    stats = batch["stats"]
    row = jnp.stack([jnp.asarray(stats[n], jnp.float32) for n in sorted(stats)])
    return dict(new, stats=state["stats"].at[state["step"]].set(row)), {**metrics, **stats}

  return step


@dataclasses.dataclass
class Policy:
  """A role's model plus its sampler and compiled steps. ``prompt_len`` / ``new_tokens`` fix the sampling
  shapes; ``rl_optim`` is the GRPO optimiser's config block (constant learning rate: one tx for every stage)."""
  model: Model
  prompt_len: int
  new_tokens: int
  rl_optim: dict
  rl_cfg: dict

  def __post_init__(self):
    self.compile_cache: dict = {}
    self._treedef = jax.tree.structure(self.model.abstract_params())
    self._sft_steps: dict = {}
    self._grpo_steps: dict = {}
    self.rl_tx, _ = make_optimizer(self.rl_optim, 1)
    self.mesh = stages.host_mesh()
    self._sample = rollout.sampler(self.model, max_new_tokens=self.new_tokens, temperature=1.0, eos_id=EOS,
                                   pad_id=PAD)

  @classmethod
  def build(cls, model_cfg, *, prompt_len: int, new_tokens: int, rl_optim, rl_cfg: dict) -> "Policy":
    model = build_model(model_cfg)
    if prompt_len + new_tokens > model.cfg.max_seq_len:
      raise ValueError(f"prompt_len {prompt_len} + new_tokens {new_tokens} exceed max_seq_len {model.cfg.max_seq_len}")
    return cls(model, prompt_len, new_tokens, rl_optim, dict(rl_cfg))

  @property
  def max_seq_len(self) -> int:
    return int(self.model.cfg.max_seq_len)

  # -------------------------------------------------------------------------------------------- parameters
  def init_params(self, key):
    return self.model.init(key)

  def pack(self, params) -> list:
    """The parameters as a flat list of host arrays (what a stage saves; the tree has integer keys)."""
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(params))]

  def unpack(self, leaves) -> dict:
    return jax.tree.unflatten(self._treedef, [np.asarray(x) for x in leaves])

  # -------------------------------------------------------------------------------------------- steps
  def sft_step(self, optim, steps: int):
    """``(step_fn, tx)``: next-token NLL on the target tokens with ``make_optimizer(optim, steps)``; the state
    keeps the last step's NLL (``state["nll"]``). One step function per step count (stages of equal length share
    a compilation)."""
    steps = int(steps)
    if steps not in self._sft_steps:
      tx, schedule = make_optimizer(optim, steps)
      apply = self.model.apply

      def sft_loss(params, frozen, batch, rng):
        del frozen, rng
        nll = -agg_loss(rollout.score(apply, params, batch), batch["loss_mask_BT"], "token-mean")
        return nll, {"nll": nll}

      base = loop.optax_step(sft_loss, tx, schedule)

      def step(state, frozen, batch, rng):
        new, metrics = base(state, frozen, batch, rng)
        return dict(new, nll=metrics["nll"]), metrics

      self._sft_steps[steps] = (step, tx)
    return self._sft_steps[steps]

  def grpo_step(self, *, rows: int, minibatches: int):
    """``step(state, frozen, batch, rng)`` for a GRPO stage (:func:`with_batch_stats`): one
    :func:`minibatch_update` over the ``rows`` rollouts of the batch in ``minibatches`` minibatches, the rows
    weighted by the buffer's ``mask``."""
    k = (int(rows), int(minibatches))
    if k not in self._grpo_steps:
      policy_loss = rollout.policy_loss_fn(self.model.apply, **self.rl_cfg)

      def loss_fn(params, frozen, mb, rng):
        return policy_loss(params, frozen, dict(mb, loss_mask_BT=mb["loss_mask_BT"] * mb["mask"][:, None]), rng)

      update = minibatch_update(loss_fn, self.rl_tx, epochs=1, minibatch=-(-k[0] // k[1]))
      self._grpo_steps[k] = with_batch_stats(update)
    return self._grpo_steps[k]

  # -------------------------------------------------------------------------------------------- sampling
  def sample(self, params, prompts: Sequence[str], key, temperature: float) -> dict:
    """Samples one completion per prompt (``temperature`` 0: greedy) -> the generate dict plus ``texts``.
    Runs on the policy's one-device mesh with every input placed there, so the sampler compiles once whether it
    is called from a training stage's batch (inside its loop) or from an evaluation."""
    p_BP, lens_B = encode_prompts(prompts, self.prompt_len)
    temp_B = np.full((len(prompts),), float(temperature), np.float32)
    with jax.set_mesh(self.mesh):
      args = jax.device_put((params, p_BP, lens_B, key, temp_B), replicated(self.mesh))
      out = self._sample(*args)
    new = np.asarray(out["new_tokens"])
    msk = np.asarray(out["mask"])
    out["texts"] = [decode(r[m.astype(bool)]) for r, m in zip(new, msk)]
    return out

  def sample_batched(self, params, prompts: Sequence[str], key, temperature: float, batch: int) -> list[str]:
    """Texts for any number of prompts, in fixed-size calls of ``batch`` (the last one padded); stops between
    calls on Ctrl-C / SIGTERM."""
    texts = []
    params = jax.device_put(params, replicated(self.mesh))
    for i in range(0, len(prompts), batch):
      interrupt.check("while sampling")
      chunk = list(prompts[i:i + batch])
      n = len(chunk)
      chunk += [chunk[-1]] * (batch - n)
      texts += self.sample(params, chunk, jax.random.fold_in(key, i), temperature)["texts"][:n]
    return texts
