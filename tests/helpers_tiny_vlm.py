"""Build a tiny Qwen2.5-VL checkpoint from config (random weights) and save it like a real one.

Tests that need a local VLM call :func:`build_tiny_qwen_vl` (once per session: it takes about a
second) and then load the directory exactly as a user loads ``Qwen/Qwen2.5-VL-3B-Instruct`` from
disk: ``AutoProcessor`` + ``AutoModelForImageTextToText`` with ``local_files_only=True``. Nothing is
downloaded. The directory holds what a real Qwen2.5-VL checkpoint holds:

- ``config.json`` / ``model.safetensors`` / ``generation_config.json`` (a 2-layer, 64-wide
  ``Qwen2_5_VLForConditionalGeneration``; a 2-block, 32-wide vision tower with 8-pixel patches);
- ``tokenizer.json`` / ``tokenizer_config.json``: a byte-level BPE trained here on a few sentences
  (about 320 tokens), with Qwen's special tokens (``<|im_start|>``, ``<|im_end|>``,
  ``<|vision_start|>``, ``<|image_pad|>``, ``<|vision_end|>``, ...) and the Robix output tags
  (``<|think_start|>`` ... ``<|response_end|>``) as whole tokens;
- ``processor_config.json`` naming ``Qwen2_5_VLProcessor`` with a Qwen2-VL image processor, and a
  Qwen-style ``chat_template.jinja``.

Like the real checkpoint it has no video processor config, so loading it without torchvision goes
through the same fallback as a real one (see :mod:`robix_planner.backends.hf`).

Images are resized to at most 48x48 pixels: 3x3 merged patches = 9 ``<|image_pad|>`` tokens each.
The whole directory is under 1 MB.
"""

from __future__ import annotations

import json
from pathlib import Path

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
ROBIX_TAGS = [
    "<|think_start|>",
    "<|think_end|>",
    "<|plan_start|>",
    "<|plan_end|>",
    "<|response_start|>",
    "<|response_end|>",
]

#: Qwen2-VL's chat template, trimmed to what the planner sends (text and images; no video, no tools).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "put the red cup into the bus tub",
    "pick up the banana and place it back on the table",
    "the robot sees a table with a cup, a plate, a fork and a napkin",
    "I am clearing the table now. Should I also throw away the napkin?",
    "stop, I still need that",
    "the last action failed: the gripper is empty, so I will try again",
    "system user assistant",
]

PATCH_SIZE = 8
MERGE_SIZE = 2
MAX_PIXELS = 48 * 48


