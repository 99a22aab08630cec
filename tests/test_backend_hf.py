"""The ``hf`` backend on a tiny random Qwen2.5-VL built from config (tests/helpers_tiny_vlm.py).

The checkpoint is saved to disk and loaded the way a user's local Qwen2.5-VL-3B is: through
AutoProcessor / AutoModelForImageTextToText from local files. Outputs are random-model nonsense;
the tests compare them with transformers' own ``generate`` and with each other (cached vs full
recompute, chunked vs whole prefill, image A vs image B, adapter vs base).
"""

from __future__ import annotations

import shutil
import threading

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
np = pytest.importorskip("numpy")

from helpers_tiny_vlm import (  # noqa: E402
    ROBIX_TAGS,
    build_lora_adapter,
    build_tiny_llava,
    build_tiny_qwen_vl,
    set_eos_tokens,
)

from robix_planner.backends import load_backend  # noqa: E402
from robix_planner.backends.base import BackendError, ChatMessage, ImagePart, ModelConfig  # noqa: E402
from robix_planner.config import ConfigError  # noqa: E402

WAIT_S = 10.0


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return build_tiny_qwen_vl(tmp_path_factory.mktemp("tiny_qwen_vl"))


def backend(path, **kw):
    kw.setdefault("max_new_tokens", 16)
    return load_backend(ModelConfig(backend="hf", path=str(path), **kw))


def image(seed: int, shape=(40, 60, 3)) -> ImagePart:
    return ImagePart(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8))


def episode(steps: int) -> list[ChatMessage]:
    """A planner-like prompt: system, then per step a user turn (new view + utterance) and the answer."""
    msgs = [ChatMessage("system", ("You are a robot. Skills: pick up the X, put the X into the Y.",))]
    for i in range(steps):
        msgs.append(ChatMessage("user", ("Your current views are", image(100 + i), f"step {i}: clear the table")))
        if i < steps - 1:
            msgs.append(
                ChatMessage(
                    "assistant",
                    (
                        f"<|think_start|>the cup is on the table {i}<|think_end|>"
                        "<|plan_start|>pick up the cup<|plan_end|>",
                    ),
                )
            )
    return msgs


def run(b, prompt, cancel=None) -> tuple[list[str], str]:
    deltas = list(b.generate(prompt, cancel=cancel or threading.Event()))
    return deltas, "".join(deltas)


def prompt_inputs(b, prompt):
    """The processor's inputs for ``prompt``, built directly with transformers (not via the backend)."""
    from PIL import Image

    messages, pil = [], []
    for m in prompt:
        content = []
        for p in m.content:
            if isinstance(p, ImagePart):
                content.append({"type": "image"})
                pil.append(Image.fromarray(p.pixels))
            else:
                content.append({"type": "text", "text": p})
        messages.append({"role": m.role, "content": content})
    cont = prompt[-1].role == "assistant"
    text = b.processor.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=not cont, continue_final_message=cont
    )
    return b.processor(text=[text], images=pil or None, return_tensors="pt")


def reference_ids(b, prompt, max_new_tokens: int) -> list[int]:
    """transformers' own greedy ``generate`` on the same checkpoint and chat template."""
    inputs = prompt_inputs(b, prompt)
    out = b.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    ids = out[0, inputs["input_ids"].shape[1] :].tolist()
    stop = set(b.model.generation_config.eos_token_id)
    return ids[: next((i for i, t in enumerate(ids) if t in stop), len(ids))]


def image_starts(b, prompt) -> list[int]:
    """Index of the first placeholder token of each image in the prompt's token ids."""
    ids = prompt_inputs(b, prompt)["input_ids"][0].tolist()
    tid = b.processor.image_token_id
    return [i for i, t in enumerate(ids) if t == tid and (i == 0 or ids[i - 1] != tid)]


def decode(b, ids) -> str:
    return b.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


# ---------------------------------------------------------------------- loading


