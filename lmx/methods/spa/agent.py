"""Playing TextWorld games with the candidate-scoring policy: expert (walkthrough) data for SFT, batched
rollouts (sampled at a temperature or greedy) with fixed-shape step arrays, and the environment-step count."""
from __future__ import annotations

import dataclasses

import numpy as np

from lmx.core import interrupt
from lmx.core.metrics import progress
from lmx.envs import textworld as tw
from lmx.methods.spa import policy


@dataclasses.dataclass(frozen=True)
class Shapes:
  """Static shapes: ``k`` candidates per step, ``length`` tokens per (prompt + candidate), ``cand_len`` words
  per candidate, ``max_steps`` per episode, and the prompt's objective / history word budgets."""
  k: int
  length: int
  cand_len: int
  max_steps: int
  objective_len: int
  history_len: int
  vocab_size: int


class EnvPool:
  """Lazily opened environments, one per (game path, copy), reused across episodes."""

  def __init__(self, max_steps: int):
    self.max_steps = max_steps
    self._envs: dict = {}

  def get(self, path: str, copy: int) -> tw.TextWorldEnv:
    key = (path, copy)
    if key not in self._envs:
      self._envs[key] = tw.TextWorldEnv(path, max_steps=self.max_steps)
    return self._envs[key]

  def close(self):
    for e in self._envs.values():
      e.close()
    self._envs.clear()


def _step_input(obs: tw.Obs, history: list[str], walkthrough: list[str], shp: Shapes, rng, must=None):
  cands = policy.candidates(obs.admissible, walkthrough, k=shp.k, rng=rng, must=must)
  prompt = policy.prompt_ids(obs.objective, obs.room, history, vocab_size=shp.vocab_size,
                             objective_len=shp.objective_len, history_len=shp.history_len)
  arrs = policy.step_arrays(prompt, cands, k=shp.k, length=shp.length, cand_len=shp.cand_len,
                            vocab_size=shp.vocab_size)
  return cands, arrs


def expert_data(paths, pool: EnvPool, shp: Shapes, rng: np.random.Generator, copies: int = 1):
  """SFT examples from each game's walkthrough: per step the arrays of :func:`policy.step_arrays` and the
  expert candidate's index. ``copies`` draws that many candidate sets per step."""
  cols = {k: [] for k in ("tokens", "cand_mask", "end", "prompt_end", "valid", "action")}
  for path in paths:
    for _ in range(copies):
      env = pool.get(path, 0)
      obs = env.reset()
      hist: list[str] = []
      for cmd in env.walkthrough:
        cands, (tok, cm, end, pe, val) = _step_input(obs, hist, env.walkthrough, shp, rng, must=cmd)
        for k, v in zip(("tokens", "cand_mask", "end", "prompt_end", "valid"), (tok, cm, end, pe, val)):
          cols[k].append(v)
        cols["action"].append(cands.index(cmd))
        obs, _, done, _ = env.step(cmd)
        hist.append(cmd)
        if done:
          break
  return {k: np.stack(v) for k, v in cols.items()}


def rollout(act_fn, params, paths, copies: int, pool: EnvPool, shp: Shapes, rng: np.random.Generator, key, *,
            greedy: bool, batch: int, keep_text: bool = False, desc: str | None = None):
  """Plays one episode per (game, copy) with ``batch`` environments stepped in lockstep.

  ``act_fn(params, tokens_BKL, cand_mask_BKL, valid_BK, prompt_end_B, key, greedy) -> (action_B, logp_B,
  value_B)`` is the jitted policy. Returns arrays ``[E, T, ...]`` (``E`` = len(paths)·copies episodes, ``T`` =
  ``max_steps``): tokens, cand_mask, valid, end, prompt_end, action, logp, value, step_mask, invalid, progress;
  ``reward_E`` (0/1), ``won_E``, ``env_steps`` and, with ``keep_text``, each episode's (command, feedback) list.
  ``desc`` names a progress bar over the episodes (none when None). A Ctrl-C/SIGTERM stops it after the current
  environment step (:func:`lmx.core.interrupt.check`).
  """
  import jax
  jobs = [(p, c) for p in paths for c in range(copies)]
  E, T, K, L = len(jobs), shp.max_steps, shp.k, shp.length
  out = dict(tokens=np.zeros((E, T, K, L), np.int32), cand_mask=np.zeros((E, T, K, L), np.float32),
             valid=np.zeros((E, T, K), np.bool_), end=np.zeros((E, T, K), np.int32),
             prompt_end=np.zeros((E, T), np.int32), action=np.zeros((E, T), np.int32),
             logp=np.zeros((E, T), np.float32), value=np.zeros((E, T), np.float32),
             step_mask=np.zeros((E, T), np.float32), invalid=np.zeros((E, T), np.float32),
             progress=np.zeros((E, T), np.float32), reward=np.zeros((E,), np.float32),
             won=np.zeros((E,), np.float32))
  texts = [[] for _ in range(E)]
  env_steps = 0
  bar = progress(E, desc=desc) if desc else None
  for start in range(0, E, batch):
    idx = list(range(start, min(start + batch, E)))
    envs = [pool.get(*jobs[i]) for i in idx]
    obs = [e.reset() for e in envs]
    hist = [[] for _ in idx]
    active = [True] * len(idx)
    for t in range(T):
      if not any(active):
        break
      interrupt.check(f"in {desc or 'a rollout'}")
      tok = np.zeros((batch, K, L), np.int32)
      cm = np.zeros((batch, K, L), np.float32)
      val = np.zeros((batch, K), np.bool_)
      pe = np.zeros((batch,), np.int32)
      cand_lists = [None] * len(idx)
      val[:, 0] = True  # padding rows: one dummy candidate keeps the softmax finite
      for j, i in enumerate(idx):
        if not active[j]:
          continue
        cands, (a, b, c, d, v) = _step_input(obs[j], hist[j], envs[j].walkthrough, shp, rng)
        cand_lists[j] = cands
        tok[j], cm[j], val[j], pe[j] = a, b, v, d
        out["tokens"][i, t], out["cand_mask"][i, t], out["valid"][i, t], out["end"][i, t] = a, b, v, c
        out["prompt_end"][i, t] = d
      key, sub = jax.random.split(key)
      act, logp, value = (np.asarray(x) for x in act_fn(params, tok, cm, val, pe, sub, greedy))
      for j, i in enumerate(idx):
        if not active[j]:
          continue
        cmd = cand_lists[j][int(act[j])]
        o, r, done, info = envs[j].step(cmd)
        env_steps += 1
        out["action"][i, t], out["logp"][i, t], out["value"][i, t] = act[j], logp[j], value[j]
        out["step_mask"][i, t] = 1.0
        out["invalid"][i, t] = float(info.invalid)
        out["progress"][i, t] = float(info.progress)
        if keep_text:
          texts[i].append((cmd, o.feedback[:160], bool(info.invalid), bool(info.progress)))
        hist[j].append(cmd)
        obs[j] = o
        if done:
          active[j] = False
          out["reward"][i] = r
          out["won"][i] = float(info.won)
    if bar is not None:
      bar.update(len(idx))
  if bar is not None:
    bar.close()
  out["env_steps"] = env_steps
  if keep_text:
    out["texts"] = texts
    out["objectives"] = [pool.get(*j).state_obs.objective for j in jobs]
  return out