def build_tokenizer():
    """A byte-level BPE tokenizer with Qwen's special tokens, wrapped for transformers."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(_CORPUS, trainer)
    # The Robix tags are whole tokens but ordinary text (decoded, never skipped), as in a fine-tune.
    tk.add_tokens([AddedToken(t, special=False, normalized=False) for t in ROBIX_TAGS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE
    )


def build_tiny_qwen_vl(
    path,
    *,
    seed: int = 0,
    init_std: float = 0.3,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int | None = None,
    num_kv_heads: int | None = None,
) -> Path:
    """Write a tiny random Qwen2.5-VL checkpoint (model, tokenizer, processor) to ``path``.

    ``hidden_size``, ``num_layers``, ``num_heads`` (default: heads of 16 dims; the head size
    ``hidden_size // num_heads`` must be a multiple of 8) and ``num_kv_heads`` (default: half as
    many) make it larger for timing runs; the defaults give a 0.7 MB model.

    ``init_std`` is larger than a real model's 0.02 so that the random model's next-token logits
    have clear margins: greedy decoding then does not flip on float rounding, which the
    prefix-reuse tests (cached vs full recompute) rely on.
    """
    import torch
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessorPil,
    )

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}

    image_processor = Qwen2VLImageProcessorPil(
        patch_size=PATCH_SIZE,
        merge_size=MERGE_SIZE,
        temporal_patch_size=2,
        min_pixels=(PATCH_SIZE * MERGE_SIZE) ** 2,
        max_pixels=MAX_PIXELS,
    )

    class _ImageOnlyProcessor(Qwen2_5_VLProcessor):
        # Qwen2_5_VLProcessor requires a video processor, which needs torchvision; saving needs
        # only the image processor and tokenizer. The saved files name Qwen2_5_VLProcessor.
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    _ImageOnlyProcessor(image_processor=image_processor, tokenizer=tok, chat_template=CHAT_TEMPLATE).save_pretrained(
        path
    )
    for name in ("processor_config.json", "tokenizer_config.json", "preprocessor_config.json"):
        f = path / name
        if f.exists():
            f.write_text(f.read_text().replace('"_ImageOnlyProcessor"', '"Qwen2_5_VLProcessor"'))

    num_heads = num_heads or hidden_size // 16
    head_dim = hidden_size // num_heads
    if head_dim * num_heads != hidden_size or head_dim % 8:
        raise ValueError(f"hidden_size={hidden_size} / num_heads={num_heads} must give heads of a multiple of 8 dims")
    # Qwen2.5-VL's split of the rotary half-dimension into time / height / width (16, 24, 24 of 64).
    mrope_section = [head_dim // 8, (head_dim // 2 - head_dim // 8) // 2, (head_dim // 2 - head_dim // 8) // 2]
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads or max(1, num_heads // 2),
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope_section},
            initializer_range=init_std,
            bos_token_id=None,
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            patch_size=PATCH_SIZE,
            spatial_merge_size=MERGE_SIZE,
            temporal_patch_size=2,
            window_size=PATCH_SIZE * MERGE_SIZE * 2,
            fullatt_block_indexes=[1],
            out_hidden_size=hidden_size,
            initializer_range=init_std,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    assert sum(config.text_config.rope_parameters["mrope_section"]) == head_dim // 2
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(path)
    return path


def set_eos_tokens(path, eos_token_ids: list[int]) -> None:
    """Rewrite ``generation_config.json`` so that generation stops at any of ``eos_token_ids``."""
    f = Path(path) / "generation_config.json"
    cfg = json.loads(f.read_text())
    cfg["eos_token_id"] = list(eos_token_ids)
    f.write_text(json.dumps(cfg, indent=2))


def build_lora_adapter(model_path, adapter_path, *, seed: int = 1, scale: float = 0.5) -> Path:
    """Save a LoRA adapter for the tiny model whose weights are all non-zero (random A and B).

    peft initialises B to zero (the adapter starts as a no-op); here B is random too, so the
    adapter changes the model's output, as a trained one would.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    base = AutoModelForImageTextToText.from_pretrained(model_path, local_files_only=True)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"], lora_dropout=0.0)
    model = get_peft_model(base, lora)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    model.save_pretrained(adapter_path)
    return Path(adapter_path)


def build_tiny_llava(path, *, seed: int = 0, init_std: float = 0.3) -> Path:
    """Write a tiny random LLaVA checkpoint (Llama text model, CLIP vision tower) to ``path``.

    A second architecture for the ``hf`` backend: plain 1-D positions, one ``pixel_values`` row per
    image (32x32 pixels, 16 ``<image>`` placeholder tokens each).
    """
    import torch
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tok.chat_template = CHAT_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", "<image>")
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=tok.chat_template,
    ).save_pretrained(path)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            initializer_range=init_std,
            eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
            pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
        ),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        initializer_range=init_std,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = [tok.convert_tokens_to_ids("<|im_end|>")]
    model.save_pretrained(path)
    return path


def cancel_after_forwards(backend, monkeypatch, prompt, k: int, wait_s: float = 10.0):
    """Run ``backend.generate(prompt)`` and set its cancel from another thread once ``k`` forward calls began.

    Returns ``(forwards, at_cancel, deltas)``: forward calls in all, forward calls begun when the
    cancel landed, and the streamed text pieces. Raises if the canceller never ran.
    """
    import threading

    calls, reached = [], threading.Event()
    forward = backend.model.forward
    # Counting a call and reading the count then cancelling are atomic to each other: otherwise, on a
    # loaded machine, the generation could run several calls between the canceller's read and its set.
    lock = threading.Lock()

    def counted(*args, **kwargs):
        with lock:
            calls.append(1)
            if len(calls) == k:
                reached.set()
        return forward(*args, **kwargs)

    monkeypatch.setattr(backend.model, "forward", counted)
    cancel, at_cancel = threading.Event(), []

    def canceller():
        if reached.wait(wait_s):
            with lock:
                at_cancel.append(len(calls))
                cancel.set()

    t = threading.Thread(target=canceller)
    t.start()
    deltas = list(backend.generate(prompt, cancel=cancel))
    t.join(wait_s)
    if not at_cancel:
        raise AssertionError(f"the generation ended before {k} forward calls: the canceller never ran")
    return len(calls), at_cancel[0], deltas
