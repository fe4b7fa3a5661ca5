"""The language policy: a tiny causal transformer (lmx's LM core) that scores candidate commands.

A step's input is the prompt (the quest text, the room, the last commands) and ``K`` candidate commands: the
game's admissible commands plus distractors that are *not* executable now (the game's other walkthrough
commands, the four moves), so the policy can choose invalid actions and SPA's grounding signal means something.
Each candidate ``c`` is scored by the LM as ``Σ_t log p(c_t | prompt, c_<t)`` (the command's log-likelihood under
the LM, EOS included); the policy is the softmax of the scores over the ``K`` candidates:
``π(c | s) ∝ exp(score(c))``. The value head reads the backbone's final hidden state at the prompt's last token,
the progress estimator (:mod:`.progress`) the hidden state (or logits) at the chosen command's last token
(the step's end).

Tokens: words hashed into ``vocab_size − 4`` buckets (crc32, stable across runs and machines), after four
specials. Held-out games bring new object names; hashing gives them ids without an unknown token.
"""
from __future__ import annotations

import re
import zlib

import jax
import jax.numpy as jnp
import numpy as np

PAD, SEP, BAR, EOS = 0, 1, 2, 3
N_SPECIAL = 4
_WORD = re.compile(r"[a-z0-9']+")
MOVES = ("go north", "go south", "go east", "go west")


def words(text: str) -> list[str]:
  return _WORD.findall(str(text).lower())


def encode_words(text: str, vocab_size: int) -> list[int]:
  """Hashed word ids in ``[N_SPECIAL, vocab_size)``."""
  n = vocab_size - N_SPECIAL
  return [N_SPECIAL + zlib.crc32(w.encode()) % n for w in words(text)]


STOPWORDS = frozenset(
    "a an the of to in on at and then that this is it its if you your i me my be is are was for with from by "
    "so as all off first after okay like could would should will can need do does there here how what once "
    "step objective task today good got over handled winner stop sure make ensure assure doublecheck check "
    "see look try attempt just not too much trouble within inside".split())


def strip_objective(objective: str) -> str:
  """The quest text without TextWorld's greeting sentences (those naming TextWorld) and without filler words
  (:data:`STOPWORDS`), so that an 8-step quest fits a short prompt."""
  sents = re.split(r"(?<=[.!?])\s+", str(objective))
  kept = " ".join(s for s in sents if "textworld" not in s.lower())
  return " ".join(w for w in words(kept) if w not in STOPWORDS)


def prompt_ids(objective: str, room: str, history: list[str], *, vocab_size: int, objective_len: int,
               history_len: int) -> list[int]:
  """``objective | room | last commands >`` as ids (objective cut to ``objective_len`` words, history to its
  last ``history_len`` words)."""
  hist = encode_words(" ; ".join(history), vocab_size)[-history_len:] if history_len else []
  return (encode_words(strip_objective(objective), vocab_size)[:objective_len] + [BAR]
          + encode_words(room, vocab_size) + [BAR] + hist + [SEP])


def candidates(admissible: list[str], walkthrough: list[str], *, k: int, rng: np.random.Generator,
               must: str | None = None) -> list[str]:
  """Up to ``k`` candidate commands, shuffled: ``must`` (the expert's, when given), admissible ones, then
  distractors (walkthrough commands and moves not admissible now), admissible first when over ``k``."""
  adm = list(dict.fromkeys(admissible))
  dis = [c for c in dict.fromkeys(list(walkthrough) + list(MOVES)) if c not in adm]
  rng.shuffle(adm)
  rng.shuffle(dis)
  n_dis = min(len(dis), max(k // 4, k - len(adm)))
  out = ([must] if must else []) + [c for c in adm if c != must]
  out = out[:k - n_dis] + dis[:n_dis]
  out = out[:k]
  order = rng.permutation(len(out))
  return [out[i] for i in order]


def step_arrays(prompt: list[int], cands: list[str], *, k: int, length: int, cand_len: int, vocab_size: int):
  """One step as fixed-shape arrays: ``tokens_KL`` (prompt + candidate + EOS, right-padded), ``cand_mask_KL``
  (positions of candidate tokens, scored), ``end_K`` (each candidate's last token: the step's end),
  ``prompt_end`` (the SEP index) and ``valid_K`` (a real candidate)."""
  p = prompt[-(length - cand_len - 1):]
  tokens = np.zeros((k, length), np.int32)
  cmask = np.zeros((k, length), np.float32)
  end = np.zeros((k,), np.int32)
  valid = np.zeros((k,), np.bool_)
  for i, c in enumerate(cands[:k]):
    ids = (encode_words(c, vocab_size)[:cand_len] + [EOS])
    seq = p + ids
    tokens[i, :len(seq)] = seq
    cmask[i, len(p):len(seq)] = 1.0
    end[i] = len(seq) - 1
    valid[i] = True
  return tokens, cmask, end, np.int32(len(p) - 1), valid


def forward(apply_fn, params, tokens_NL):
  """Token log-probs ``logp_NL`` (position t scores token t given tokens < t; 0 at t = 0), the final hidden
  state ``h_NLD`` and logits ``logits_NLV``."""
  logits, hiddens = apply_fn(params, tokens_NL, hidden_layers=(-1,))
  logp_all = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  tok = jnp.take_along_axis(logp_all, tokens_NL[:, 1:, None], axis=-1)[..., 0]
  logp_NL = jnp.pad(tok, ((0, 0), (1, 0)))
  return logp_NL, hiddens["final"], logits


def candidate_scores(apply_fn, params, tokens_MKL, cand_mask_MKL, valid_MK, *, temperature: float = 1.0):
  """Policy logits over candidates ``[M, K]`` (−1e9 where no candidate) and the backbone's outputs
  (``h_MKLD``, ``logits_MKLV``)."""
  m, k, l = tokens_MKL.shape
  logp_NL, h_NLD, logits_NLV = forward(apply_fn, params, tokens_MKL.reshape(m * k, l))
  score = jnp.sum(logp_NL * cand_mask_MKL.reshape(m * k, l), axis=1).reshape(m, k) / temperature
  logits_MK = jnp.where(valid_MK, score, -1e9)
  return logits_MK, h_NLD.reshape(m, k, l, -1), logits_NLV.reshape(m, k, l, -1)


def value_head_init(key, d_model: int):
  return {"w": jnp.zeros((d_model,)), "b": jnp.zeros(())}


def gather_positions(x_MKLD, k_M, pos_M):
  """``x[m, k_M[m], pos_M[m]]`` → ``[M, D]``."""
  rows = jnp.arange(x_MKLD.shape[0])
  return x_MKLD[rows, k_M, pos_M]
