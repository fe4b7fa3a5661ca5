"""An adapter over Microsoft TextWorld games (the engine ALFWorld is built on) for text agents.

Games are generated locally by seed (``textworld.generator``, the library ``tw-make custom`` calls; TextWorld's
wheel bundles the Inform7 compiler, so nothing is downloaded), cached in a directory and deterministic by
``(seed, quest_length, world_size, nb_objects)``: the same spec gives the same game (world, quest, walkthrough).

:class:`TextWorldEnv` plays one game file:

  ``reset() -> Obs``; ``step(command) -> (Obs, reward, done, StepInfo)``

with text observations (the last feedback, the room description, the inventory, the objective), the admissible
commands, the walkthrough (the expert demonstration), a 0/1 reward only at the end (1 on the winning step, 0
everywhere else: TextWorld's intermediate score is not passed on) and explicit flags per step:

  ``invalid``    the command is not among the admissible commands of the state it was issued in, or the game
                 answered with a parser/refusal message ("You can't ...", "That's not a verb I recognise", ...,
                 ALFWorld's "Nothing happens"). SPA's grounding signal is ``not invalid``.
  ``no_effect``  the world state (room description and inventory) is the same after the command ("look",
                 "examine", an invalid command).
  ``progress``   the game's optimal plan to the goal (``policy_commands``) got shorter, or the game was won.

Game files are checked before the engine starts (:func:`game_file_problem`: the story file's header, length and
checksum, and its ``.json``), since the engine ends the whole process on a damaged one ("Fatal error: Story file
read error", no file named): a damaged cached game is generated again by :func:`make_game`, and
:class:`TextWorldEnv` stops with :class:`GameFileError` naming the file.

ALFWorld game files (``*.tw-pddl``) play through the same class when ``alfworld`` is installed and its data
downloaded (:func:`alfworld_games`); otherwise a clear error says how to get them.

TextWorld is Python-side (not jittable); its stepping speed on this machine is about 230 steps/s on one core
(measured in ``experiments/spa/README.md``).
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import sys
from typing import Sequence

import numpy as np
import textworld
import textworld.generator
from textworld import EnvInfos

from lmx.core.config import ConfigError

INVALID_PATTERNS = (
    "you can't", "you cannot", "that's not a verb", "i didn't understand", "i only understood you as far as",
    "you can't see any such thing", "nothing happens", "you need to be holding", "that's not something you can",
    "you're not holding", "you'll have to", "you must name", "what do you want to",
)
_REQUEST = EnvInfos(admissible_commands=True, policy_commands=True, won=True, lost=True, objective=True,
                    description=True, inventory=True, feedback=True, extras=["walkthrough"])
_PROMPT_FOOTER = re.compile(r">\s*-=.*$", re.S)  # the status line that follows the prompt in feedback
_ROOM = re.compile(r"-=\s*(.*?)\s*=-")


class GameFileError(ConfigError):
  """A game file cannot be played (truncated, overwritten, not a story file); the message names it."""


def _zmachine_problem(data: bytes) -> str | None:
  """Why ``data`` is not a whole Z-machine story: its header's version, declared length and checksum (the sum of
  the bytes from 0x40 to that length, mod 2^16: what the interpreter's ``verify`` checks)."""
  if len(data) < 64:
    return f"{len(data)} bytes, shorter than a Z-machine header (64)"
  version = data[0]
  if not 1 <= version <= 8:
    return f"not a Z-machine story file (version byte {version})"
  declared = int.from_bytes(data[0x1A:0x1C], "big") * (2 if version <= 3 else 4 if version <= 5 else 8)
  if declared and len(data) < declared:
    return f"truncated: {len(data)} bytes, its header declares {declared}"
  if declared and int(np.frombuffer(data[0x40:declared], np.uint8).sum()) % 0x10000 != int.from_bytes(
      data[0x1C:0x1E], "big"):
    return "its checksum does not match its contents (the file changed after it was compiled)"
  return None


def _glulx_problem(data: bytes) -> str | None:
  """Why ``data`` is not a whole Glulx story: magic, length (``EXTSTART``) and checksum (the sum of its 32-bit
  words, the checksum word counted as 0, mod 2^32)."""
  if len(data) < 36 or data[:4] != b"Glul":
    return "not a Glulx story file (no 'Glul' header)"
  declared = int.from_bytes(data[12:16], "big")
  if len(data) < declared or declared < 36 or declared % 4:
    return f"truncated: {len(data)} bytes, its header declares {declared}"
  words = np.frombuffer(data[:declared], ">u4").astype(np.uint64)
  checksum = int.from_bytes(data[32:36], "big")
  if (int(words.sum()) - checksum) % 2**32 != checksum:
    return "its checksum does not match its contents (the file changed after it was compiled)"
  return None


