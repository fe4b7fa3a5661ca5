"""The tfds text source: a real prepared ArrayRecord data set (a tiny builder defined here), packing against a
numpy reference, checkpointed position, and the fail-fast errors of a missing data set."""

import numpy as np
import pytest

from lmx.datasets import images, text, tfds_text

DOCS = {"train": ["alpha beta", "gamma", "delta epsilon zeta", "eta theta", "iota"],
        "validation": ["kappa lambda mu", "nu xi"]}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  tfds = pytest.importorskip("tensorflow_datasets")

  class LmxTinyText(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {s: self._generate_examples(s) for s in DOCS}

    def _generate_examples(self, split):
      for i, t in enumerate(DOCS[split]):
        yield i, {"text": t}

  data_dir = str(tmp_path_factory.mktemp("tfds"))
  LmxTinyText(data_dir=data_dir, file_format="array_record").download_and_prepare()
  return data_dir


def _reference_stream(docs, order):
  return np.concatenate([text.encode(docs[i], eos=True) for i in order])


def test_packed_windows_concatenate_the_shuffled_documents(prepared):
  src = tfds_text.open_source("lmx_tiny_text", "train", data_dir=prepared)
  stored = [tfds_text._as_text(src[i]["text"]) for i in range(len(src))]
  assert sorted(stored) == sorted(DOCS["train"])
  seq = 5
  ds = tfds_text.packed_windows(src, seq_len=seq, global_batch=2, seed=3, tokenize=tfds_text.byte_tokenize,
                                process_index=0, process_count=1)
  it = iter(ds)
  got = np.concatenate([next(it) for _ in range(4)])  # 8 windows of 6 tokens: more than one epoch
  assert got.shape == (8, seq + 1) and got.dtype == np.int32
  # reference: the epoch orders of grain's seeded shuffle, documents framed by EOS, concatenated, cut every 6
  import grain
  order = list(grain.MapDataset.source(list(range(len(src)))).shuffle(seed=3).repeat(3)[:3 * len(src)])
  ref = np.concatenate([text.encode(stored[i], eos=True) for i in order])
  np.testing.assert_array_equal(got.reshape(-1), ref[: got.size])
  assert order[:5] != order[5:10]  # reshuffled each epoch


def test_packed_windows_resume_from_iterator_state(prepared):
  src = tfds_text.open_source("lmx_tiny_text", "train", data_dir=prepared)
  ds = tfds_text.packed_windows(src, seq_len=4, global_batch=2, seed=0, tokenize=tfds_text.byte_tokenize,
                                process_index=0, process_count=1)
  it = iter(ds)
  for _ in range(3):
    next(it)
  state = it.get_state()
  want = [next(it) for _ in range(3)]
  it2 = iter(ds)
  it2.set_state(state)
  for w in want:
    np.testing.assert_array_equal(next(it2), w)


def test_processes_read_disjoint_documents(prepared):
  src = tfds_text.open_source("lmx_tiny_text", "train", data_dir=prepared)
  seen = []
  for pi in range(2):
    ds = tfds_text.packed_windows(src, seq_len=200, global_batch=2, seed=1, tokenize=tfds_text.byte_tokenize,
                                  num_epochs=1, process_index=pi, process_count=2)
    toks = np.concatenate([b.reshape(-1) for b in ds])
    assert toks[-1] == text.PAD  # the padded tail of the finite stream
    seen.append({w for w in "".join(chr(t) if t < 256 else " " for t in toks).split()})
  assert seen[0] and seen[1] and not (seen[0] & seen[1])
  assert seen[0] | seen[1] == {w for d in DOCS["train"] for w in d.split()}


def test_eval_windows_are_the_stored_order_full_windows_only(prepared):
  src = tfds_text.open_source("lmx_tiny_text", "validation", data_dir=prepared)
  got = tfds_text.eval_windows(src, seq_len=4, n_windows=10, tokenize=tfds_text.byte_tokenize)
  stored = [tfds_text._as_text(src[i]["text"]) for i in range(len(src))]
  ref = np.concatenate([text.encode(t, eos=True) for t in stored])
  n = len(ref) // 5
  np.testing.assert_array_equal(got, ref[: n * 5].reshape(n, 5))


def test_missing_data_set_fails_at_once_naming_the_fix(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  with pytest.raises(images.DataError, match="no prepared tfds data") as e:
    tfds_text.open_source("lm1b", "train", data_dir=str(tmp_path))
  assert "tfds build lm1b" in str(e.value) and "\n" not in str(e.value)
  with pytest.raises(images.DataError, match="could not set it up"):
    tfds_text.open_source("no_such_text_set_xyz", "train", data_dir=str(tmp_path))


def test_let_reads_a_tfds_text_source(prepared):
  """configs/let.py with data.source='tfds': the student's batches and validation windows come from the set."""
  import jax

  from lmx.core import mesh as mesh_lib
  from lmx.core.config import ConfigError, load_config_file
  from lmx.methods.let import driver as let_run

  c = load_config_file("configs/let.py:smoke")
  c.data.update(source="tfds", tfds_name="lmx_tiny_text", data_dir=prepared, seq_len=8, global_batch=8)
  with pytest.raises(ConfigError, match="teacher.source"):  # a 'pretrain' teacher would need the embedded corpus
    let_run.run(c, "/nonexistent/let-tfds")
  mesh = mesh_lib.make_mesh(c.mesh)
  bsh = mesh_lib.batch_sharding(mesh, c.axis_rules)
  batches, eval_np, info = let_run.make_data(c, bsh, 3, vocab_size=260)
  b = next(batches)
  assert isinstance(b, jax.Array) and b.shape == (8, 9)
  words = {w for d in DOCS["train"] for w in d.split()}
  got = "".join(chr(t) if t < 256 else " " for t in np.asarray(b).reshape(-1)).split()
  assert set(got[1:-1]) <= words  # interior words are whole training words (the ends may be cut)
  # 3 asked for; the validation split holds 16 + 6 = 22 tokens: 2 full windows of 9
  assert eval_np.shape == (2, 9) and info["split"] == "tfds" and info["eval_windows"] == 2
