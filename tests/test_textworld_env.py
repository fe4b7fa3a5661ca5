"""The TextWorld adapter on locally generated games: the walkthrough wins, reward only at the end, invalid
commands flagged, the same seed gives the same game, a different seed a different one, ALFWorld's clear error."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from lmx.envs import textworld as tw


@pytest.fixture(scope="module")
def games(tmp_path_factory):
  cache = str(tmp_path_factory.mktemp("tw_cache"))
  spec = tw.GameSpec(seed=3, quest_length=5, world_size=3, nb_objects=4)
  return cache, spec, tw.make_game(spec, cache)


def test_walkthrough_wins_with_reward_only_at_the_end(games):
  _, _, path = games
  env = tw.TextWorldEnv(path, max_steps=30)
  obs = env.reset()
  assert obs.objective and obs.admissible and env.walkthrough
  rewards, dones = [], []
  for cmd in env.walkthrough:
    assert cmd in env.state_obs.admissible, (cmd, env.state_obs.admissible)
    obs, r, done, info = env.step(cmd)
    rewards.append(r)
    dones.append(done)
    assert not info.invalid and info.progress
  assert rewards[-1] == 1.0 and all(r == 0.0 for r in rewards[:-1])
  assert dones[-1] and not any(dones[:-1]) and info.won
  with pytest.raises(RuntimeError, match="episode is over"):
    env.step("look")


def test_invalid_and_no_effect_flags(games):
  _, _, path = games
  env = tw.TextWorldEnv(path, max_steps=3)
  env.reset()
  _, r, done, info = env.step("fly to the moon")
  assert info.invalid and info.no_effect and not info.progress and r == 0.0 and not done
  _, _, _, info = env.step("look")  # admissible, changes nothing
  assert not info.invalid and info.no_effect and not info.progress
  _, r, done, info = env.step("inventory")
  assert done and r == 0.0 and not info.won  # max_steps reached without a win


def _as_json(game):
  return json.loads(json.dumps(game.serialize()))


def test_same_seed_same_game_other_seed_other_game(games):
  cache, spec, path = games
  saved = json.load(open(path[:-3] + ".json"))
  assert _as_json(tw.generate_game(spec)) == saved  # generated afresh: the same world, quest and text
  assert tw.make_game(spec, cache) == path  # cached: no regeneration
  other = _as_json(tw.generate_game(tw.GameSpec(4, spec.quest_length, spec.world_size, spec.nb_objects)))
  assert other["world"] != saved["world"] or other["quests"] != saved["quests"]


def test_feedback_helpers():
  assert tw.looks_invalid("\nYou can't go that way.\n\n\n>   -= Study =-0/3")
  assert tw.looks_invalid("That's not a verb I recognise.")
  assert not tw.looks_invalid("You open the locker, revealing a Canadian keycard.")
  assert tw.clean_feedback("\nYou take it.\n\n>      -= Study =-0/3") == "You take it."
  assert tw.room_name("-= Study =-\nYou are in a study.") == "study"


def test_bad_input_errors(tmp_path, monkeypatch):
  with pytest.raises(ValueError, match="quest_length"):
    tw.make_game(tw.GameSpec(0, 0), str(tmp_path))
  with pytest.raises(FileNotFoundError, match="make_game"):
    tw.TextWorldEnv(str(tmp_path / "none.z8"))
  monkeypatch.setenv("ALFWORLD_DATA", str(tmp_path))
  with pytest.raises(FileNotFoundError, match="alfworld"):
    tw.alfworld_games()


def _copy_game(path, folder):
  os.makedirs(folder, exist_ok=True)
  for ext in (".z8", ".json"):
    shutil.copy(path[:-3] + ext, folder)
  return os.path.join(folder, os.path.basename(path))


def _cut(path, keep=0.5):
  data = open(path, "rb").read()
  open(path, "wb").write(data[:int(len(data) * keep)])


def test_damaged_game_files_are_named(games, tmp_path):
  """Truncated, overwritten or empty story files and unreadable .json files are found by their header, length and
  checksum before any engine reads them."""
  _, _, path = games
  assert tw.game_file_problem(path) is None
  cases = {"truncated": (lambda p: _cut(p), ".z8", "truncated: "),
           "flipped": (lambda p: open(p, "r+b").write(b"\x08" + open(p, "rb").read()[1:100] + b"!"), ".z8",
                       "checksum does not match"),
           "empty": (lambda p: open(p, "wb").close(), ".z8", "0 bytes, shorter than a Z-machine header"),
           "json": (lambda p: _cut(p[:-3] + ".json"), ".json", "unreadable (JSONDecodeError")}
  for name, (damage, ext, words) in cases.items():
    copy = _copy_game(path, str(tmp_path / name))
    damage(copy)
    problem = tw.game_file_problem(copy)
    assert problem and problem.startswith(copy[:-3] + ext + ": ") and words in problem, (name, problem)


def test_a_truncated_game_stops_with_its_name_not_the_engines_fatal_error(games, tmp_path):
  """The engine ends the whole process on a damaged story file ("Fatal error: Story file read error"); the adapter
  checks first, so the caller gets an error naming the file (in a child process: the old way killed it)."""
  _, _, path = games
  copy = _copy_game(path, str(tmp_path / "cache"))
  _cut(copy)
  code = ("import sys; from lmx.envs import textworld as tw\n"
          "try:\n  tw.TextWorldEnv(sys.argv[1])\nexcept tw.GameFileError as e:\n  print('refused:', e)\n")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  r = subprocess.run([sys.executable, "-c", code, copy], capture_output=True, text=True, timeout=120,
                     env=dict(os.environ, PYTHONPATH=root))
  assert r.returncode == 0 and "Fatal error" not in r.stdout + r.stderr, r.stdout + r.stderr
  assert r.stdout.startswith(f"refused: game file {copy}: truncated: "), r.stdout


def test_a_damaged_cached_game_is_generated_again(games, tmp_path, monkeypatch, capsys):
  cache, spec, path = games
  good = {ext: open(path[:-3] + ext, "rb").read() for ext in (".z8", ".json")}
  mine = os.path.dirname(_copy_game(path, str(tmp_path / "cache")))
  target = os.path.join(mine, spec.filename())
  assert tw.make_game(spec, mine) == target and not capsys.readouterr().err  # intact: used as it is
  _cut(target)
  compiled = []

  def compile_game(game, opts):  # stands in for TextWorld's compiler: writes the game the seed gives
    compiled.append(opts.path)
    for ext, data in good.items():
      open(opts.path[:-3] + ext, "wb").write(data)
    return opts.path
  monkeypatch.setattr(tw.textworld.generator, "compile_game", compile_game)
  monkeypatch.setattr(tw, "generate_game", lambda spec, with_options=False: (None, tw.textworld.GameOptions()))
  assert tw.make_game(spec, mine) == target
  assert len(compiled) == 1 and open(target, "rb").read() == good[".z8"]
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith(f"WARNING: cached game {target}: truncated") and "again" in err[0]


def _glulx(body: bytes) -> bytearray:
  """A Glulx story per the spec's header: magic, version, RAMSTART, EXTSTART (the file length), ENDMEM, stack
  size, start function, decoding table, checksum (the sum of all words with this one counted as 0)."""
  n = 36 + len(body)
  data = bytearray(b"Glul" + (0x00030103).to_bytes(4, "big") + (36).to_bytes(4, "big") + n.to_bytes(4, "big") +
                   n.to_bytes(4, "big") + (4096).to_bytes(4, "big") + (36).to_bytes(4, "big") + bytes(4) + bytes(4)
                   + body)
  data[32:36] = (int(np.frombuffer(bytes(data), ">u4").astype(np.uint64).sum()) % 2**32).to_bytes(4, "big")
  return data


def test_glulx_header_checks(tmp_path):
  p = str(tmp_path / "g.ulx")
  data = _glulx(bytes(range(256)) * 4)
  open(p, "wb").write(data)
  assert tw.game_file_problem(p) is None
  open(p, "wb").write(data[:200])
  assert "truncated: 200 bytes, its header declares 1060" in tw.game_file_problem(p)
  data[500] ^= 1
  open(p, "wb").write(data)
  assert "checksum does not match" in tw.game_file_problem(p)
  open(p, "wb").write(b"not a story")
  assert "not a Glulx story file" in tw.game_file_problem(p)
