"""robix-tiny: tokenizer, processor, model, save/load through the Auto classes, LoRA, the hf backend.

Every model here is a tiny random robix-tiny built from config (64 wide, 2 layers, 32x48-pixel
images, 6 visual tokens each); nothing is downloaded.
"""

from __future__ import annotations

import threading

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
np = pytest.importorskip("numpy")

from helpers_tiny_vlm import cancel_after_forwards  # noqa: E402
from robix_planner import format as fmt  # noqa: E402
from robix_planner.backends import load_backend  # noqa: E402
from robix_planner.backends.base import ChatMessage, ImagePart, ModelConfig  # noqa: E402

WAIT_S = 10.0

CORPUS = [
    "You are Robix, the high-level planner of a robot arm that works at a table with people.",
    "Command 'put the red cup into the bus tub' succeeded.\nThe gripper holds nothing.\nYour current views are",
    "The table has a red cup, a blue plate and a cola. I will put the red cup into the bus tub next.",
    "Please clear the table. Thanks! Now the fork. stop, I still need that",
    "pick up the banana and place it back on the table",
] * 4

TINY = {
    "hidden_size": 64,
    "num_layers": 2,
    "num_heads": 2,
    "num_kv_heads": 1,
    "intermediate_size": 128,
    "image_size": [32, 48],
    "vision_channels": [8, 8, 16, 16],
    "vision_grid": [2, 3],
    # Larger than a real model's 0.02: clear logit margins, so greedy decoding does not flip on
    # float rounding between a cached and a recomputed prefix.
    "init_std": 0.3,
}
TOKENS_PER_IMAGE = 6


@pytest.fixture(scope="module", autouse=True)
def _one_thread(torch_one_thread):
    pass


@pytest.fixture(scope="module")
def tok():
    from robix_planner.models import build_tokenizer

    return build_tokenizer(CORPUS, 400)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory, tok):
    from robix_planner.models import build_model, build_processor

    path = tmp_path_factory.mktemp("robix_tiny")
    model = build_model(TINY, tok)
    model.save_pretrained(path)
    build_processor(tok, model.config).save_pretrained(path)
    return path


def load(path):
    import robix_planner.models  # noqa: F401 - registers robix-tiny
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True).eval()
    return model, AutoProcessor.from_pretrained(path, local_files_only=True)


def pixels(seed: int, shape=(120, 160, 3)):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def pil(seed: int, shape=(120, 160, 3)):
    from PIL import Image

    return Image.fromarray(pixels(seed, shape))


def conversation(images: list) -> list[dict]:
    """system, user (text, image, text, image), assistant, user, assistant: trl's conversational format."""
    return [
        {"role": "system", "content": [{"type": "text", "text": "You are Robix."}]},
        {"role": "user", "content": [
            {"type": "text", "text": "head: "}, {"type": "image", "image": images[0]},
            {"type": "text", "text": " wrist: "}, {"type": "image", "image": images[1]},
            {"type": "text", "text": "<|human_start|>Please clear the table.<|human_end|>"},
        ]},
        {"role": "assistant", "content": [{"type": "text", "text": "<|think_start|>a red cup<|think_end|>"}]},
        {"role": "user", "content": [{"type": "text", "text": "Command 'pick up the red cup' succeeded."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "<|plan_start|>put the red cup into the bus tub<|plan_end|>"}]},
    ]


def inputs_for(processor, images):
    return processor.apply_chat_template(conversation(images), tokenize=True, return_dict=True, return_tensors="pt")


# ---------------------------------------------------------------------- tokenizer


def test_tokenizer_fixed_tokens_are_whole_and_the_tags_survive_skip_special(tok, tmp_path):
    from transformers import AutoTokenizer

    from robix_planner.models.robix_tiny.tokenizer import SPECIAL_TOKENS

    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    for t in fmt.TAGS:
        assert len(tok.encode(t, add_special_tokens=False)) == 1
    text = "<|think_start|>the red cup<|think_end|><|plan_start|>put the red cup into the bus tub<|plan_end|>"
    ids = tok.encode(text + "<|end|>", add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=True) == text  # tags kept, <|end|> dropped
    assert tok.eos_token == "<|end|>" and tok.pad_token == "<|pad|>" and tok.pad_token_id != tok.eos_token_id
    unseen = "Ünïcödé ☕ 42 — never seen"
    assert tok.decode(tok.encode(unseen, add_special_tokens=False)) == unseen  # byte level: nothing unknown
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert again.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)
    assert again.chat_template == tok.chat_template and again.eos_token == "<|end|>"


