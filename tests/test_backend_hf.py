"""The ``hf`` backend on a tiny random Qwen2.5-VL built from config (tests/helpers_tiny_vlm.py).

The checkpoint is saved to disk and loaded the way a user's local Qwen2.5-VL-3B is: through
AutoProcessor / AutoModelForImageTextToText from local files. Outputs are random-model nonsense;
the tests compare them with transformers' own ``generate`` and with each other (cached vs full
recompute, chunked vs whole prefill, image A vs image B, adapter vs base).
"""

from __future__ import annotations

import shutil
import sys
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
    cancel_after_forwards,
    set_eos_tokens,
)

from robix_planner.backends import load_backend  # noqa: E402
from robix_planner import format as fmt  # noqa: E402
from robix_planner.backends.base import BackendError, ChatMessage, ImagePart, ModelConfig  # noqa: E402
from robix_planner.config import ConfigError  # noqa: E402

WAIT_S = 10.0


@pytest.fixture(scope="module", autouse=True)
def _one_thread(torch_one_thread):
    pass


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

    messages, parts = fmt.to_hf_messages(prompt)
    pil = [Image.fromarray(p.pixels) for p in parts]
    cont = prompt[-1].role == "assistant"
    text = b.processor.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=not cont, continue_final_message=cont
    )
    return b.processor(text=[text], images=pil or None, return_tensors="pt")


_STOCK: dict = {}


def stock_model(path):
    """The checkpoint loaded by transformers alone (stock ``sdpa`` attention, no backend hooks)."""
    from transformers import AutoModelForImageTextToText

    if path not in _STOCK:
        _STOCK[path] = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True).eval()
    return _STOCK[path]


def reference_ids(b, prompt, max_new_tokens: int) -> list[int]:
    """transformers' own greedy ``generate`` on the same checkpoint and chat template."""
    inputs = prompt_inputs(b, prompt)
    model = stock_model(b.config.path)
    assert model.config._attn_implementation == "sdpa"
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    ids = out[0, inputs["input_ids"].shape[1] :].tolist()
    stop = set(model.generation_config.eos_token_id)
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
    assert b.model.config._attn_implementation == "robix_cpu_sdpa"  # the CPU attention (reference: stock sdpa)
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
    k = 6
    forwards, at_cancel, deltas = cancel_after_forwards(b, monkeypatch, episode(1), k=k, wait_s=WAIT_S)
    assert forwards - at_cancel <= 1  # at most the step in flight finishes
    s = b.last_stats
    assert s.cancelled and s.extra["stop"] == "cancel"
    assert s.new_tokens <= at_cancel  # each token needs a forward call begun before the cancel
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


def test_chunked_prefill_matches_one_pass_and_never_splits_an_image(tiny_path, monkeypatch):
    whole = run(backend(tiny_path, prefix_cache=False, prefill_chunk_tokens=4096), episode(3))[1]
    # smaller than an image (8 placeholder tokens): images go whole
    b = backend(tiny_path, prefix_cache=False, prefill_chunk_tokens=5)
    pieces = []
    forward = b.model.forward

    def counted(*args, **kwargs):
        pieces.append(kwargs["input_ids"].shape[1])  # tokens fed in this forward call
        return forward(*args, **kwargs)

    monkeypatch.setattr(b.model, "forward", counted)
    assert run(b, episode(3))[1] == whole
    s = b.last_stats
    steps = s.new_tokens - (s.extra["stop"] == "length")  # one forward per generated token but the last
    assert sum(pieces[: len(pieces) - steps]) == s.prompt_tokens
    assert max(pieces) == 8 and pieces.count(8) == 3  # the three images, whole; the text in pieces of <= 5
    with pytest.raises(ConfigError, match="prefill_chunk_tokens"):
        backend(tiny_path, prefill_chunk_tokens=0)


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


# ---------------------------------------------------------------------- cancel inside the forward pass


def text_layers(b):
    return list(b.model.model.language_model.layers)


def cache_lengths(b) -> set[int]:
    return {layer.get_seq_length() for layer in b._cache.layers}


