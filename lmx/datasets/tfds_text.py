"""Text corpora from prepared tensorflow-datasets (ArrayRecord), tokenized and packed into training windows.

The paper-scale LM variants (``data.source='tfds'``) read a text data set the way the image methods do: through
``tfds.data_source`` (random access, no TensorFlow), only when the data has been prepared; a missing or unreadable
data set raises :class:`lmx.datasets.images.DataError` at once, naming the directory and the command that prepares
it. Documents are shuffled by a seed, tokenized (the byte tokenizer, or a Hugging Face ``tokenizer.json``), framed
by EOS and concatenated, then split into windows of ``seq_len + 1`` tokens (Grain's ``ConcatThenSplitIterDataset``),
so no token is padded or dropped. The pipeline is a Grain ``IterDataset``: its iterator state is checkpointed with
the run, and data order is a pure function of (seed, position).
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import grain
import grain.experimental as grain_exp
import numpy as np

from lmx.core import data as data_lib
from lmx.datasets import text
from lmx.datasets.images import DataError, _first_line


def open_source(tfds_name: str, split: str, *, data_dir: Optional[str] = None):
  """``tfds.data_source(tfds_name, split)`` of a prepared ArrayRecord data set; DataError when it is missing or
  cannot be read (one line naming the directory and ``tfds build``), never a download."""
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise DataError(f"data.tfds_name={tfds_name!r} needs tensorflow-datasets ({_first_line(e)}); "
                    "`pip install tensorflow-datasets array-record`, or use data.source='embedded'") from None
  data_dir = os.path.expanduser(data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets")
  build = f"`tfds build {tfds_name} --file_format=array_record --data_dir={data_dir}`"
  try:
    builder = tfds.builder(tfds_name, data_dir=data_dir)
  except Exception as e:  # noqa: BLE001 - unknown name, corrupt dataset_info.json, ...: one line, no traceback
    raise DataError(f"data.tfds_name={tfds_name!r}: tensorflow_datasets could not set it up under {data_dir} "
                    f"({_first_line(e)}); prepare it with {build} or set data.data_dir / TFDS_DATA_DIR") from None
  if not os.path.exists(os.path.join(builder.data_dir, "dataset_info.json")):
    raise DataError(f"data.tfds_name={tfds_name!r}: no prepared tfds data at {builder.data_dir}. Prepare it once "
                    f"with network, e.g. {build}, or set data.data_dir / TFDS_DATA_DIR to where it is (offline "
                    "default: data.source='embedded').")
  try:
    return tfds.data_source(tfds_name, split=split, data_dir=data_dir, download=False)
  except NotImplementedError as e:
    raise DataError(f"data.tfds_name={tfds_name!r}: prepared in a format without random access; rebuild with "
                    f"--file_format=array_record ({_first_line(e)})") from None
  except Exception as e:  # noqa: BLE001 - unknown split, unreadable features.json, missing shards, ...
    raise DataError(f"data.tfds_name={tfds_name!r} split {split!r}: the prepared data in {builder.data_dir} "
                    f"cannot be read ({_first_line(e)}); delete it and prepare it again with {build}") from None


def byte_tokenize(s: str) -> np.ndarray:
  """The byte tokenizer with EOS after each document (the embedded corpora's vocabulary)."""
  return text.encode(s, eos=True)


def hf_tokenize(tokenizer) -> Callable[[str], np.ndarray]:
  """``str -> int32 ids`` with a :class:`lmx.datasets.tokenizer.HFTokenizer`, EOS appended when it has one."""
  eos = tokenizer.eos_id

  def tok(s: str) -> np.ndarray:
    ids = tokenizer.encode(s)
    return np.asarray(list(ids) + ([eos] if eos is not None else []), np.int32)

  return tok


def _as_text(value) -> str:
  return value.decode("utf-8", errors="replace") if isinstance(value, (bytes, np.bytes_)) else str(value)


def packed_windows(source, *, seq_len: int, global_batch: int, seed: int, tokenize: Callable[[str], np.ndarray],
                   text_key: str = "text", num_epochs: Optional[int] = None, process_index: Optional[int] = None,
                   process_count: Optional[int] = None, pad_id: int = text.PAD) -> grain.IterDataset:
  """Per-process batches ``[global_batch / processes, seq_len + 1]`` int32 of packed token windows.

  ``source``: any random-access sequence of records (``record[text_key]`` a string or bytes), e.g.
  :func:`open_source`. Documents are reshuffled every epoch from ``seed``; each process takes every
  ``process_count``-th document of the shuffled stream, so processes never read the same text. With a finite
  ``num_epochs`` the last window is filled with ``pad_id`` after the final document.
  """
  pi, pc = data_lib.process_share(source, global_batch, process_index, process_count)
  ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat(num_epochs)
  ds = ds[pi::pc] if pc > 1 else ds
  ds = ds.map(lambda r: {"tokens": np.asarray(tokenize(_as_text(r[text_key])), np.int32)})
  it = grain_exp.ConcatThenSplitIterDataset(ds.to_iter_dataset(), length_struct={"tokens": seq_len + 1})
  return it.map(lambda r: np.where(r["tokens_segment_ids"] > 0, r["tokens"], pad_id).astype(np.int32)).batch(
      global_batch // pc, drop_remainder=True)


def eval_windows(source, *, seq_len: int, n_windows: int, tokenize: Callable[[str], np.ndarray],
                 text_key: str = "text") -> np.ndarray:
  """The first ``n_windows`` packed windows ``[n, seq_len + 1]`` of ``source`` in its stored order (no shuffle):
  a fixed validation set. Fewer rows when the source is shorter."""
  it = grain_exp.ConcatThenSplitIterDataset(
      grain.MapDataset.source(source).map(
          lambda r: {"tokens": np.asarray(tokenize(_as_text(r[text_key])), np.int32)}).to_iter_dataset(),
      length_struct={"tokens": seq_len + 1})
  rows = []
  for r in it:
    if len(rows) >= n_windows:
      break
    if int(np.sum(r["tokens_segment_ids"] > 0)) == seq_len + 1:  # only full windows (the tail is padded)
      rows.append(r["tokens"])
  return np.stack(rows) if rows else np.zeros((0, seq_len + 1), np.int32)
