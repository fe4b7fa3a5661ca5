"""LET's pure pieces: feature-axis interpolation, the negative-cosine alignment, the λ(s) schedule, a projector.

Shapes in names: B batch, T time, d a hidden size (``d_in``/``d_out``, the teacher's ``dT``, the student's ``dS``).
Everything here is a pure function of arrays (jit-, grad- and vmap-safe).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

ALIGN_MODES = ("interp", "project")


def feature_interp(h_BTd, d_out: int):
  """``h_BTd`` [..., d_in] linearly interpolated to [..., d_out] along the last (feature) axis.

  Half-pixel centres, no antialiasing: output feature j samples the input at ``(j + 0.5)·d_in/d_out − 0.5``,
  clamped to ``[0, d_in − 1]`` (PyTorch ``F.interpolate(mode='linear', align_corners=False)``; ``np.interp`` on
  ``arange(d_in)`` at those points). ``antialias=False`` matters when downsampling (d_out < d_in): JAX's default
  would widen the kernel and average over more than the two neighbours. d_out == d_in returns ``h_BTd``.
  """
  d_in = h_BTd.shape[-1]
  if int(d_out) == d_in:
    return h_BTd
  return jax.image.resize(h_BTd, h_BTd.shape[:-1] + (int(d_out),), method="linear", antialias=False)


def interp_matrix(d_in: int, d_out: int, dtype=jnp.float32):
  """The [d_in, d_out] matrix W with ``h @ W == feature_interp(h, d_out)`` (interpolation is linear); the
  projector's initial value, so ``align='project'`` starts where ``align='interp'`` is."""
  return feature_interp(jnp.eye(d_in, dtype=dtype), d_out)


def init_projector(d_student: int, d_teacher: int, dtype=jnp.float32) -> dict:
  """Learned projector parameters ``{"w_dSdT": [dS, dT]}`` (student features → teacher space), initialised to
  the interpolation matrix. The projector sits on the student side (FitNets' regressor): the teacher target
  stays fixed, so projector and student cannot jointly collapse the target onto one direction."""
  return {"w_dSdT": interp_matrix(d_student, d_teacher, dtype)}


def project(h_student_BTdS, proj: dict):
  """Student features mapped into the teacher's feature space: ``h @ w_dSdT`` (float32)."""
  w = proj["w_dSdT"]
  return jnp.einsum("...s,st->...t", h_student_BTdS.astype(jnp.float32), w.astype(jnp.float32))


def neg_cos_align(h_student_BTd, h_teacher_BTd, mask_BT=None, eps: float = 1e-6):
  """``mean over positions with mask_BT > 0 of (1 − cos(h_student, h_teacher))``; the teacher is under
  ``stop_gradient`` (no gradient reaches it). Both [B, T, d] (same d), computed in float32.

  ``1 − cos`` differs from the paper's ``−cos`` by a constant (same gradient) and is 0 at perfect alignment.
  ``mask_BT`` (optional; 1 = a real token, 0 = padding) excludes padding; an all-zero mask gives 0. ``eps``
  guards the norms of all-zero vectors.
  """
  if h_student_BTd.shape != h_teacher_BTd.shape:
    raise ValueError(f"neg_cos_align: student {tuple(h_student_BTd.shape)} and teacher "
                     f"{tuple(h_teacher_BTd.shape)} hidden states must have one shape (interpolate or project "
                     "first)")
  s = h_student_BTd.astype(jnp.float32)
  t = jax.lax.stop_gradient(h_teacher_BTd).astype(jnp.float32)
  s_hat = s / jnp.maximum(jnp.linalg.norm(s, axis=-1, keepdims=True), eps)
  t_hat = t / jnp.maximum(jnp.linalg.norm(t, axis=-1, keepdims=True), eps)
  dist_BT = 1.0 - jnp.sum(s_hat * t_hat, axis=-1)
  if mask_BT is None:
    return jnp.mean(dist_BT)
  if tuple(mask_BT.shape) != tuple(dist_BT.shape):
    raise ValueError(f"neg_cos_align: mask {tuple(mask_BT.shape)} must be [B, T] = {tuple(dist_BT.shape)}")
  m = mask_BT.astype(jnp.float32)
  total = jnp.sum(m)
  return jnp.sum(dist_BT * m) / jnp.where(total > 0, total, 1.0)


def align_loss(h_student_BTdS, h_teacher_BTdT, mask_BT=None, *, mode: str = "interp", proj: dict | None = None):
  """The alignment term in either mode: ``interp`` interpolates the teacher's features to the student's size
  (as reported); ``project`` maps the student's features into the teacher's space with ``proj``."""
  if mode == "interp":
    h_t = feature_interp(jax.lax.stop_gradient(h_teacher_BTdT), h_student_BTdS.shape[-1])
    return neg_cos_align(h_student_BTdS, h_t, mask_BT)
  if mode == "project":
    if proj is None:
      raise ValueError("align_loss(mode='project') needs the projector parameters")
    return neg_cos_align(project(h_student_BTdS, proj), h_teacher_BTdT, mask_BT)
  raise ValueError(f"align mode {mode!r} is unknown; valid: {list(ALIGN_MODES)}")


def let_weight(step, lam0: float, s_stop: int):
  """λ(s) = λ0 · max(0, (S_stop − s) / S_stop): λ0 at s = 0, linear to 0 at S_stop, 0 after. ``step`` may be a
  Python int or a traced integer array (float32 result)."""
  if int(s_stop) <= 0:
    raise ValueError(f"let_weight: s_stop must be > 0, got {s_stop}")
  s = jnp.asarray(step).astype(jnp.float32)
  return jnp.float32(lam0) * jnp.maximum(0.0, (jnp.float32(s_stop) - s) / jnp.float32(s_stop))