def test_tokenizer_vocab_size_is_a_bound_and_too_small_is_an_error():
    from robix_planner.models import build_tokenizer

    big = build_tokenizer(CORPUS * 5, 320, min_frequency=1)
    assert len(big) == 320
    with pytest.raises(ValueError, match="vocab_size=100 is too small"):
        build_tokenizer(CORPUS, 100)


# ---------------------------------------------------------------------- processor


def test_processor_expands_each_image_and_masks_exactly_the_assistant_turns(tiny_path, tok):
    _, processor = load(tiny_path)
    out = processor.apply_chat_template(
        conversation([pil(1), pil(2, (60, 50, 3))]), tokenize=True, return_dict=True,
        return_assistant_tokens_mask=True, return_tensors="pt",
    )
    ids = out["input_ids"][0]
    assert int((ids == processor.image_token_id).sum()) == 2 * TOKENS_PER_IMAGE
    assert tuple(out["pixel_values"].shape) == (2, 3, 32, 48)  # every image resized to the model's size
    mask = out["assistant_masks"][0].bool()
    masked = tok.decode(ids[mask], skip_special_tokens=False)
    assert masked == ("<|think_start|>a red cup<|think_end|><|end|>"
                      "<|plan_start|>put the red cup into the bus tub<|plan_end|><|end|>")
    # Each masked run starts right after <|assistant|>: the end token is trained, the header is not.
    starts = [i for i in range(len(mask)) if mask[i] and (i == 0 or not mask[i - 1])]
    assert [tok.convert_ids_to_tokens(int(ids[i - 1])) for i in starts] == ["<|assistant|>"] * 2


def test_processor_rejects_a_wrong_number_of_images(tiny_path):
    _, processor = load(tiny_path)
    text = processor.apply_chat_template(conversation([pil(1), pil(2)]), tokenize=False)
    with pytest.raises(ValueError, match="number of"):
        processor(text=[text], images=[pil(1)], return_tensors="pt")


def test_chat_template_renders_a_prefix_as_a_token_prefix(tiny_path):
    """A conversation's tokens (with the generation prompt) are a prefix of any longer one's (prefix reuse)."""
    _, processor = load(tiny_path)
    full = conversation([pil(1), pil(2)])
    long_ids = inputs_for(processor, [pil(1), pil(2)])["input_ids"][0].tolist()
    short = processor.apply_chat_template(full[:2], tokenize=True, return_dict=True, add_generation_prompt=True,
                                          return_tensors="pt")["input_ids"][0].tolist()
    assert long_ids[: len(short)] == short


def test_trl_collator_trains_only_on_assistant_tokens(tiny_path, tok):
    trl = pytest.importorskip("trl")
    from trl.chat_template_utils import has_generation_markers, is_chat_template_stop_token_trained
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    _, processor = load(tiny_path)
    assert has_generation_markers(processor.chat_template)
    assert is_chat_template_stop_token_trained(processor)  # trl will not warn that <|end|> is never learned
    messages = [{k: v for k, v in m.items()} for m in conversation([None, None])]
    for m in messages:  # the dataset format: {"type": "image"} placeholders + an images column
        m["content"] = [{"type": "image"} if p["type"] == "image" else p for p in m["content"]]
    collator = DataCollatorForVisionLanguageModeling(processor, assistant_only_loss=True)
    batch = collator([{"messages": messages, "images": [pil(1), pil(2)]},
                      {"messages": messages[:3], "images": [pil(3), pil(4)]}])
    assert trl is not None and tuple(batch["pixel_values"].shape) == (4, 3, 32, 48)
    labels = batch["labels"][1]
    trained = tok.decode(labels[labels != -100], skip_special_tokens=False)
    assert trained == "<|think_start|>a red cup<|think_end|><|end|>"
    assert (batch["labels"][1][batch["attention_mask"][1] == 0] == -100).all()  # padding is never a target


# ---------------------------------------------------------------------- model