def test_loads_a_local_checkpoint_through_the_auto_classes(tiny_path):
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    b = backend(tiny_path)
    assert isinstance(b.model, Qwen2_5_VLForConditionalGeneration)
    assert isinstance(b.processor, Qwen2_5_VLProcessor)  # without torchvision: loaded image-only
    assert type(b.processor.image_processor).__name__ == "Qwen2VLImageProcessorPil"
    for tag in ROBIX_TAGS:  # the output tags are single tokens of this tokenizer
        assert len(b.tokenizer.encode(tag, add_special_tokens=False)) == 1
    assert sum(f.stat().st_size for f in tiny_path.iterdir()) < 5_000_000


def test_streamed_deltas_join_to_the_greedy_output_of_transformers_generate(tiny_path):
    b = backend(tiny_path, max_new_tokens=24, prefix_cache=False)
    prompt = episode(2)
    deltas, text = run(b, prompt)
    ref = reference_ids(b, prompt, 24)
    assert len(ref) > 3, "the random model should not stop at once"
    assert text == decode(b, ref)
    assert len(deltas) > 1 and all(deltas)  # streamed in pieces, no empty deltas
    s = b.last_stats
    assert s.prompt_tokens > 0 and s.cached_tokens == 0 and s.new_tokens == len(ref)
    assert s.prefill_ms > 0 and s.decode_ms > 0 and not s.cancelled
    assert s.extra["images"] == 2


def test_a_final_assistant_turn_is_continued(tiny_path):
    b = backend(tiny_path, prefix_cache=False)
    prompt = episode(1) + [ChatMessage("assistant", ("<|think_start|>the cup",))]
    text = run(b, prompt)[1]
    assert text == decode(b, reference_ids(b, prompt, 16))
    assert text != run(b, episode(1))[1]


def test_max_new_tokens_is_respected(tiny_path):
    b = backend(tiny_path, max_new_tokens=3)
    _, text = run(b, episode(1))
    assert b.last_stats.new_tokens == 3 and b.last_stats.extra["stop"] == "length"
    assert text == decode(b, reference_ids(b, episode(1), 3))


def test_stops_at_an_end_of_sequence_token(tiny_path, tmp_path):
    ref = reference_ids(backend(tiny_path), episode(1), 16)
    # Declare the token greedy decoding emits 4th (first seen there) an end-of-sequence token.
    k = next(i for i in range(3, len(ref)) if ref[i] not in ref[:i])
    path = tmp_path / "eos"
    shutil.copytree(tiny_path, path)
    set_eos_tokens(path, [ref[k]])
    b = backend(path, max_new_tokens=16)
    _, text = run(b, episode(1))
    assert b.last_stats.extra["stop"] == "eos" and b.last_stats.new_tokens == k
    assert text == decode(b, ref[:k])


def test_missing_or_wrong_paths_say_what_to_set(tmp_path, tiny_path):
    with pytest.raises(ConfigError, match="needs model.path"):
        load_backend(ModelConfig(backend="hf"))
    with pytest.raises(ConfigError, match="model.path=.*not a directory"):
        backend(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="model.path"):
        backend(tmp_path / "empty")
    with pytest.raises(ConfigError, match="model.adapter=.*not a directory"):
        backend(tiny_path, adapter=str(tmp_path / "no_adapter"))
    with pytest.raises(ConfigError, match="model.dtype"):
        backend(tiny_path, dtype="float8")


def test_a_bad_image_is_a_backend_error(tiny_path):
    b = backend(tiny_path)
    bad = [ChatMessage("user", (ImagePart(np.zeros((8, 8), dtype=np.uint8)), "hi"))]
    with pytest.raises(BackendError, match=r"\(H, W, 3\) uint8"):
        run(b, bad)


# ---------------------------------------------------------------------- cancellation