def test_a_cancel_from_another_thread_during_prefill_stops_within_one_layer(tiny_path):
    """The whole prompt is one forward call; a cancel while layer 0 runs stops it before layer 1."""
    b = backend(tiny_path, prefix_cache=False, prefill_chunk_tokens=4096)
    layers = text_layers(b)
    ran, in_layer, cancel, cancelled = [], threading.Event(), threading.Event(), threading.Event()
    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda m, a, i=i: ran.append(i) and None)

    def slow_layer_0(module, args, output):  # layer 0 "runs" until the other thread has cancelled
        in_layer.set()
        assert cancelled.wait(WAIT_S)

    layers[0].register_forward_hook(slow_layer_0)

    def canceller():
        assert in_layer.wait(WAIT_S)
        cancel.set()
        cancelled.set()

    t = threading.Thread(target=canceller)
    t.start()
    assert list(b.generate(episode(2), cancel=cancel)) == []
    t.join(WAIT_S)
    assert ran == [0]  # layer 1 never started: the cancel landed inside the forward call
    s = b.last_stats
    assert s.cancelled and s.extra["stop"] == "cancel" and s.new_tokens == 0


def test_a_cancel_lands_inside_an_attention_call_over_a_cached_prefix(tiny_path):
    """A prefill piece after a cached prefix is attended in slices of query rows, with a cancel point between."""
    b = backend(tiny_path, prefill_chunk_tokens=4096)
    run(b, episode(2))
    attention = text_layers(b)[0].self_attn
    finished, cancel = [], threading.Event()
    attention.register_forward_pre_hook(lambda m, a: cancel.set())  # cancelled as layer 0's attention starts
    attention.register_forward_hook(lambda m, a, o: finished.append(1))
    assert list(b.generate(episode(3), cancel=cancel)) == []
    assert b.last_stats.prompt_tokens - b.last_stats.cached_tokens > 32  # more than one slice to attend
    assert finished == []  # the attention call itself was cut short
    assert b.last_stats.cancelled


def test_a_cancel_lands_between_the_projections_of_one_mlp(tiny_path):
    """The longest stretch without a cancel point is one projection: a cancel set while layer 0's
    MLP computes its first projection stops the forward call before the second."""
    b = backend(tiny_path, prefix_cache=False, prefill_chunk_tokens=4096)
    mlp = text_layers(b)[0].mlp
    ran, cancel = [], threading.Event()
    for name in ("gate_proj", "up_proj", "down_proj"):
        getattr(mlp, name).register_forward_hook(lambda m, a, o, name=name: ran.append(name))
    mlp.gate_proj.register_forward_hook(lambda m, a, o: cancel.set())
    assert list(b.generate(episode(2), cancel=cancel)) == []
    assert ran == ["gate_proj"]
    assert b.last_stats.cancelled and b.last_stats.new_tokens == 0


def test_the_cache_is_consistent_after_a_cancelled_prefill_and_decoding_step(tiny_path):
    b = backend(tiny_path, prefill_chunk_tokens=4096, max_new_tokens=12)
    fresh = backend(tiny_path, prefix_cache=False, max_new_tokens=12)
    run(b, episode(2))
    layer_1 = text_layers(b)[1]
    cancel = threading.Event()
    hook = layer_1.register_forward_pre_hook(lambda m, a: cancel.set())  # layer 0 has appended the suffix
    assert list(b.generate(episode(3), cancel=cancel)) == []
    hook.remove()
    cached = b.last_stats.cached_tokens  # the part of episode(2)'s cache that episode(3) starts with
    assert cached > 0 and len(b._tags) == cached
    assert cache_lengths(b) == {cached}  # the suffix was cropped from layer 0 again: every layer alike
    _, text = run(b, episode(3))
    assert b.last_stats.cached_tokens == cached  # what was cached before the cancel is still used
    assert text == run(fresh, episode(3))[1]
    # A cancel inside a decoding step: the step's token is dropped from every layer.
    steps, cancel = [], threading.Event()

    def on_layer_1(module, args):
        if args[0].shape[1] == 1:  # a decoding step (one token)
            steps.append(1)
            if len(steps) == 3:
                cancel.set()

    hook = layer_1.register_forward_pre_hook(on_layer_1)
    deltas = list(b.generate(episode(4), cancel=cancel))
    hook.remove()
    assert b.last_stats.cancelled and b.last_stats.new_tokens == 3 and deltas
    assert cache_lengths(b) == {len(b._tags)}
    assert run(b, episode(4))[1] == run(fresh, episode(4))[1]
    assert run(b, episode(5))[1] == run(fresh, episode(5))[1]


# ---------------------------------------------------------------------- incremental encoding


def full_encoding(b, prompt) -> dict:
    """The processor's inputs for the whole prompt at once (as transformers builds them)."""
    return dict(prompt_inputs(b, prompt))


