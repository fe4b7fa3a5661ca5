"""Early checks of a DATM config: every error names the field and the fix (no JAX work is done here)."""
from __future__ import annotations

import os

from lmx.core.config import ConfigError, check_choice, non_negative, positive, require
from lmx.datasets.images import DATASETS
from lmx.methods.datm.dsa import parse_strategy
from lmx.methods.datm.experts import BUFFER_FILE, META_FILE
from lmx.models.convnet import CONV_IMPLS

# Training images in the smallest class, for datasets whose size is known without loading them: mnist5k and digits
# as lmx.datasets.images splits them (digits: class 8 has 138 of its 174 images in the train split; a test checks
# both against the loaded data), the tfds/Tiny ImageNet ones from the published train splits (MNIST: digit 5).
TRAIN_PER_CLASS = {"mnist5k": 400, "digits": 138, "mnist": 5421, "fashion_mnist": 6000, "cifar10": 5000,
                   "cifar100": 500, "tiny_imagenet": 500}


# Architectures the evaluation can train on a distilled set (eval.cross_arch): registered image classifiers.
EVAL_ARCHS = ("convnet", "mlp", "lenet", "resnet18")


def validate(c, for_run: bool = True) -> None:
  """Raises ConfigError for inconsistent or out-of-range settings.

  ``for_run``: the config is about to run (the launcher's check), so the 'evaluate' variant must name its
  ``synthetic`` file; ``get_config`` checks with ``for_run=False`` (the path comes from the command line).
  """
  check_choice(c.method, "method", ["datm"])
  check_choice(c.data.dataset, "data.dataset", DATASETS)
  try:
    parse_strategy(c.data.dsa_strategy)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  check_choice(c.model.name, "model.name", ["convnet"])
  check_choice(c.model.norm, "model.norm", ["instancenorm", "none"])
  check_choice(c.model.conv_impl, "model.conv_impl", list(CONV_IMPLS))
  positive(c.model.depth, "model.depth")
  positive(c.model.width, "model.width")
  e, d, v = c.experts, c.distill, c.eval
  for name in ("num", "epochs", "batch", "parallel", "fwd_chunk_experts", "fwd_chunk_images"):
    positive(e[name], f"experts.{name}")
    require(int(e[name]) == e[name], f"experts.{name}", f"must be a whole number, got {e[name]!r}")
  positive(e.lr, "experts.lr")
  for name in ("ipc", "iterations", "syn_steps", "expert_epochs", "batch_syn", "log_every", "ckpt_every"):
    positive(d[name], f"distill.{name}")
  per_class = TRAIN_PER_CLASS.get(c.data.dataset)
  if per_class is not None:
    require(d.ipc <= per_class, "distill.ipc",
            f"{d.ipc} images per class requested but {c.data.dataset} has only {per_class} training images "
            "in its smallest class; lower distill.ipc")
  check_choice(d.init, "distill.init", ["correct", "real", "noise"])
  require(d.spike_factor == 0 or d.spike_factor > 1, "distill.spike_factor",
          f"{d.spike_factor}: use 0 (off) or a factor > 1 (e.g. 10)")
  check_choice(d.lr_param, "distill.lr_param", ["log", "log_sgd", "raw"])
  require(0 < d.lr_min < d.lr_init < d.lr_max, "distill.lr_init",
          f"need 0 < lr_min ({d.lr_min}) < lr_init ({d.lr_init}) < lr_max ({d.lr_max})")
  require(0 <= d.min_start_epoch < d.max_start_epoch, "distill.max_start_epoch",
          f"the window [min_start_epoch={d.min_start_epoch}, max_start_epoch={d.max_start_epoch}) is empty")
  if d.sequential:
    require(d.min_start_epoch < d.current_max_start_epoch <= d.max_start_epoch, "distill.current_max_start_epoch",
            f"{d.current_max_start_epoch} must lie in (min_start_epoch, max_start_epoch]")
    positive(d.expansion_end, "distill.expansion_end")
  need = d.max_start_epoch - 1 + d.expert_epochs
  require(need <= e.epochs, "experts.epochs",
          f"{e.epochs} epochs, but the last start epoch {d.max_start_epoch - 1} + expert_epochs {d.expert_epochs} "
          f"needs {need}; raise experts.epochs or lower distill.max_start_epoch")
  require(d.soft_labels or not d.learn_labels, "distill.learn_labels",
          "hard labels (soft_labels=False) cannot be learned; set learn_labels=False")
  require(d.eval_every >= 0 and int(d.eval_every) == d.eval_every, "distill.eval_every",
          f"must be 0 (off) or a positive whole number of iterations, got {d.eval_every!r}")
  if d.eval_every:
    positive(d.eval_nets, "distill.eval_nets")
    positive(d.eval_epochs, "distill.eval_epochs")
  archs = tuple(v.cross_arch) if not isinstance(v.cross_arch, str) else tuple(
      a.strip() for a in v.cross_arch.split(",") if a.strip())
  for a in archs:
    require(a in EVAL_ARCHS, "eval.cross_arch", f"{a!r} is not an evaluation architecture; valid: {list(EVAL_ARCHS)}")
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
  positive(v.num, "eval.num")
  positive(v.epochs, "eval.epochs")
  positive(v.batch, "eval.batch")
  positive(v.full_epochs, "eval.full_epochs")
  positive(v.lr_real, "eval.lr_real")
  # Learning rates, momenta, decays and the loss threshold: a wrong sign trains silently to nonsense.
  for name in ("lr_img", "lr_lr", "lr_y", "threshold"):
    positive(d[name], f"distill.{name}")
  positive(d.max_nonfinite, "distill.max_nonfinite")
  positive(c.data.zca_eps, "data.zca_eps")
  for field, value in (("distill.momentum_img", d.momentum_img), ("distill.momentum_lr", d.momentum_lr),
                       ("distill.momentum_y", d.momentum_y), ("experts.momentum", e.momentum),
                       ("eval.momentum", v.momentum)):
    require(0 <= value < 1, field, f"must be in [0, 1), got {value!r}")
  for field, value in (("experts.weight_decay", e.weight_decay), ("eval.weight_decay", v.weight_decay),
                       ("experts.gsam_rho", e.gsam_rho), ("experts.gsam_alpha", e.gsam_alpha)):
    non_negative(value, field)
