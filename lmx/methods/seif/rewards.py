"""SEIF's rewards, as in the released code (``instruction_compute_score``), with the rule-based Judger.

Instructor: 0 when its text does not parse into constraints (or has more than ``max_constraints``), 0 when the
Filter rejects the set (``use_filter``; the no-Filter ablation skips this gate), 0 when the frozen Follower's
answer is empty, else ``1 − adherence`` of that answer. Follower: adherence, the fraction of constraints
followed.
"""
from __future__ import annotations

from typing import Sequence

from lmx.envs import instructions as I


def parse_proposal(text: str, *, max_constraints: int) -> tuple[I.Constraint, ...] | None:
  """The Instructor's constraints, or None when unparsable or longer than ``max_constraints``."""
  cs = I.parse(text)
  if cs is None or len(cs) > max_constraints:
    return None
  return cs


def instructor_reward(constraints: Sequence[I.Constraint] | None, answer: str | None, *, use_filter: bool = True,
                      max_chars: int | None = None) -> float:
  """``0`` if unparsable (None), filtered (``use_filter`` and the Filter rejects) or the answer is empty; else
  ``1 − adherence(answer, constraints)``."""
  if not constraints:
    return 0.0
  if use_filter and not I.is_valid(constraints, max_chars=max_chars):
    return 0.0
  if answer is None or not answer.strip():
    return 0.0
  return 1.0 - I.adherence(answer, constraints)


def follower_reward(answer: str, constraints: Sequence[I.Constraint]) -> float:
  """Adherence: the fraction of ``constraints`` that ``answer`` follows."""
  return I.adherence(answer, constraints)
