"""The LM validation split: whole documents held out at random, so validation text is distributed like training
text (issue 13: the old tail split held out an ASCII table)."""
import numpy as np
import pytest

from lmx.core.config import ConfigError
from lmx.datasets import text


def _byte_hist(src) -> np.ndarray:
  t = src.tokens[src.tokens < 256]
  h = np.bincount(t, minlength=256).astype(np.float64)
  return h / h.sum()


def test_hand_made_documents_split_whole_and_disjoint():
  docs = [(f"d{i}", chr(ord("a") + i) * 10) for i in range(8)]  # 8 documents of 10 characters
  train, held = text.split_documents(docs, 0.25, seed=0)
  assert len(held) == 2 and len(train) == 6  # 20 of 80 characters: the target exactly, two whole documents
  assert {k for k, _ in train} | {k for k, _ in held} == {k for k, _ in docs}
  assert not {k for k, _ in train} & {k for k, _ in held}
  assert [k for k, _ in train] == sorted(k for k, _ in train)  # corpus order kept on both sides
  # the same seed, the same split; another seed draws other documents
  assert text.split_documents(docs, 0.25, seed=0) == (train, held)
  assert any(text.split_documents(docs, 0.25, seed=s)[1] != held for s in range(1, 6))


def test_a_document_longer_than_twice_the_target_is_never_held_out():
  docs = [("big", "x" * 100)] + [(f"s{i}", "y" * 5) for i in range(10)]  # 150 characters, target 15
  for seed in range(10):
    train, held = text.split_documents(docs, 0.1, seed=seed)
    assert "big" in {k for k, _ in train}
    assert 15 <= sum(len(t) for _, t in held) <= 30


def test_too_small_a_fraction_is_a_config_error():
  with pytest.raises(ConfigError, match="eval_fraction"):
    text.split_documents([("a", "x" * 10), ("b", "y" * 10)], 0.01, seed=0)
  with pytest.raises(ConfigError, match="data.split"):
    text.train_eval_windows("python_docs", 64, 0.05, split="random")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_document_split_validation_bytes_are_distributed_like_training_bytes(seed):
  """Total-variation distance between the byte distributions of train and validation text: the document split
  is far closer than the tail split (0.156 on python_docs), and every held-out topic is absent from training."""
  tr, ev, info = text.train_eval_windows("python_docs", 128, 0.05, split="document", seed=seed)
  tr_tail, ev_tail, _ = text.train_eval_windows("python_docs", 128, 0.05, split="tail")
  tv = 0.5 * np.abs(_byte_hist(tr) - _byte_hist(ev)).sum()
  tv_tail = 0.5 * np.abs(_byte_hist(tr_tail) - _byte_hist(ev_tail)).sum()
  assert tv_tail > 0.15
  assert tv < 0.6 * tv_tail, (tv, tv_tail)
  assert 0.05 <= info["eval_fraction_actual"] <= 0.1
  topics = dict(text.python_docs_documents())
  train_text = text.decode(tr.tokens)
  for k in info["eval_document_ids"]:
    assert topics[k][:200] not in train_text
  assert info["train_documents"] + info["eval_documents"] == len(topics)
