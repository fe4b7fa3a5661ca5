"""The TextWorld adapter on locally generated games: the walkthrough wins, reward only at the end, invalid
commands flagged, the same seed gives the same game, a different seed a different one, ALFWorld's clear error."""
import json

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