def test_save_load_through_the_auto_classes_is_exact(tiny_path, tok):
    import robix_planner.models as models
    from transformers import AutoConfig, AutoModelForCausalLM

    models.register()  # idempotent
    models.register()
    model, processor = load(tiny_path)
    assert type(model).__name__ == "RobixTinyForConditionalGeneration"
    assert type(processor).__name__ == "RobixTinyProcessor"
    assert type(processor.image_processor).__name__ == "RobixTinyImageProcessor"
    assert type(AutoConfig.from_pretrained(tiny_path, local_files_only=True)).__name__ == "RobixTinyConfig"
    inputs = inputs_for(processor, [pil(1), pil(2)])
    with torch.no_grad():
        ref = model(**inputs).logits
    path2 = tiny_path.parent / "resaved"
    model.save_pretrained(path2)
    processor.save_pretrained(path2)
    again, processor2 = load(path2)
    inputs2 = inputs_for(processor2, [pil(1), pil(2)])
    assert torch.equal(inputs2["input_ids"], inputs["input_ids"])
    assert torch.equal(inputs2["pixel_values"], inputs["pixel_values"])
    with torch.no_grad():
        assert torch.equal(again(**inputs2).logits, ref)
        causal = AutoModelForCausalLM.from_pretrained(tiny_path, local_files_only=True).eval()
        assert torch.equal(causal(**inputs).logits, ref)
    assert again.lm_head.weight.data_ptr() == again.get_input_embeddings().weight.data_ptr()  # tied


def test_the_image_changes_the_output_and_placeholders_must_match(tiny_path):
    model, processor = load(tiny_path)
    a = inputs_for(processor, [pil(1), pil(2)])
    b = inputs_for(processor, [pil(1), pil(3)])
    assert torch.equal(a["input_ids"], b["input_ids"])
    first_img = int((a["input_ids"][0] == processor.image_token_id).nonzero()[0])
    with torch.no_grad():
        la, lb = model(**a).logits, model(**b).logits
    second_img = int((a["input_ids"][0] == processor.image_token_id).nonzero()[TOKENS_PER_IMAGE])
    assert torch.equal(la[0, :second_img], lb[0, :second_img])  # causal: nothing before image 2 changes
    assert not torch.allclose(la[0, second_img:], lb[0, second_img:])
    assert first_img < second_img
    with pytest.raises(ValueError, match="placeholder"):
        model(input_ids=a["input_ids"][:, : second_img + 2], pixel_values=a["pixel_values"])


def test_image_placeholders_are_never_targets(tiny_path):
    model, processor = load(tiny_path)
    inputs = inputs_for(processor, [pil(1), pil(2)])
    ids = inputs["input_ids"]
    masked = ids.masked_fill(ids == processor.image_token_id, -100)
    with torch.no_grad():
        assert torch.equal(model(**inputs, labels=ids).loss, model(**inputs, labels=masked).loss)


def test_lora_adapter_saves_and_loads(tiny_path, tmp_path):
    pytest.importorskip("peft")
    from peft import LoraConfig, PeftModel, get_peft_model

    model, processor = load(tiny_path)
    inputs = inputs_for(processor, [pil(1), pil(2)])
    with torch.no_grad():
        base = model(**inputs).logits
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "proj_in"], lora_dropout=0.0)
    tuned = get_peft_model(model, lora)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        want = tuned(**inputs).logits
    assert not torch.allclose(want, base)
    tuned.save_pretrained(tmp_path / "adapter")
    fresh, _ = load(tiny_path)
    loaded = PeftModel.from_pretrained(fresh, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        # Equal up to float rounding (the matmuls of a reloaded adapter may take another kernel path).
        torch.testing.assert_close(loaded(**inputs).logits, want, rtol=1e-4, atol=1e-4)


def test_build_model_is_seeded_and_checks_its_keys(tok):
    from robix_planner.models import build_model

    a, b = build_model(TINY, tok), build_model(TINY, tok)
    c = build_model({**TINY, "seed": 1}, tok)
    sa, sc = a.state_dict(), c.state_dict()
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in sa.items())
    assert not all(torch.equal(v, sc[k]) for k, v in sa.items())
    with pytest.raises(ValueError, match="unknown robix-tiny model keys \\['hidden'\\]"):
        build_model({"hidden": 64}, tok)
    with pytest.raises(ValueError, match="feature map"):
        build_model({**TINY, "vision_grid": [4, 4]}, tok)  # 32x48 pixels give a 2x3 map