def assert_same_encoding(b, enc, prompt) -> None:
    want = full_encoding(b, prompt)
    assert enc.ids == want["input_ids"][0].tolist()
    if "mm_token_type_ids" in want:
        assert enc.arrays["mm_token_type_ids"] == want["mm_token_type_ids"][0].tolist()
    pixels = torch.cat([inputs["pixel_values"] for _, _, inputs in enc.spans])
    assert torch.equal(pixels, want["pixel_values"])
    if "image_grid_thw" in want:
        assert torch.equal(torch.cat([inputs["image_grid_thw"] for _, _, inputs in enc.spans]), want["image_grid_thw"])


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "llava"])
def test_incremental_encoding_equals_a_full_encoding_and_processes_only_new_pieces(arch, tiny_path, tmp_path,
                                                                                 monkeypatch):
    from robix_planner import format as fmt

    path = tiny_path if arch == "qwen2_5_vl" else build_tiny_llava(tmp_path / "llava")
    b = backend(path)
    encoder = b._encoder
    processed = []
    image_processor = type(b.processor.image_processor)
    call = image_processor.__call__
    monkeypatch.setattr(image_processor, "__call__", lambda self, images, **kw: processed.append(len(images))
                        or call(self, images, **kw))
    for steps in range(1, 6):
        processed.clear()
        enc = encoder.encode(episode(steps))
        images_processed = list(processed)
        assert_same_encoding(b, enc, episode(steps))
        if steps > 1:
            assert enc.mode == "incremental"
            assert images_processed == [1]  # only the new step's image; the others' pixels come from the cache
    # A prompt that changes in the middle (an old image no longer shown) is still encoded exactly.
    changed = episode(5)
    changed[1] = ChatMessage("user", ("Your current views are", fmt.IMAGE_DROPPED, "step 0: clear the table"))
    processed.clear()
    enc = encoder.encode(changed)
    assert enc.mode == "incremental" and processed == []  # no new image
    assert_same_encoding(b, enc, changed)
    # And the model's answer with it equals a full recompute.
    assert run(b, changed)[1] == run(backend(path, prefix_cache=False), changed)[1]


def test_a_processor_whose_pieces_differ_is_encoded_whole(tiny_path, monkeypatch, caplog):
    import re

    from robix_planner.backends import hf

    # Cutting inside words changes byte-level BPE tokens: the check must notice and fall back.
    monkeypatch.setattr(hf, "_piece_splitter", lambda tokenizer: re.compile("e"))
    b = backend(tiny_path, max_new_tokens=12)
    with caplog.at_level("WARNING", logger="robix_planner.backends.hf"):
        first = run(b, episode(1))[1]
    assert b.last_stats.extra["encoding"] == "full"
    assert "differs from a full encoding" in caplog.text
    second = run(b, episode(2))[1]
    assert b.last_stats.extra["encoding"] == "full" and b.last_stats.cached_tokens > 0
    assert first == decode(b, reference_ids(b, episode(1), 12))
    assert second == decode(b, reference_ids(b, episode(2), 12))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")
def test_the_thread_running_the_model_is_lowered_to_nice(tiny_path):
    import os

    def nice_after_generating(b) -> tuple[int, int]:
        seen = []

        def work():
            tid = threading.get_native_id()
            before = os.getpriority(os.PRIO_PROCESS, tid)
            run(b, episode(1))
            seen.append((before, os.getpriority(os.PRIO_PROCESS, tid)))

        t = threading.Thread(target=work)
        t.start()
        t.join(WAIT_S)
        return seen[0]

    before, after = nice_after_generating(backend(tiny_path, nice=7, max_new_tokens=2))
    assert after == max(before, 7)  # only this thread, and never raised back
    before, after = nice_after_generating(backend(tiny_path, nice=0, max_new_tokens=2))
    assert after == before
    with pytest.raises(ConfigError, match="model.nice"):
        backend(tiny_path, nice=20)


# ---------------------------------------------------------------------- keys and values in bfloat16


