"""Image datasets: embedded MNIST-5k and digits, fast failures for missing data, ZCA whitening."""
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
