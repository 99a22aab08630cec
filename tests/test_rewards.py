"""RL rewards (training/rewards.py) on crafted completions, and Robix's variance filter on a stub sampler.

Pure unit tests: no torch (the model judge runs on the scripted backend).
"""

from __future__ import annotations

import pytest

from robix_planner import format as fmt
from robix_planner.backends.base import ModelConfig
from training.rewards import (
    ModelJudge,
    RewardSet,
    action_reward,
    completion_text,
    consistency_reward,
    format_reward,
    judge_consistency,
)
from training.rl import select_varied, variance_filter


def out(thought, plan=None, reply=None) -> str:
    return fmt.serialize(fmt.ModelOutput(thought, plan, reply))


def conv(text: str) -> list[dict]:
    """trl's conversational completion."""
    return [{"role": "assistant", "content": text}]


RIGHT = out("I see a red cup. Next: put the red cup into the bus tub.", "put the red cup into the bus tub", "On it.")
WRONG = out("I see a fork. Next: put the fork into the bus tub.", "put the fork into the bus tub")
MALFORMED = [
    "",
    "put the red cup into the bus tub",                                    # no tags at all
    '{"thought": "x", "plan": "put the red cup into the bus tub"}',        # JSON instead of tags
    "<|think_start|>ok<|think_end|><|plan_start|>pick up the fork",        # unclosed plan
    "<|plan_start|>pick up the fork<|plan_end|>",                           # no thought
    "<|think_start|>a<|think_end|><|plan_start|>x<|plan_end|><|plan_start|>y<|plan_end|>",  # two plans
]
ACCEPT = ["put the red cup into the bus tub", "put the fork into the bus tub"]


def test_completion_text_reads_strings_and_conversational_completions():
    assert completion_text(RIGHT) == RIGHT
    assert completion_text(conv(RIGHT)) == RIGHT
    assert completion_text([{"role": "assistant", "content": [{"type": "text", "text": "a"},
                                                              {"type": "text", "text": "b"}]}]) == "ab"


def test_format_reward_right_wrong_malformed():
    completions = [RIGHT, WRONG, *MALFORMED]
    assert format_reward([None] * len(completions), completions) == [1.0, 1.0] + [0.0] * len(MALFORMED)
    assert format_reward([None], [conv(RIGHT)]) == [1.0]


def test_action_reward_against_the_acceptable_list():
    completions = [
        RIGHT,
        conv(RIGHT),
        out("Next: put the red cup into the bus tub.", "Put the  Red cup into the bus tub."),  # normalised
        out("Next: put the banana into the trash bin.", "put the banana into the trash bin"),  # not acceptable
        out("There is no laptop here; I refuse and do not move.", None, "Sorry, no laptop here."),  # no plan
        MALFORMED[1],
    ]
    rewards = action_reward([None] * len(completions), completions, acceptable=[ACCEPT] * len(completions))
    assert rewards == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]


def test_action_reward_empty_string_means_no_command_is_right():
    refuse = out("There is no laptop here; I refuse and do not move.", None, "Sorry, I don't see a laptop.")
    act = out("Next: put the red cup into the bus tub.", "put the red cup into the bus tub")
    assert action_reward([None, None], [refuse, act], acceptable=[[""], [""]]) == [1.0, 0.0]
    # Both a command and no command can be acceptable (e.g. "stop" or waiting).
    assert action_reward([None, None], [refuse, out("I stop.", "stop")], acceptable=[["", "stop"]] * 2) == [1.0, 1.0]


def test_action_reward_errors_say_what_is_wrong():
    with pytest.raises(ValueError, match="column 'acceptable'"):
        action_reward([None], [RIGHT])
    with pytest.raises(ValueError, match="per-step rows"):
        action_reward([None], [RIGHT], acceptable=[[ACCEPT]])  # an episode's list of lists


