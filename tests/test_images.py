"""Image datasets: embedded MNIST-5k and digits, fast failures for missing or corrupt data, ZCA whitening."""
import json
import os
import re

import numpy as np
import pytest

from lmx.datasets import images


def test_mnist5k_split_is_fixed_stratified_and_normalised():
  d = images.get_dataset("mnist5k")
  assert d.x_train_NHWC.shape == (4000, 28, 28, 1) and d.x_test_NHWC.shape == (1000, 28, 28, 1)
  assert (d.per_class_counts() == 400).all()
  assert (np.bincount(d.y_test_N) == 100).all()
  assert d.num_classes == 10 and d.x_train_NHWC.dtype == np.float32
  assert abs(float(d.x_train_NHWC.mean())) < 0.1 and 0.8 < float(d.x_train_NHWC.std()) < 1.2
  d2 = images.get_dataset("mnist5k")
  np.testing.assert_array_equal(d.y_train_N, d2.y_train_N)
  px = d.to_pixels(d.x_train_NHWC[:5])
  assert px.min() >= -1e-4 and px.max() <= 1 + 1e-4


def test_digits_loads():
  d = images.get_dataset("digits")
  assert d.image_shape == (8, 8, 1) and d.num_classes == 10
  assert len(d.y_train_N) + len(d.y_test_N) == 1797 and (np.bincount(d.y_test_N) == 36).all()


def test_unknown_dataset_and_missing_tfds_data_fail_fast(tmp_path):
  with pytest.raises(images.DataError, match="data.dataset"):
    images.get_dataset("imagenet42")
  with pytest.raises(images.DataError, match="no prepared tfds data"):
    images.get_dataset("cifar10", data_dir=str(tmp_path))
  with pytest.raises(images.DataError, match="tiny-imagenet-200"):
    images.get_dataset("tiny_imagenet", data_dir=str(tmp_path))


def test_zca_whitens_to_regularised_identity_and_inverts():
  rng = np.random.default_rng(0)
  mix = rng.standard_normal((12, 12))
  x = (rng.standard_normal((2000, 12)) @ mix).reshape(2000, 2, 2, 3).astype(np.float32) * 0.3
  z = images.fit_zca(x, eps=0.1)
  w = z.apply(x).reshape(2000, -1).astype(np.float64)
  cov = np.cov(w, rowvar=False)
  expected = z.whiten_DD @ np.cov(x.reshape(2000, -1), rowvar=False) @ z.whiten_DD
  np.testing.assert_allclose(cov, expected, atol=1e-4)
  # closed form: eigenvalues of the whitened covariance are S / (S + eps) <= 1
  ev = np.sort(np.linalg.eigvalsh(cov))
  np.testing.assert_allclose(ev, np.sort(z.eigvals_D / (z.eigvals_D + 0.1)), atol=1e-4)
  assert ev.max() <= 1.0
  # with eps -> 0 the covariance is the identity
  z0 = images.fit_zca(x, eps=1e-8)
  np.testing.assert_allclose(np.cov(z0.apply(x).reshape(2000, -1), rowvar=False), np.eye(12), atol=1e-3)
  np.testing.assert_allclose(z.invert(z.apply(x)), x, atol=1e-4)


def test_zca_on_digits_dataset():
  d = images.get_dataset("digits", zca=True)
  assert d.zca is not None
  flat = d.x_train_NHWC.reshape(len(d.x_train_NHWC), -1)
  assert np.abs(flat.mean(0)).max() < 1e-4
  assert np.cov(flat, rowvar=False).diagonal().max() <= 1.0 + 1e-3


def _mnist_version_dir(root) -> str:
  """``<root>/mnist/<version>``: the directory tfds.builder reads dataset_info.json from (version from tfds)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return os.path.join(str(root), "mnist", str(tfds.builder_cls("mnist").VERSION))


@pytest.mark.parametrize("content", [b'{"name": "mni', b"\xff\xfe\x00garbage\x80", b"", b'{"unknownField": 1}', b"{}"],
                         ids=["truncated", "binary", "empty", "unknown_field", "no_version"])
def test_corrupt_tfds_dataset_info_is_a_data_error_naming_the_dir(tmp_path, content):
  """A prepared-looking tfds dir whose dataset_info.json is corrupt: one-line DataError naming the dir and the fix,
  no protobuf/json traceback (offline: nothing is downloaded)."""
  vdir = _mnist_version_dir(tmp_path)
  os.makedirs(vdir)
  with open(os.path.join(vdir, "dataset_info.json"), "wb") as f:
    f.write(content)
  with pytest.raises(images.DataError) as e:
    images.get_dataset("mnist", data_dir=str(tmp_path))
  msg = str(e.value)
  assert vdir in msg and f"delete {vdir}" in msg and "tfds build mnist" in msg and "\n" not in msg
  assert e.value.__cause__ is None and e.value.__suppress_context__


@pytest.mark.parametrize("records", [None, [b"garbage0", b"garbage1", b"garbage2"]], ids=["missing_shard", "garbage"])
def test_unreadable_tfds_records_are_a_data_error_naming_the_dir(tmp_path, records):
  """A valid dataset_info.json (array_record, 3 train examples) whose shard is missing or holds garbage records."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  vdir = _mnist_version_dir(tmp_path)
  builder = tfds.builder("mnist", data_dir=str(tmp_path))  # nothing prepared yet: the metadata of the code
  os.makedirs(vdir)
  builder.info.write_to_directory(vdir)
  path = os.path.join(vdir, "dataset_info.json")
  with open(path) as f:
    info = json.load(f)
  info.update(fileFormat="array_record", splits=[{"name": "train", "shardLengths": ["3"], "numBytes": "30"},
                                                 {"name": "test", "shardLengths": ["2"], "numBytes": "20"}])
  with open(path, "w") as f:
    json.dump(info, f)
  if records is not None:
    from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
    w = array_record_module.ArrayRecordWriter(os.path.join(vdir, "mnist-train.array_record-00000-of-00001"),
                                              "group_size:1")
    for r in records:
      w.write(r)
    w.close()
  with pytest.raises(images.DataError, match=re.escape(f"delete {vdir} and prepare it again")) as e:
    images.get_dataset("mnist", data_dir=str(tmp_path))
  assert "\n" not in str(e.value)


def test_to_pixels_undoes_zca_on_a_dataset():
  """The distilled-image PNGs go through to_pixels: with ZCA on it must give back the [0, 1] pixels."""
  raw = images.load_digits()[0]
  d = images.get_dataset("digits", zca=True)
  assert not np.allclose(d.x_train_NHWC, raw, atol=0.05)  # whitening changed the images
  np.testing.assert_allclose(d.to_pixels(d.x_train_NHWC), raw, atol=1e-4)
