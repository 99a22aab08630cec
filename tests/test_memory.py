"""The planner's memory: whole text, only the newest N images, a token budget, a stable prompt prefix."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from robix_planner import format as fmt
from robix_planner import skills
from robix_planner.backends.base import ImagePart, Prompt
from robix_planner.config import ConfigError
from robix_planner.memory import Memory, MemoryConfig, estimate_tokens
from robix_planner.messages import Capabilities

CAPS = Capabilities(robot="test", skills=list(skills.TABLETOP_SKILLS), objects=["red cup", "fork"],
                    receptacles=["bus tub"])


def step_input(i: int) -> fmt.StepInput:
    return fmt.StepInput(utterances=(f"utterance {i}",), outcomes=(fmt.Outcome("pick up the fork", "succeeded"),),
                         holding="fork", images=(ImagePart(np.full((2, 2, 3), i % 256, np.uint8)),))


def output(i: int) -> fmt.ModelOutput:
    return fmt.ModelOutput(f"thought {i}", plan="put the fork into the bus tub", reply=f"reply {i}")


def flat(prompt: Prompt) -> list:
    """The prompt as a sequence of text characters and image identities (what a KV cache sees)."""
    seq: list = []
    for m in prompt:
        seq.append(f"<{m.role}>")
        for part in m.content:
            if isinstance(part, str):
                seq.extend(part)
            else:
                seq.append(("image", id(part.pixels)))
    return seq


def common_prefix(a: list, b: list) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def without_placeholders(prompt: Prompt) -> list[str]:
    return [m.text.replace(fmt.IMAGE_DROPPED, "") for m in prompt]


def run(memory: Memory, steps: int) -> list[Prompt]:
    inputs = [step_input(i) for i in range(steps)]
    prompts = []
    for i, inp in enumerate(inputs):
        prompts.append(memory.prompt(CAPS, inp))
        memory.append(inp, output(i))
    return prompts


def test_text_is_kept_whole_and_only_the_newest_images_are_shown():
    memory = Memory(MemoryConfig(max_images=4, image_drop_batch=2, token_budget=0))
    prompts = run(memory, 30)
    last = prompts[-1]
    text = "".join(m.text for m in last)
    for i in range(29):  # every utterance, thought, command and reply is still there
        assert f"utterance {i}" in text and f"thought {i}" in text and f"reply {i}" in text
    assert "utterance 29" in text  # the current step
    assert text.count("Command 'pick up the fork' succeeded.") == 30
    for p in prompts:
        shown = [m for m in p if m.images]
        assert len(shown) <= 4
        # The images shown are those of the newest steps, the current one always among them.
        assert shown and shown[-1] is p[-1]
    assert 3 <= len([m for m in last if m.images]) <= 4
    assert text.count(fmt.IMAGE_DROPPED) == 30 - len([m for m in last if m.images])


def test_the_prompt_only_grows_at_its_end_except_when_images_are_dropped_in_batches():
    memory = Memory(MemoryConfig(max_images=4, image_drop_batch=2, token_budget=0))
    prompts = run(memory, 20)
    flats = [flat(p) for p in prompts]
    breaks = []
    for k in range(len(prompts) - 1):
        a, b = flats[k], flats[k + 1]
        if b[:len(a)] != a:
            breaks.append(k + 1)
            # A break is an old image replaced by the placeholder; everything before it is reused.
            n = common_prefix(a, b)
            assert isinstance(a[n], tuple) and "".join(x for x in b[n:n + len(fmt.IMAGE_DROPPED)]) == fmt.IMAGE_DROPPED
    # With 4 images dropped 2 at a time, the prefix breaks once every 2 steps after the first 4.
    assert breaks == list(range(4, 20, 2))
    # A sliding window (batch 1) would break it at every step: the batches halve the breaks.
    sliding = Memory(MemoryConfig(max_images=4, image_drop_batch=1, token_budget=0))
    sflats = [flat(p) for p in run(sliding, 20)]
    assert sum(sflats[k + 1][:len(sflats[k])] != sflats[k] for k in range(19)) == 16


def test_over_the_budget_images_go_first_and_the_text_is_never_dropped(caplog):
    cfg = MemoryConfig(max_images=4, image_drop_batch=1, token_budget=0, image_tokens=1000)
    unlimited = run(Memory(cfg), 6)[-1]
    text_tokens = estimate_tokens(unlimited, image_tokens=0)
    # A budget with room for the text and two images: the two newest stay.
    memory = Memory(MemoryConfig(max_images=4, image_drop_batch=1, token_budget=text_tokens + 2100, image_tokens=1000))
    prompt = run(memory, 6)[-1]
    assert [i for i, m in enumerate(prompt) if m.images] == [len(prompt) - 3, len(prompt) - 1]
    assert without_placeholders(prompt) == without_placeholders(unlimited)
    # A budget smaller than the text: the text stays whole, the current view stays, and a warning says so.
    tight = Memory(MemoryConfig(max_images=4, image_drop_batch=1, token_budget=10, image_tokens=1000))
    with caplog.at_level(logging.WARNING, logger="robix_planner.memory"):
        prompt = run(tight, 6)[-1]
    assert without_placeholders(prompt) == without_placeholders(unlimited)
    assert [m for m in prompt if m.images] == [prompt[-1]]
    assert "over memory.token_budget=10" in caplog.text and "text is kept whole" in caplog.text


def test_a_dropped_image_is_never_shown_again():
    memory = Memory(MemoryConfig(max_images=2, image_drop_batch=1, token_budget=0))
    run(memory, 5)
    assert memory.image_horizon == 3  # steps 3 and 4 show theirs
    # A step without an image does not bring old images back.
    prompt = memory.prompt(CAPS, fmt.StepInput(utterances=("hello",)))
    assert memory.image_horizon == 3
    assert [m for m in prompt if m.images] == [prompt[-5], prompt[-3]]


def test_reset_forgets_the_session():
    memory = Memory()
    run(memory, 3)
    memory.reset()
    assert len(memory) == 0 and memory.image_horizon == 0
    prompt = memory.prompt(CAPS, step_input(7))
    assert [m.role for m in prompt] == ["system", "user"]


def test_append_refuses_an_output_that_cannot_be_written_back():
    with pytest.raises(fmt.FormatError):
        Memory().append(fmt.StepInput(), fmt.ModelOutput(""))


@pytest.mark.parametrize("cfg", [dict(max_images=0), dict(max_images=2, image_drop_batch=3), dict(image_drop_batch=0),
                                 dict(token_budget=-1)])
def test_bad_memory_configs_say_what_to_change(cfg):
    with pytest.raises(ConfigError, match="memory."):
        Memory(MemoryConfig(**cfg))
