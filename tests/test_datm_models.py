"""Cross-architecture evaluation nets (MLP, LeNet, ResNet-18): shapes, hand-counted parameters, they train."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmx.models import vision
from lmx.models.registry import build_model

SHAPES = [(28, 28, 1), (32, 32, 3)]


@pytest.mark.parametrize("name", vision.ARCHS)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_shape(name, shape):
  m = build_model({"name": name}, image_shape=shape, num_classes=10)
  params = jax.eval_shape(m.init, jax.random.key(0))  # full size, no compilation: shapes only
  out = jax.eval_shape(m.apply, params, jax.ShapeDtypeStruct((3, *shape), jnp.float32))
  assert out.shape == (3, 10)


def test_parameter_counts_by_hand():
  def count(name, shape, classes=10):
    m = build_model({"name": name}, image_shape=shape, num_classes=classes)
    return vision.num_params(jax.eval_shape(m.init, jax.random.key(0)))
  # MLP: (HWC·128 + 128) + (128·128 + 128) + (128·classes + classes)
  assert count("mlp", (28, 28, 1)) == 784 * 128 + 128 + 128 * 128 + 128 + 128 * 10 + 10 == 118282
  assert count("mlp", (32, 32, 3)) == 3072 * 128 + 128 + 128 * 128 + 128 + 1290 == 411146
  # LeNet: conv 5·5·C·6+6, conv 5·5·6·16+16, fc 400·120+120, 120·84+84, 84·classes+classes
  rest = 5 * 5 * 6 * 16 + 16 + 400 * 120 + 120 + 120 * 84 + 84 + 84 * 10 + 10
  assert count("lenet", (28, 28, 1)) == 5 * 5 * 1 * 6 + 6 + rest == 61706
  assert count("lenet", (32, 32, 3)) == 5 * 5 * 3 * 6 + 6 + rest == 62006
  # ResNet-18 with instance norm has the parameter count of torchvision-style CIFAR ResNet-18 with BN: 11,173,962
  assert count("resnet18", (32, 32, 3)) == 11173962


@pytest.mark.parametrize("name", ["mlp", "lenet", pytest.param("resnet18", marks=pytest.mark.slow)])
def test_sgd_steps_reduce_the_loss_on_a_separable_problem(name):
  """Two classes told apart by the sign of the mean pixel: 10 plain SGD steps on 16 images lower the loss."""
  rng = np.random.default_rng(0)
  shape = (28, 28, 1)
  y = np.arange(16) % 2
  x = (rng.normal(size=(16, *shape)) * 0.1 + np.where(y, 1.0, -1.0)[:, None, None, None]).astype(np.float32)
  m = build_model({"name": name, "width": 8} if name == "resnet18" else {"name": name}, image_shape=shape,
                  num_classes=2)
  params = m.init(jax.random.key(1))

  def loss(p):
    logits = m.apply(p, jnp.asarray(x))
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(16), jnp.asarray(y)])

  @jax.jit
  def step(p):
    l, g = jax.value_and_grad(loss)(p)
    return jax.tree.map(lambda a, b: a - 0.2 * b, p, g), l

  first = None
  for _ in range(10):
    params, l = step(params)
    first = l if first is None else first
  assert float(loss(params)) < 0.7 * float(first)


def test_registry_lists_the_evaluation_nets():
  from lmx.models.registry import model_names
  assert {"convnet", "mlp", "lenet", "resnet18"} <= set(model_names())