def test_cancel_from_another_thread_stops_within_one_step(tiny_path, monkeypatch):
    b = backend(tiny_path, max_new_tokens=200, prefix_cache=False)
    calls, reached = [], threading.Event()
    k = 6
    forward = b.model.forward

    def counted(*args, **kwargs):
        calls.append(1)
        if len(calls) == k:
            reached.set()
        return forward(*args, **kwargs)

    monkeypatch.setattr(b.model, "forward", counted)
    cancel, at_cancel = threading.Event(), []

    def canceller():
        assert reached.wait(WAIT_S)
        at_cancel.append(len(calls))  # forward calls started when the cancel lands
        cancel.set()

    t = threading.Thread(target=canceller)
    t.start()
    deltas = list(b.generate(episode(1), cancel=cancel))
    t.join(WAIT_S)
    assert at_cancel, "the canceller never ran"
    assert len(calls) - at_cancel[0] <= 1  # at most the step in flight finishes
    s = b.last_stats
    assert s.cancelled and s.extra["stop"] == "cancel"
    assert s.new_tokens <= k  # nothing computed after the cancel is emitted
    assert len("".join(deltas)) < 200


def test_cancel_before_start_runs_no_forward(tiny_path, monkeypatch):
    b = backend(tiny_path)
    calls = []
    forward = b.model.forward
    monkeypatch.setattr(b.model, "forward", lambda *a, **kw: calls.append(1) or forward(*a, **kw))
    cancel = threading.Event()
    cancel.set()
    assert list(b.generate(episode(1), cancel=cancel)) == []
    assert calls == [] and b.last_stats.cancelled


def test_a_new_generation_supersedes_a_running_one(tiny_path):
    b = backend(tiny_path, max_new_tokens=40)
    old = b.generate(episode(1), cancel=threading.Event())
    next(old)
    _, text = run(b, episode(2))
    assert list(old) == []  # the old stream ends at its next step instead of corrupting the cache
    assert text == run(backend(tiny_path, max_new_tokens=40, prefix_cache=False), episode(2))[1]


# ---------------------------------------------------------------------- prefix reuse


def test_prefix_reuse_gives_the_same_output_as_a_full_recompute(tiny_path):
    cached = backend(tiny_path, max_new_tokens=12)
    fresh = backend(tiny_path, max_new_tokens=12, prefix_cache=False)
    suffixes, prev_prompt = [], 0
    for steps in range(1, 6):  # the history grows by one step (a new image + utterance) each time
        prompt = episode(steps)
        _, got = run(cached, prompt)
        s = cached.last_stats
        _, want = run(fresh, prompt)
        assert got == want, f"step {steps}"
        assert fresh.last_stats.cached_tokens == 0
        if steps > 1:
            assert s.cached_tokens >= prev_prompt  # the whole previous prompt was reused
            suffixes.append(s.prompt_tokens - s.cached_tokens)
        prev_prompt = s.prompt_tokens
    assert cached.last_stats.prompt_tokens > 3 * max(suffixes)
    assert max(suffixes) == min(suffixes)  # what is prefilled per step does not grow with history


def test_identical_prompt_is_answered_from_the_cache(tiny_path):
    b = backend(tiny_path)
    first = run(b, episode(2))[1]
    assert run(b, episode(2))[1] == first
    assert b.last_stats.cached_tokens == b.last_stats.prompt_tokens - 1  # one token fed for logits


def test_a_changed_image_is_not_reused_from_the_cache(tiny_path):
    b = backend(tiny_path)
    prompt_a = [ChatMessage("user", ("look", image(1), "what now?"))]
    prompt_b = [ChatMessage("user", ("look", image(2), "what now?"))]  # same size: same placeholder tokens
    out_a = run(b, prompt_a)[1]
    out_b = run(b, prompt_b)[1]
    assert b.last_stats.cached_tokens == image_starts(b, prompt_b)[0]
    assert out_b == run(backend(tiny_path, prefix_cache=False), prompt_b)[1]
    assert out_a != out_b  # the images matter to the output, so a wrong reuse would show
    # The same pixels in a new array are the same image: reused.
    same_a = [ChatMessage("user", ("look", ImagePart(image(1).pixels.copy()), "what now?"))]
    run(b, prompt_a)
    assert run(b, same_a)[1] == out_a
    assert b.last_stats.cached_tokens == b.last_stats.prompt_tokens - 1


