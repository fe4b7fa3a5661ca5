"""The continual-pretraining data of each strategy at one token budget, as Grain ``MapDataset`` streams.

Everything is counted in windows of ``seq_len + 1`` tokens (:class:`lmx.datasets.text.TokenWindows`). The budget
is one epoch of the domain's training windows, ``steps = n_domain // global_batch`` steps of ``global_batch``
windows, the same for every strategy:

  full     all domain training windows, one epoch (strategy (a))
  random   a random 1/E of the domain windows (whole documents in a seeded order), E epochs (b)
  hq       the lowest-perplexity 1/E under the general-corpus n-gram LM (whole documents, lowest first), E epochs (c)
  hq_mix   epochs of the hq subset's size mixing ``domain_ratio`` hq windows with ``1 - domain_ratio`` general
           (replay) windows, both drawn afresh every epoch (``resample=True``: the paper's "rate-fixed-data-dynamic";
           ``False``: the same draw every epoch, "data-fixed"), mixed by ``grain.MapDataset.mix`` (d)
  full_mix the replay control (not one of the paper's strategies): ``full``'s windows mixed with general replay at
           the same ``domain_ratio`` (one mixture epoch the size of the whole domain), so (d) − (c) can be told
           apart from what replay alone does

Each epoch is a seeded shuffle of its pool (epoch ``e`` uses ``np_stream(seed, <name>, e)``) and the epochs are
concatenated and cut to exactly ``steps * global_batch`` windows, so the data order is a pure function of
(seed, step) and a Grain iterator's position restores it.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import grain

from lmx.core.config import ConfigError
from lmx.core.rng import np_stream
from lmx.datasets import text

STRATEGIES = ("full", "random", "hq", "hq_mix", "full_mix")


def windows(docs: Sequence[tuple[str, str]], seq_len: int, n: int | None = None) -> text.TokenWindows:
  """The documents joined (``text.DOC_SEP``) as windows, cut to the first ``n`` windows when given."""
  tokens = text.encode(text.DOC_SEP.join(t for _, t in docs))
  if n is not None:
    if (len(tokens) - 1) // seq_len < n:
      raise ConfigError(f"{len(docs)} documents give {(len(tokens) - 1) // seq_len} windows of {seq_len}, "
                        f"fewer than the {n} asked for")
    tokens = tokens[: n * seq_len + 1]
  return text.TokenWindows(tokens, seq_len)


def take_documents(docs: Sequence[tuple[str, str]], order: Sequence[int], n_windows: int,
                   seq_len: int) -> tuple[text.TokenWindows, list[int]]:
  """The documents in ``order`` (indices) until they hold ``n_windows`` windows; the windows (exactly
  ``n_windows``: the last document taken is cut) and the indices taken."""
  taken, chars = [], 0
  for i in order:
    taken.append(int(i))
    chars += len(docs[i][1].encode("utf-8")) + len(text.DOC_SEP)
    if chars > (n_windows + 1) * seq_len + 1:  # enough bytes (byte tokens); checked exactly by windows()
      break
  return windows([docs[i] for i in taken], seq_len, n_windows), taken


def _seed(seed: int, name: str, *ids: int) -> int:
  return int(np_stream(seed, name, *ids).integers(2**31 - 1))


def epochs_stream(pool, n_items: int, *, seed: int, name: str) -> grain.MapDataset:
  """``n_items`` windows: seeded shuffles of ``pool`` (a new order every epoch) one after another."""
  n = len(pool)
  n_epochs = -(-n_items // n)
  src = grain.MapDataset.source(pool)
  parts = [src.shuffle(seed=_seed(seed, name, e)) for e in range(n_epochs)]
  return grain.MapDataset.concatenate(parts)[:n_items]


def mixture_epoch(domain, general, *, domain_ratio: float, epoch_len: int, seed: int, epoch: int,
                  resample: bool = True) -> grain.MapDataset:
  """One mixture epoch of ``epoch_len`` windows: ``round(domain_ratio · epoch_len)`` domain and the rest general
  windows (each a seeded draw without replacement: the draw is epoch ``epoch``'s when ``resample``, epoch 0's
  otherwise), interleaved by ``grain.MapDataset.mix`` at the set weights, then the epoch's order shuffled."""
  n_dom = int(round(domain_ratio * epoch_len))
  n_gen = epoch_len - n_dom
  if n_dom > len(domain) or n_gen > len(general):
    raise ConfigError(f"a mixture epoch needs {n_dom} domain and {n_gen} general windows; the pools hold "
                      f"{len(domain)} and {len(general)}")
  draw = epoch if resample else 0
  parts, weights = [], []
  for pool, n, name, w in ((domain, n_dom, "mix_domain", domain_ratio), (general, n_gen, "mix_general",
                                                                          1.0 - domain_ratio)):
    if n:
      # the first n of a seeded shuffle = a draw of n without replacement; repeat() keeps mix() from stopping
      # one short at the end of the epoch (mix's length is set by the shortest input)
      parts.append(grain.MapDataset.source(pool).shuffle(seed=_seed(seed, name, draw))[:n].repeat())
      weights.append(w)
  mixed = grain.MapDataset.mix(parts, weights)[:epoch_len] if len(parts) > 1 else parts[0][:epoch_len]
  return mixed.shuffle(seed=_seed(seed, "mix_order", epoch))


