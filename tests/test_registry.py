"""Model registry and ``load_run``: a tiny LM run trained on a data=8 mesh is loaded onto an fsdp=4 × model=2 mesh.
References: the checkpoint read independently with raw Orbax, shardings derived from the parameters' own
logical-axis metadata and the rules (and spelled out by hand for two weights), a forward pass with the raw
parameters on one device, and ``lmx.models.convnet`` called directly."""
import os

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from lmx.core import checkpoint as ckpt_lib
from lmx.core import config as config_lib
from lmx.core import mesh as mesh_lib
from lmx.core.config import ConfigError
from lmx.methods import lm
from lmx.models import convnet, registry
from lmx.models.transformer import Transformer

# The reference read below restores with Orbax's saved shardings on purpose (no lmx code involved).
pytestmark = pytest.mark.filterwarnings("ignore:Sharding info not provided when restoring")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4


def _lm_config():
  cfg = config_lib.load_config_file(f"{ROOT}/configs/lm.py:smoke")
  cfg.mesh.update(data=8, fsdp=1, model=1, expert=1)
  cfg.model.update(n_layers=1, d_model=32, d_ff=64)
  cfg.data.update(seq_len=32, global_batch=8)
  cfg.train.update(steps=STEPS, ckpt_every=STEPS, plot=False)
  return cfg


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """(config, workdir) of a 4-step LM run with one checkpoint, at step 4."""
  cfg = _lm_config()
  workdir = str(tmp_path_factory.mktemp("lm_run"))
  lm.run(cfg, workdir)
  assert os.path.isdir(os.path.join(workdir, "checkpoints", str(STEPS), "state"))
  return cfg, workdir