def test_the_default_size_ships_under_25_mb_in_float32(tmp_path):
    from robix_planner.models import DEFAULT_CONFIG, build_model, build_processor, build_tokenizer

    tok = build_tokenizer(CORPUS, 2048)
    assert len(tok) <= 2048
    tok.add_tokens([f"<filler{i}>" for i in range(2048 - len(tok))])  # a full 2048-token vocabulary
    model = build_model(DEFAULT_CONFIG, tok)
    assert next(model.parameters()).dtype == torch.float32
    model.save_pretrained(tmp_path)
    build_processor(tok, model.config).save_pretrained(tmp_path)
    size = sum(f.stat().st_size for f in tmp_path.iterdir())
    assert size <= 25_000_000, f"{size / 1e6:.1f} MB"


def test_feature_collapse_check(tiny_path):
    from robix_planner.models import feature_stats, features_collapsed

    model, processor = load(tiny_path)
    distinct = processor.image_processor([pil(i) for i in range(4)], return_tensors="pt")["pixel_values"]
    same = distinct[:1].repeat(4, 1, 1, 1)
    stats = feature_stats(model, distinct)
    assert stats["token_rel"] > 0.05 and stats["image_rel"] > 0.05
    assert not features_collapsed(model, distinct)
    assert feature_stats(model, same)["image_rel"] < 1e-4  # the same image: nothing varies across images
    assert features_collapsed(model, same)
    # An encoder whose last layer outputs a constant (the collapse seen in earlier probes) is caught.
    norm = model.model.vision.stem[-2]
    with torch.no_grad():
        norm.weight.zero_()
        norm.bias.fill_(0.5)
    assert features_collapsed(model, distinct)


def test_generate_matches_the_hf_backend(tiny_path):
    model, processor = load(tiny_path)
    b = backend(tiny_path, max_new_tokens=10, prefix_cache=False)
    prompt = episode(2)
    got = "".join(b.generate(prompt, cancel=threading.Event()))
    messages, images = fmt.to_hf_messages(prompt)
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=[ImagePartPil(p) for p in images], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    ids = out[0, inputs["input_ids"].shape[1]:].tolist()
    ids = ids[: next((i for i, t in enumerate(ids) if t == processor.tokenizer.eos_token_id), len(ids))]
    assert got == processor.tokenizer.decode(ids, skip_special_tokens=False)


# ---------------------------------------------------------------------- the hf backend


def ImagePartPil(part):
    from PIL import Image

    return Image.fromarray(part.pixels)


def backend(path, **kw):
    kw.setdefault("max_new_tokens", 12)
    return load_backend(ModelConfig(backend="hf", path=str(path), **kw))


def episode(steps: int) -> list[ChatMessage]:
    msgs = [ChatMessage("system", ("You are Robix. Skills: pick up the X, put the X into the Y.",))]
    for i in range(steps):
        msgs.append(ChatMessage("user", ("Your current views are\nhead: ", ImagePart(pixels(100 + i)),
                                         f"<|human_start|>step {i}: clear the table<|human_end|>")))
        if i < steps - 1:
            msgs.append(ChatMessage("assistant", (f"<|think_start|>the red cup {i}<|think_end|>",)))
    return msgs


def test_hf_backend_prefix_reuse_equals_a_full_recompute(tiny_path):
    cached, fresh = backend(tiny_path), backend(tiny_path, prefix_cache=False)
    assert type(cached.model).__name__ == "RobixTinyForConditionalGeneration"
    outputs, prev = [], 0
    for steps in range(1, 5):  # the history grows by one step (a new image + utterance) each time
        got = "".join(cached.generate(episode(steps), cancel=threading.Event()))
        s = cached.last_stats
        want = "".join(fresh.generate(episode(steps), cancel=threading.Event()))
        assert got == want, f"step {steps}"
        if steps > 1:
            assert s.cached_tokens >= prev  # the whole previous prompt was reused
        prev = s.prompt_tokens
        outputs.append(got)
    assert len(set(outputs)) > 1  # the prompts matter, so a wrong reuse would show
    chunked = backend(tiny_path, prefix_cache=False)
    chunked.prefill_chunk_tokens = 4  # smaller than an image (6 tokens): images go whole
    assert "".join(chunked.generate(episode(4), cancel=threading.Event())) == outputs[-1]


def test_hf_backend_cancel_stops_within_one_step(tiny_path, monkeypatch):
    b = backend(tiny_path, max_new_tokens=200, prefix_cache=False)
    forwards, at_cancel, _ = cancel_after_forwards(b, monkeypatch, episode(1), k=4, wait_s=WAIT_S)
    assert forwards - at_cancel <= 1
    assert b.last_stats.cancelled and b.last_stats.extra["stop"] == "cancel"