def mixture_stream(domain, general, n_items: int, *, domain_ratio: float, epoch_len: int, seed: int,
                   resample: bool = True) -> grain.MapDataset:
  """``n_items`` windows of :func:`mixture_epoch` epochs one after another."""
  n_epochs = -(-n_items // epoch_len)
  parts = [mixture_epoch(domain, general, domain_ratio=domain_ratio, epoch_len=epoch_len, seed=seed, epoch=e,
                         resample=resample) for e in range(n_epochs)]
  return grain.MapDataset.concatenate(parts)[:n_items]


@dataclasses.dataclass
class Pools:
  """The window pools every strategy draws from (built once per run)."""
  domain: text.TokenWindows  # all domain training windows
  general: text.TokenWindows  # general training windows (replay)
  hq: text.TokenWindows  # the lowest-perplexity 1/E of the domain windows
  hq_docs: list  # the domain document indices it holds, lowest perplexity first
  domain_docs: Sequence[tuple[str, str]]
  seq_len: int
  epochs: int

  @property
  def subset_windows(self) -> int:
    return len(self.domain) // self.epochs


def budget_steps(pools: Pools, global_batch: int) -> int:
  """The token budget in steps: one epoch of all domain windows (strategy (a))."""
  steps = len(pools.domain) // global_batch
  if steps < 1:
    raise ConfigError(f"data.global_batch={global_batch} is larger than the domain's {len(pools.domain)} windows")
  return steps


def random_subset(pools: Pools, seed: int) -> tuple[text.TokenWindows, list[int]]:
  """Strategy (b)'s pool: whole domain documents in a seeded random order, cut to the hq subset's size."""
  order = np_stream(seed, "random_subset").permutation(len(pools.domain_docs))
  return take_documents(pools.domain_docs, order, pools.subset_windows, pools.seq_len)


def strategy_stream(name: str, pools: Pools, *, steps: int, global_batch: int, seed: int, domain_ratio: float,
                    resample: bool = True) -> tuple[grain.MapDataset, dict]:
  """Strategy ``name``'s ``steps * global_batch`` windows (unbatched) and a description for results.json."""
  n_items = steps * global_batch
  if name == "full":
    pool, info = pools.domain, {}
    ds = epochs_stream(pool, n_items, seed=seed, name="full")
  elif name in ("random", "hq"):
    if name == "random":
      pool, taken = random_subset(pools, seed)
    else:
      pool, taken = pools.hq, pools.hq_docs
    info = {"documents": len(taken)}
    ds = epochs_stream(pool, n_items, seed=seed, name=name)
  elif name in ("hq_mix", "full_mix"):
    pool = pools.hq if name == "hq_mix" else pools.domain
    info = {"documents": len(pools.hq_docs) if name == "hq_mix" else len(pools.domain_docs),
            "domain_ratio": domain_ratio, "resample_each_epoch": resample, "epoch_windows": len(pool)}
    ds = mixture_stream(pool, pools.general, n_items, domain_ratio=domain_ratio, epoch_len=len(pool), seed=seed,
                        resample=resample)
  else:
    raise ConfigError(f"strategies.names: {name!r} is not a strategy; valid: {list(STRATEGIES)}")
  info.update(strategy=name, pool_windows=len(pool), items=n_items, epochs=n_items / len(pool),
              tokens=n_items * pools.seq_len)
  return ds, info


def batched(ds: grain.MapDataset, global_batch: int, *, process_index: int = 0,
            process_count: int = 1) -> grain.MapDataset:
  """Per-process batches of a window stream: global batch ``k`` is items ``[k·B, (k+1)·B)`` on any host count."""
  if process_count > 1:
    ds = ds[process_index::process_count]
  return ds.batch(global_batch // process_count, drop_remainder=True)