def game_file_problem(path: str) -> str | None:
  """Why the compiled game ``path`` (``.z1``-``.z8`` or ``.ulx``, with its ``.json`` when there is one) cannot be
  played, as ``"<file>: <reason>"``, or None. Other kinds (ALFWorld's ``.tw-pddl``, blorbs) are left to their
  engine."""
  ext = os.path.splitext(path)[1].lower()
  if not (re.fullmatch(r"\.z[1-8]", ext) or ext == ".ulx"):
    return None
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    return f"{path}: unreadable ({e.strerror})"
  reason = _glulx_problem(data) if ext == ".ulx" else _zmachine_problem(data)
  if reason:
    return f"{path}: {reason}"
  meta = os.path.splitext(path)[0] + ".json"
  if os.path.exists(meta):
    try:
      with open(meta) as f:
        if not isinstance(json.load(f), dict):
          return f"{meta}: not a TextWorld game description (a JSON object)"
    except (OSError, ValueError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError
      return f"{meta}: unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
  return None


@dataclasses.dataclass(frozen=True)
class GameSpec:
  """One procedurally generated game: ``tw-make custom --seed seed --quest-length ... --world-size ...``."""
  seed: int
  quest_length: int = 4
  world_size: int = 3
  nb_objects: int = 6

  def filename(self) -> str:
    return f"tw_q{self.quest_length}_w{self.world_size}_o{self.nb_objects}_s{self.seed}.z8"


def _check_spec(spec: GameSpec) -> None:
  for name in ("quest_length", "world_size", "nb_objects"):
    v = getattr(spec, name)
    if not isinstance(v, int) or v < 1:
      raise ValueError(f"GameSpec.{name} must be a positive int, got {v!r}")
  if not isinstance(spec.seed, int) or spec.seed < 0:
    raise ValueError(f"GameSpec.seed must be a non-negative int, got {spec.seed!r}")


def generate_game(spec: GameSpec, with_options: bool = False):
  """``spec``'s TextWorld ``Game`` (world, quest, text), not compiled; deterministic by spec."""
  _check_spec(spec)
  opts = textworld.GameOptions()
  opts.seeds = spec.seed
  opts.nb_rooms = spec.world_size
  opts.nb_objects = spec.nb_objects
  opts.quest_length = spec.quest_length
  opts.force_recompile = True
  game = textworld.generator.make_game(opts)
  return (game, opts) if with_options else game


def make_game(spec: GameSpec, cache_dir: str) -> str:
  """The path of ``spec``'s compiled game in ``cache_dir``, generating and compiling it only when absent.

  Deterministic by spec: TextWorld draws the map, objects, quest and text from ``GameOptions.seeds = spec.seed``.
  A game whose quest comes out shorter than asked (small worlds) is kept as generated; its walkthrough says. A
  cached game that is damaged (:func:`game_file_problem`) is generated again, with one warning line.
  """
  _check_spec(spec)
  os.makedirs(cache_dir, exist_ok=True)
  path = os.path.join(cache_dir, spec.filename())
  if os.path.exists(path) and os.path.exists(path[:-3] + ".json"):
    problem = game_file_problem(path)
    if problem is None:
      return path
    print(f"WARNING: cached game {problem}; generating it again from its seed", file=sys.stderr, flush=True)
  game, opts = generate_game(spec, with_options=True)
  tmp = path + ".tmp.z8"  # compile under a temporary name, then rename: a killed run leaves no half game
  opts.path = tmp
  out = textworld.generator.compile_game(game, opts)
  for ext in (".json", ".ni"):
    if os.path.exists(out[:-3] + ext):
      os.replace(out[:-3] + ext, path[:-3] + ext)
  os.replace(out, path)
  return path


def game_suite(cache_dir: str, seeds: Sequence[int], quest_lengths: Sequence[int], *, world_size: int = 3,
               nb_objects: int = 6) -> list[str]:
  """Game paths for ``seeds`` x cyclic ``quest_lengths`` (seed i gets ``quest_lengths[i % n]``), cached."""
  if not quest_lengths:
    raise ValueError("quest_lengths must name at least one quest length")
  return [make_game(GameSpec(int(s), int(quest_lengths[i % len(quest_lengths)]), world_size, nb_objects),
                    cache_dir) for i, s in enumerate(seeds)]


def alfworld_games(split: str = "valid_unseen", data_dir: str | None = None) -> list[str]:
  """ALFWorld ``game.tw-pddl`` files of ``split`` under ``$ALFWORLD_DATA/json_2.1.1``; a clear error when
  ``alfworld`` or its data is absent (they are not on this machine and cannot be fetched at run time)."""
  try:
    import alfworld  # noqa: F401
  except ImportError:
    raise FileNotFoundError(
        "ALFWorld games need the 'alfworld' package and its data: pip install 'alfworld[full]' "
        "(it pulls textworld[pddl]), then run 'alfworld-download' (sets up ~/.cache/alfworld; export "
        "ALFWORLD_DATA=<that dir>), and point data_dir / $ALFWORLD_DATA at it") from None
  root = data_dir or os.environ.get("ALFWORLD_DATA", os.path.expanduser("~/.cache/alfworld"))
  files = sorted(glob.glob(os.path.join(root, "json_2.1.1", split, "**", "game.tw-pddl"), recursive=True))
  if not files:
    raise FileNotFoundError(
        f"no ALFWorld game files (game.tw-pddl) under {os.path.join(root, 'json_2.1.1', split)}; run "
        "'alfworld-download' (and export ALFWORLD_DATA=<its directory>) to get them")
  return files


def clean_feedback(text: str) -> str:
  """The feedback without TextWorld's banner padding and the status line after the prompt."""
  return re.sub(r"\s+", " ", _PROMPT_FOOTER.sub("", text or "")).strip()


def room_name(description: str) -> str:
  m = _ROOM.search(description or "")
  return m.group(1).strip().lower() if m else ""


def looks_invalid(feedback: str) -> bool:
  """True when the game's answer is a parser or refusal message (:data:`INVALID_PATTERNS`)."""
  f = clean_feedback(feedback).lower()
  return any(f.startswith(p) or f" {p}" in f[:60] for p in INVALID_PATTERNS)


def normalize_command(cmd: str) -> str:
  return " ".join(str(cmd).lower().strip().split())


@dataclasses.dataclass
class Obs:
  """What the agent sees: ``feedback`` (the game's last answer), ``description`` (the room), ``inventory``,
  ``objective`` (the quest text), ``admissible`` (commands the game accepts now), ``room`` (its name)."""
  feedback: str
  description: str
  inventory: str
  objective: str
  admissible: list[str]
  room: str


@dataclasses.dataclass
class StepInfo:
  invalid: bool
  no_effect: bool
  progress: bool
  won: bool
  lost: bool
  steps: int


class TextWorldEnv:
  """One TextWorld (or ALFWorld ``.tw-pddl``) game with a 0/1 terminal reward and invalid/no-effect flags.

  ``max_steps``: the episode ends (``done``, reward 0) after this many steps without a win.
  """

  def __init__(self, path: str, max_steps: int = 20):
    if not os.path.exists(path):
      raise FileNotFoundError(f"no game file at {path} (make one with lmx.envs.textworld.make_game)")
    problem = game_file_problem(path)
    if problem:
      raise GameFileError(f"game file {problem}; delete it (and its .json) and generate it again "
                          "(lmx.envs.textworld.make_game does so for a cached game), or name another game")
    if max_steps < 1:
      raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    self.path = path
    self.max_steps = int(max_steps)
    wrappers = []
    if path.endswith(".tw-pddl"):
      from alfworld.agents.environment.alfred_tw_env import AlfredDemangler, AlfredInfos  # needs alfworld
      wrappers = [AlfredDemangler(), AlfredInfos()]
    self._env = textworld.start(path, request_infos=_REQUEST, wrappers=wrappers)
    self._gs = None
    self._steps = 0
    self.walkthrough: list[str] = []

  def _obs(self, gs) -> Obs:
    return Obs(feedback=clean_feedback(gs.feedback), description=clean_feedback(gs.description or ""),
               inventory=clean_feedback(gs.inventory or ""), objective=clean_feedback(gs.objective or ""),
               admissible=[normalize_command(c) for c in (gs.admissible_commands or [])],
               room=room_name(gs.description or ""))

  def reset(self) -> Obs:
    self._gs = self._env.reset()
    self._steps = 0
    wt = self._gs.get("extra.walkthrough") or self._gs.policy_commands or []
    self.walkthrough = [normalize_command(c) for c in wt]
    return self._obs(self._gs)

  @property
  def state_obs(self) -> Obs:
    return self._obs(self._gs)

  def step(self, command: str):
    """Plays ``command``; returns ``(obs, reward, done, info)`` with reward 1.0 only on the winning step."""
    if self._gs is None:
      raise RuntimeError("call reset() before step()")
    if self.done:
      raise RuntimeError("the episode is over; call reset()")
    cmd = normalize_command(command)
    before = self._gs
    admissible = {normalize_command(c) for c in (before.admissible_commands or [])}
    plan_before = len(before.policy_commands or [])
    gs, _, _ = self._env.step(cmd)
    self._gs = gs
    self._steps += 1
    won, lost = bool(gs.won), bool(gs.lost)
    invalid = (cmd not in admissible) or looks_invalid(gs.feedback)
    no_effect = (clean_feedback(gs.description or "") == clean_feedback(before.description or "")
                 and clean_feedback(gs.inventory or "") == clean_feedback(before.inventory or "")
                 and not won)
    progress = won or (len(gs.policy_commands or []) < plan_before)
    reward = 1.0 if won else 0.0
    info = StepInfo(invalid=bool(invalid), no_effect=bool(no_effect), progress=bool(progress), won=won, lost=lost,
                    steps=self._steps)
    return self._obs(gs), reward, self.done, info

  @property
  def done(self) -> bool:
    gs = self._gs
    return bool(gs is not None and (gs.won or gs.lost or self._steps >= self.max_steps))

  def close(self) -> None:
    self._env.close()