@pytest.mark.parametrize("thought, plan, reply, expected", [
    # with a plan
    ("I see a red cup. Next: put the red cup into the bus tub.", "put the red cup into the bus tub", None, 1),
    ("Retry: put the held red cups into the bus tub.", "put the red cup into the bus tub", None, 1),  # plural
    ("'put the fork into the bus tub' succeeded. Next: pick up the banana.", "pick up the banana", None, 1),
    ("They still need the fork, so I stop and leave it on the table.", "stop", "OK, I'll leave it.", 1),
    ("I see a red cup. Next: put the red cup into the bus tub.", "put the fork into the bus tub", None, -1),  # object
    ("Next: put the red cup into the bin.", "put the red cup into the bus tub", None, -1),  # receptacle not named
    ("The user said stop.", "put the red cup into the bus tub", None, -1),  # object not named
    ("All fine, I keep going.", "stop", None, -1),  # stop without a halting word
    ("There is no red cup; I refuse and do not move.", "put the red cup into the bus tub", "Sorry.", -1),
    ("Next: pick up the red cup.", "put the red cup into the bus tub", None, -1),  # stated a different skill
    ("The red cup.", "juggle the red cup", None, 0),  # not a command of any skill
    # the oracle's traces: narration before the next step, quoted speech, "no command has run yet"
    ("No command has run yet. I heard \"I'll pick it up later\". Next step: put the red cup into the bus tub.",
     "put the red cup into the bus tub", "Sure.", 1),
    ("The user said \"Hold on\": they still need the fork, so I stop and leave it on the table. "
     "So the next command is: place the fork back on the table.", "place the fork back on the table", None, 1),
    ("Now I put the banana into the trash bin.", "put the banana into the trash bin", None, 1),
    # without a plan
    ("Next: put the red cup into the bus tub.", None, None, -1),  # said it would act
    ("I'll pick up the fork now.", None, "Sure!", -1),
    ("There is no laptop here; I refuse and do not move.", None, "Sorry, I don't see a laptop.", 1),
    ("There is no laptop here; I refuse and do not move.", None, None, -1),  # refusal without a reply
    ("There are 2 cups; I must ask which one before moving.", None, "Which cup do you mean?", 1),
    ("There are 2 cups; I must ask which one before moving.", None, "I will wait.", -1),  # question without '?'
    ("The items are done, but the fork also belongs in the bus tub; I offer to do it.", None,
     "Should I also put the fork into the bus tub?", 1),
    ("Small talk, so I just answer.", None, "I'm fine, thanks!", 1),
    ("A greeting, so I just answer.", None, None, -1),  # chat without a reply
    ("Waiting for 'put the fork into the bus tub' to finish.", None, None, 1),
    ("The user said \"That's all\": nothing more to do.", None, "You're welcome!", 1),
    ("I heard \"I'll put the fork away myself\".", None, None, 0),  # the user's words, not a stated action
    ("Hmm.", None, None, 0),
])
def test_consistency_rules(thought, plan, reply, expected):
    assert judge_consistency(fmt.ModelOutput(thought, plan, reply)) == expected
    assert consistency_reward([None], [out(thought, plan, reply)]) == [float(expected)]


def test_consistency_reward_of_a_malformed_completion_is_zero():
    assert consistency_reward([None] * len(MALFORMED), MALFORMED) == [0.0] * len(MALFORMED)


def test_model_judge_through_the_backend_interface():
    judge = ModelJudge(ModelConfig(backend="scripted", outputs=("+1", "The answer is -1.", "no idea", "0")))
    prompt = [{"role": "user", "content": [{"type": "text", "text": "<|human_start|>clear the table<|human_end|>"}]}]
    scores = judge([prompt] * 5, [RIGHT, RIGHT, RIGHT, MALFORMED[1], RIGHT])
    # +1, -1, unparseable -> 0, malformed completion -> 0 without a call, then "0".
    assert scores == [1.0, -1.0, 0.0, 0.0, 0.0]
    asked = judge._get_backend().prompts[-1]
    assert "clear the table" in asked[-1].text and "put the red cup into the bus tub" in asked[-1].text
    judge.close()


def test_reward_set_weights_and_names():
    rs = RewardSet.build({"format": 1.0, "action": 2.0, "consistency": 0.5, "judge": 0.0})
    assert rs.names == ["format_reward", "action_reward", "consistency_reward"]
    total = rs.score([None] * 3, [RIGHT, WRONG, MALFORMED[1]], acceptable=[[ACCEPT[0]]] * 3)
    assert total == [1.0 + 2.0 + 0.5, 1.0 + 0.0 + 0.5, 0.0]
    with pytest.raises(ValueError, match="judge_model"):
        RewardSet.build({"judge": 1.0})
    with pytest.raises(ValueError, match="unknown reward"):
        RewardSet.build({"style": 1.0})
    with pytest.raises(ValueError, match="at least one"):
        RewardSet.build({"format": 0.0})
    judged = RewardSet.build({"format": 1.0, "judge": 1.0}, ModelConfig(backend="scripted", outputs=("-1",)))
    assert judged.names == ["format_reward", "model_judge"] and judged.score([None], [RIGHT]) == [0.0]


# --------------------------------------------------------------------------- variance filter


def test_variance_filter_keeps_prompts_whose_samples_differ():
    rows = [{"prompt": f"p{i}", "acceptable": [ACCEPT[0]], "kind": "act"} for i in range(4)]
    # p0: all right; p1: all wrong (malformed); p2: mixed; p3: right/wrong plans (format equal, action differs).
    samples = {"p0": [RIGHT] * 4, "p1": [MALFORMED[1]] * 4, "p2": [RIGHT, MALFORMED[1], RIGHT, RIGHT],
               "p3": [RIGHT, WRONG, WRONG, WRONG]}
    calls = []

    def sampler(row, k):
        calls.append((row["prompt"], k))
        return samples[row["prompt"]][:k]

    rewards = RewardSet.build({"format": 1.0, "action": 1.0, "consistency": 0.0})
    keep, report = variance_filter(rows, sampler, rewards.score, k=4, progress=False)
    assert keep == [2, 3]
    assert calls == [("p0", 4), ("p1", 4), ("p2", 4), ("p3", 4)]
    assert (report.candidates, report.kept, report.all_equal) == (4, 2, 2)
    assert report.equal_levels == {"2": 1, "0": 1}
    assert "kept 2 of 4 prompts" in report.line()


def test_select_varied_threshold_and_errors():
    keep, report = select_varied([[1.0, 1.0 + 1e-9], [0.0, 1.0], [0.5, 0.5]], k=2, min_std=1e-6)
    assert keep == [1] and report.kept == 1 and report.all_equal == 2
    with pytest.raises(ValueError, match="returned 1 completions"):
        variance_filter([{"prompt": "p", "acceptable": [""]}], lambda row, k: [RIGHT], format_reward, k=2,
                        progress=False)
