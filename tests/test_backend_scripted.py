"""The scripted backend: replays outputs or asks a function, streams them in pieces, honours cancel."""

from __future__ import annotations

import threading
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from robix_planner.backends import load_backend
from robix_planner.backends.base import BackendError, ChatMessage, ModelConfig
from robix_planner.backends.scripted import ScriptedBackend, split_chunks
from robix_planner.config import ConfigError

STEP = ("<|think_start|>The red cup is on the table.<|think_end|>"
        "<|plan_start|>put the red cup into the bus tub<|plan_end|><|response_start|>On it.<|response_end|>")
PROMPT = [ChatMessage("system", ("You are a robot.",)), ChatMessage("user", ("clear the table",))]


def run(backend, prompt=PROMPT, cancel=None) -> list[str]:
    return list(backend.generate(prompt, cancel=cancel or threading.Event()))


@given(st.lists(st.sampled_from(list("ab <|>_\n\t") + ["<|plan_start|>", "<|think_end|>"]), max_size=40))
def test_pieces_concatenate_to_the_text(parts):
    text = "".join(parts)
    assert "".join(split_chunks(text)) == text


def test_tags_are_pieces_of_their_own_and_words_carry_their_leading_space():
    pieces = split_chunks("<|plan_start|>pick up the cup<|plan_end|>")
    assert pieces == ["<|plan_start|>", "pick", " up", " the", " cup", "<|plan_end|>"]


def test_replays_one_output_per_call_and_repeats_the_last():
    backend = load_backend(ModelConfig(backend="scripted", outputs=("first answer", STEP)))
    assert isinstance(backend, ScriptedBackend)
    first = run(backend)
    assert first == ["first", " answer"]
    for _ in range(2):
        pieces = run(backend)
        assert "".join(pieces) == STEP and len(pieces) > 10
    assert backend.calls == 3 and len(backend.prompts) == 3 and backend.prompts[-1] is PROMPT
    stats = backend.last_stats
    assert stats.new_tokens == len(split_chunks(STEP)) and stats.prompt_tokens == 7 and not stats.cancelled


def test_no_outputs_is_a_config_error_that_says_what_to_set():
    with pytest.raises(ConfigError, match="model.outputs"):
        load_backend(ModelConfig(backend="scripted"))


def test_respond_function_gets_the_prompt():
    seen = []

    def oracle(prompt):
        seen.append(prompt[-1].text)
        return f"<|response_start|>you said: {prompt[-1].text}<|response_end|>"

    backend = ScriptedBackend(ModelConfig(), respond=oracle)
    assert "".join(run(backend)) == "<|response_start|>you said: clear the table<|response_end|>"
    assert seen == ["clear the table"]


@pytest.mark.parametrize("respond, message", [
    (lambda prompt: 1 / 0, "ZeroDivisionError"),
    (lambda prompt: None, "returned NoneType"),
])
def test_a_failing_respond_function_is_a_backend_error(respond, message):
    backend = ScriptedBackend(ModelConfig(), respond=respond)
    with pytest.raises(BackendError, match=message):
        run(backend)


def test_cancel_before_the_next_piece_stops_the_stream():
    backend = ScriptedBackend(ModelConfig(outputs=(STEP,)))
    cancel = threading.Event()
    got = []
    for piece in backend.generate(PROMPT, cancel=cancel):
        got.append(piece)
        if len(got) == 3:
            cancel.set()
    assert len(got) == 3
    assert backend.last_stats.cancelled and backend.last_stats.new_tokens == 3


def test_cancel_interrupts_the_wait_between_pieces():
    backend = ScriptedBackend(ModelConfig(outputs=(STEP,), chunk_delay_s=5.0))
    cancel = threading.Event()
    stream = backend.generate(PROMPT, cancel=cancel)
    assert next(stream) == "<|think_start|>"  # the first piece comes without delay
    timer = threading.Timer(0.05, cancel.set)
    timer.start()
    t0 = time.monotonic()
    assert list(stream) == []
    assert time.monotonic() - t0 < 2.0  # far less than the 5 s delay: the wait was cut short
    timer.join()
    assert backend.last_stats.cancelled


def test_chunk_delay_paces_the_stream():
    backend = ScriptedBackend(ModelConfig(outputs=("a b c d e",), chunk_delay_s=0.02))
    t0 = time.monotonic()
    assert run(backend) == ["a", " b", " c", " d", " e"]
    assert time.monotonic() - t0 >= 4 * 0.02
    assert backend.last_stats.decode_ms >= 4 * 20 * 0.9