def _key(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _by_path(tree) -> dict:
  """{'blocks/0/ffn/w1': leaf}: paths as strings, so int keys (nnx pure dicts) meet str keys (raw Orbax)."""
  return {_key(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _raw_params(workdir):
  """The saved parameters, read with Orbax alone (no lmx code): the reference."""
  raw = ocp.PyTreeCheckpointer().restore(os.path.join(workdir, "checkpoints", str(STEPS), "state"))
  assert {"params", "opt_state", "step"} <= set(raw)
  return {k: np.asarray(v) for k, v in _by_path(raw["params"]).items()}


def _expected_spec(logical, shape, mesh, rules) -> P:
  """Independent reading of the rules: each logical name maps to its mesh axis when that axis has size > 1,
  divides the dimension and is not used by an earlier dimension; otherwise the dimension is replicated."""
  table = dict(rules)
  used, out = set(), []
  for name, dim in zip(logical or (), shape):
    ax = table.get(name)
    ok = isinstance(ax, str) and mesh.shape[ax] > 1 and dim % mesh.shape[ax] == 0 and ax not in used
    out.append(ax if ok else None)
    used.update([ax] if ok else [])
  return P(*out)


def test_load_run_restores_params_only_onto_another_mesh(trained, orbax_reads):
  cfg, workdir = trained
  raw = _raw_params(workdir)
  mesh = mesh_lib.make_mesh(dict(data=1, fsdp=4, model=2))
  seen = orbax_reads()
  config, model, params = registry.load_run(workdir, mesh=mesh)
  seen = list(seen)  # what load_run read, nothing later

  # The config comes back from the checkpoint; the optimiser state and loop counters were never read.
  assert config.model.d_model == 32 and config.data.seq_len == 32 and config.train.steps == STEPS
  assert seen and all(n.startswith("params.") for n in seen), sorted(set(seen))
  assert len(seen) == len(raw)

  # Values: equal to the raw Orbax read, leaf by leaf.
  got = _by_path(params)
  assert sorted(got) == sorted(raw)
  for k, v in got.items():
    np.testing.assert_array_equal(np.asarray(v), raw[k], err_msg=k)

  # Placement: every parameter on the new mesh with the spec the rules give for its logical axes.
  abstract = nnx.eval_shape(lambda: Transformer(model.cfg, rngs=nnx.Rngs(0)))
  logical = {_key(path): v.get_metadata().get("out_sharding") for path, v in jax.tree_util.tree_flatten_with_path(
      nnx.state(abstract, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable))[0]}
  assert sorted(logical) == sorted(got)
  rules = tuple(tuple(r) for r in cfg.axis_rules)
  for k, v in got.items():
    assert v.sharding.mesh.shape == mesh.shape and v.sharding.device_set == set(mesh.devices.flat), k
    assert v.sharding.spec == _expected_spec(logical[k], v.shape, mesh, rules), (k, logical[k], v.sharding.spec)
  # Spelled out: embed is [vocab, embed] -> (model, fsdp); the FFN input weight [embed, mlp] -> (fsdp, model).
  assert got["embed"].sharding.spec == P("model", "fsdp")
  assert got["blocks/0/ffn/w1"].sharding.spec == P("fsdp", "model")
  assert len(got["embed"].addressable_shards) == 8 and got["embed"].addressable_shards[0].data.shape == (130, 8)

  # The restored model on the new mesh computes what the raw parameters compute on one device.
  tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, size=(8, 32)).astype(np.int32)
  with jax.set_mesh(mesh):
    logits_mesh = jax.jit(model.apply)(params, jax.device_put(tokens, mesh_lib.batch_sharding(mesh, rules)))
  dev0 = jax.devices()[0]
  treedef = jax.tree.structure(params)
  raw_tree = jax.tree.unflatten(treedef, [jax.device_put(raw[k], dev0) for k in _by_path(params)])
  logits_one = jax.jit(model.apply)(raw_tree, jax.device_put(tokens, dev0))
  assert logits_one.shape == (8, 32, cfg.model.vocab_size)
  np.testing.assert_allclose(np.asarray(logits_mesh), np.asarray(logits_one), rtol=2e-5, atol=2e-5)


def test_load_run_without_checkpoints_is_a_clear_error(tmp_path, trained):
  with pytest.raises(FileNotFoundError, match="has no checkpoints/ directory"):
    registry.load_run(str(tmp_path))
  os.makedirs(tmp_path / "checkpoints")
  with pytest.raises(FileNotFoundError, match=r"no readable checkpoint.*steps: \[\]"):
    registry.load_run(str(tmp_path))
  _, workdir = trained
  with pytest.raises(FileNotFoundError, match=r"steps: \[4\]"):
    registry.load_run(workdir, step=3)


def test_restore_subset_of_another_model_shape_is_a_mismatch(trained):
  """Params of a wider model (d_model 48) are not the run's: a clear error naming the shapes, nothing moved."""
  cfg, workdir = trained
  wide = _lm_config().model
  wide.d_model = 48
  model = registry.build_model(wide, axis_rules=cfg.axis_rules)
  with ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints")) as ck:
    with pytest.raises(ckpt_lib.CheckpointMismatchError,
                       match=r"params/blocks/0/attn/wk: saved \(32, 2, 8\), expected \(48, 2, 12\)"):
      ck.restore_subset({"params": model.abstract_params()})
  assert os.path.isdir(os.path.join(workdir, "checkpoints", str(STEPS)))
  assert not os.path.exists(os.path.join(workdir, "checkpoints_corrupt"))


def test_unknown_model_name_lists_the_valid_names():
  with pytest.raises(ConfigError) as e:
    registry.build_model(ml_collections.ConfigDict(dict(name="resnet9")))
  msg = str(e.value)
  assert "model.name='resnet9'" in msg and "'convnet'" in msg and "'transformer'" in msg
  assert {"convnet", "transformer"} <= set(registry.model_names())


def test_convnet_builder_is_lmx_models_convnet():
  mcfg = ml_collections.ConfigDict(dict(name="convnet", depth=2, width=8, norm="instancenorm", conv_impl="xla"))
  model = registry.build_model(mcfg, image_shape=(16, 16, 3), num_classes=10)
  key = jax.random.key(3)
  params = model.init(key)
  direct = convnet.init_params(key, (16, 16, 3), 10, depth=2, width=8, norm="instancenorm")
  assert jax.tree.structure(params) == jax.tree.structure(direct)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(direct)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  x = np.random.default_rng(0).standard_normal((4, 16, 16, 3)).astype(np.float32)
  direct_apply = jax.jit(convnet.apply, static_argnames="conv_impl")
  np.testing.assert_array_equal(np.asarray(jax.jit(model.apply)(params, x)),
                                np.asarray(direct_apply(direct, x, conv_impl="xla")))
  mesh = mesh_lib.make_mesh(dict(data=-1))
  assert all(s.spec == P() for s in jax.tree.leaves(model.shardings(mesh, ())))
