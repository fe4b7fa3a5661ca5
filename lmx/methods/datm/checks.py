"""Early checks of a DATM config: every error names the field and the fix (no JAX work is done here)."""
from __future__ import annotations

import os

from lmx.core import schema
from lmx.core.config import ConfigError, check_choice, require
from lmx.datasets.images import DATASETS
from lmx.methods.datm.dsa import parse_strategy
from lmx.methods.datm.experts import BUFFER_FILE, META_FILE

# Training images in the smallest class, for datasets whose size is known without loading them: mnist5k and digits
# as lmx.datasets.images splits them (digits: class 8 has 138 of its 174 images in the train split; a test checks
# both against the loaded data), the tfds/Tiny ImageNet ones from the published train splits (MNIST: digit 5).
TRAIN_PER_CLASS = {"mnist5k": 400, "digits": 138, "mnist": 5421, "fashion_mnist": 6000, "cifar10": 5000,
                   "cifar100": 500, "tiny_imagenet": 500}


def validate(c, for_run: bool = True) -> None:
  """Raises ConfigError for out-of-range or inconsistent settings: each field against its declaration in
  ``configs/datm.py`` (:func:`lmx.core.schema.validate`), then what relates fields or needs the dataset registry,
  the DSA parser or the file system.

  ``for_run``: the config is about to run (the launcher's check), so the 'evaluate' variant must name its
  ``synthetic`` file and ``experts.dir``/``synthetic`` must exist; ``for_run=False`` checks a config whose paths
  come later (from the command line).
  """
  schema.validate(c)
  check_choice(c.data.dataset, "data.dataset", DATASETS)
  try:
    parse_strategy(c.data.dsa_strategy)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  e, d = c.experts, c.distill
  per_class = TRAIN_PER_CLASS.get(c.data.dataset)
  if per_class is not None:
    require(d.ipc <= per_class, "distill.ipc",
            f"{d.ipc} images per class requested but {c.data.dataset} has only {per_class} training images "
            "in its smallest class; lower distill.ipc")
  require(d.spike_factor == 0 or d.spike_factor > 1, "distill.spike_factor",
          f"{d.spike_factor}: use 0 (off) or a factor > 1 (e.g. 10)")
  require(0 < d.lr_min < d.lr_init < d.lr_max, "distill.lr_init",
          f"need 0 < lr_min ({d.lr_min}) < lr_init ({d.lr_init}) < lr_max ({d.lr_max})")
  require(0 <= d.min_start_epoch < d.max_start_epoch, "distill.max_start_epoch",
          f"the window [min_start_epoch={d.min_start_epoch}, max_start_epoch={d.max_start_epoch}) is empty")
  if d.sequential:
    require(d.min_start_epoch < d.current_max_start_epoch <= d.max_start_epoch, "distill.current_max_start_epoch",
            f"{d.current_max_start_epoch} must lie in (min_start_epoch, max_start_epoch]")
  need = d.max_start_epoch - 1 + d.expert_epochs
  require(need <= e.epochs, "experts.epochs",
          f"{e.epochs} epochs, but the last start epoch {d.max_start_epoch - 1} + expert_epochs {d.expert_epochs} "
          f"needs {need}; raise experts.epochs or lower distill.max_start_epoch")
  require(d.soft_labels or not d.learn_labels, "distill.learn_labels",
          "hard labels (soft_labels=False) cannot be learned; set learn_labels=False")
  if for_run and c.variant == "evaluate":
    require(bool(c.synthetic), "synthetic",
            "the evaluate variant needs the synthetic set to evaluate: --config.synthetic=/path/to/synthetic.npz "
            "(as a DATM run writes it: x, y, lr, labels)")
  if for_run and c.experts.dir:  # here, before the launcher makes the workdir; what the buffer holds is read later
    where = f"{c.experts.dir!r}"
    require(os.path.isdir(c.experts.dir), "experts.dir",
            f"{where} is not a directory; point it at the experts/ folder of a DATM run (it holds buffer.npz and "
            "meta.json) or leave experts.dir empty to train new experts")
    lacking = [f for f in (BUFFER_FILE, META_FILE) if not os.path.isfile(os.path.join(c.experts.dir, f))]
    require(not lacking, "experts.dir", f"{where} holds no expert buffer (no {' or '.join(lacking)}); point it at "
            "the experts/ folder of a DATM run or leave experts.dir empty to train new experts")
  if for_run and c.synthetic:
    require(os.path.isfile(c.synthetic), "synthetic", f"{c.synthetic!r}: no such file; name a synthetic.npz that "
            "a DATM run wrote (<workdir>/synthetic.npz or best_synthetic.npz)")