def test_keys_and_values_can_be_cached_in_bfloat16_on_cpu(tiny_path):
    from robix_planner.backends.hf import _new_cache

    cached = backend(tiny_path, kv_cache_dtype="bfloat16", max_new_tokens=12)
    fresh = backend(tiny_path, kv_cache_dtype="bfloat16", max_new_tokens=12, prefix_cache=False)
    assert cached.kv_dtype == torch.bfloat16 and backend(tiny_path).kv_dtype is None
    for steps in (1, 2, 3):  # prefix reuse still answers as a full recompute does
        prompt = episode(steps)
        assert run(cached, prompt)[1] == run(fresh, prompt)[1], f"step {steps}"
    assert cached.last_stats.cached_tokens > 0
    assert {layer.keys.dtype for layer in cached._cache.layers} == {torch.bfloat16}
    assert next(cached.model.parameters()).dtype == torch.float32  # only the cache changed

    # The next-token logits stay near the float32 model's (transformers alone, stock attention).
    inputs = prompt_inputs(cached, episode(3))
    with torch.no_grad():
        want = stock_model(tiny_path)(**inputs).logits[0, -1]
        cache = {cached._cache_kw: _new_cache(cached._hf_config, torch.bfloat16)}
        got = cached.model(**inputs, **cache).logits[0, -1]
    assert got.dtype == torch.float32
    err = (got - want).abs().max().item()
    assert 0 < err < 0.05 * want.std().item(), err


def test_kv_cache_dtype_is_checked(tiny_path, monkeypatch):
    from robix_planner.backends import hf

    with pytest.raises(ConfigError, match="kv_cache_dtype"):
        backend(tiny_path, kv_cache_dtype="int8")
    with pytest.raises(ConfigError, match="CPU attention"):  # e.g. a model on a GPU
        hf._kv_cache_dtype("bfloat16", torch.float32, cpu_attention=False)
    assert hf._kv_cache_dtype("bfloat16", torch.bfloat16, cpu_attention=False) is None  # the model's own
    assert hf._kv_cache_dtype("float32", torch.float32, cpu_attention=True) is None
    for native, want in ((True, torch.bfloat16), (False, None)):
        monkeypatch.setattr(hf, "_native_bfloat16", lambda: native)
        assert hf._kv_cache_dtype("auto", torch.float32, cpu_attention=True) is want
        assert hf._kv_cache_dtype("auto", torch.bfloat16, cpu_attention=True) is None
        assert hf._kv_cache_dtype("auto", torch.float32, cpu_attention=False) is None


# ---------------------------------------------------------------------- plans constrained to the grammar


CHOICES = ["put the red cup into the bus tub", "put the red cup into the basket", "pick up the red cup",
           "pick up the apple", "stop"]


def continued_plan(steps: int = 1) -> list[ChatMessage]:
    """An episode whose answer is continued right after the plan tag: the model writes the plan."""
    return episode(steps) + [ChatMessage("assistant", ("<|think_start|>the cup<|think_end|><|plan_start|>",))]


def plan_of(text: str) -> str:
    assert "<|plan_end|>" in text, text
    return text.split("<|plan_end|>")[0]


def test_a_plan_is_decoded_within_the_given_choices(tiny_path):
    free = backend(tiny_path, max_new_tokens=40)
    _, text = run(free, continued_plan())
    assert "<|plan_end|>" not in text or plan_of(text) not in CHOICES  # a random model writes no command
    for seed, temperature in ((0, 0.0), (1, 1.0), (2, 1.0)):
        b = backend(tiny_path, max_new_tokens=40, temperature=temperature, seed=seed)
        deltas = list(b.generate(continued_plan(), cancel=threading.Event(), plan_choices=CHOICES))
        assert plan_of("".join(deltas)) in CHOICES
    # Free text again after the plan: the same model, unconstrained, goes on writing.
    assert len("".join(deltas).split("<|plan_end|>")[1]) > 0
    off = backend(tiny_path, max_new_tokens=40, constrain_plans=False)
    assert run(off, continued_plan())[1] == text  # model.constrain_plans: false ignores the choices
    assert "".join(off.generate(continued_plan(), cancel=threading.Event(), plan_choices=CHOICES)) == text


def test_plan_choices_need_single_token_tags(tiny_path, monkeypatch, caplog):
    from robix_planner.backends import hf

    b = backend(tiny_path)
    trie, start = hf._plan_trie(b.tokenizer, tuple(CHOICES))
    assert start == b.tokenizer.convert_tokens_to_ids("<|plan_start|>")
    end = b.tokenizer.convert_tokens_to_ids("<|plan_end|>")
    node = trie
    for t in b.tokenizer.encode("stop", add_special_tokens=False):
        node = node[t]
    assert node == {end: {}}
    monkeypatch.setattr(hf.fmt, "PLAN_START", "<plan>")  # a tag the tokenizer splits
    with caplog.at_level("WARNING"):
        assert hf._plan_trie(b.tokenizer, tuple(CHOICES)) is None
    assert "not one token" in caplog.text