def test_chunked_prefill_matches_one_pass_and_never_splits_an_image(tiny_path):
    whole = run(backend(tiny_path, prefix_cache=False), episode(3))[1]
    b = backend(tiny_path, prefix_cache=False)
    b.prefill_chunk_tokens = 5  # smaller than an image (9 placeholder tokens): images go whole
    assert run(b, episode(3))[1] == whole


# ---------------------------------------------------------------------- sampling and adapters


def test_sampling_is_seeded(tiny_path):
    greedy = run(backend(tiny_path, max_new_tokens=20), episode(1))[1]
    s0 = run(backend(tiny_path, max_new_tokens=20, temperature=1.0, seed=0), episode(1))[1]
    s0_again = run(backend(tiny_path, max_new_tokens=20, temperature=1.0, seed=0), episode(1))[1]
    s1 = run(backend(tiny_path, max_new_tokens=20, temperature=1.0, seed=1), episode(1))[1]
    assert s0 == s0_again
    assert len({greedy, s0, s1}) == 3


def test_a_peft_adapter_is_applied(tiny_path, tmp_path):
    pytest.importorskip("peft")
    adapter = build_lora_adapter(tiny_path, tmp_path / "adapter")
    base = run(backend(tiny_path, prefix_cache=False), episode(2))[1]
    b = backend(tiny_path, adapter=str(adapter))
    from peft import PeftModel

    assert isinstance(b.model, PeftModel)
    tuned = run(b, episode(2))[1]
    assert tuned != base
    # Prefix reuse works through the peft wrapper too.
    run(b, episode(1))
    assert run(b, episode(2))[1] == tuned and b.last_stats.cached_tokens > 0


def test_top_p_near_zero_is_greedy(tiny_path):
    greedy = run(backend(tiny_path, max_new_tokens=20), episode(1))[1]
    assert run(backend(tiny_path, max_new_tokens=20, temperature=1.0, top_p=1e-6, seed=3), episode(1))[1] == greedy


def test_a_cancelled_prefill_keeps_its_work_for_the_next_call(tiny_path, monkeypatch):
    b = backend(tiny_path)
    b.prefill_chunk_tokens = 16
    cancel, calls = threading.Event(), []
    forward = b.model.forward

    def counted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            cancel.set()  # the third prefill chunk is in flight
        return forward(*args, **kwargs)

    monkeypatch.setattr(b.model, "forward", counted)
    assert list(b.generate(episode(3), cancel=cancel)) == []
    assert len(calls) == 3 and b.last_stats.cancelled and b.last_stats.new_tokens == 0
    _, text = run(b, episode(3))
    assert b.last_stats.cached_tokens >= 3 * 9  # at least three chunks' worth (images go whole)
    assert text == run(backend(tiny_path, prefix_cache=False), episode(3))[1]


def test_another_architecture_llava_with_plain_positions(tmp_path):
    """LLaVA: 1-D positions and one pixel_values row per image; the same reuse guarantees."""
    path = build_tiny_llava(tmp_path / "llava")
    cached = backend(path, max_new_tokens=12)
    fresh = backend(path, max_new_tokens=12, prefix_cache=False)
    for steps in (1, 2, 3):
        got = run(cached, episode(steps))[1]
        want = run(fresh, episode(steps))[1]
        assert got == want == decode(fresh, reference_ids(fresh, episode(steps), 12))
    assert cached.last_stats.cached_tokens > 0
    # A changed image breaks the prefix at its first placeholder token.
    changed = episode(3)
    changed[3] = ChatMessage("user", ("Your current views are", image(7), "step 1: clear the table"))
    got = run(cached, changed)[1]
    assert got == run(fresh, changed)[1]
    assert cached.last_stats.cached_tokens == image_starts(fresh, changed)[1]
