"""Create a fresh robix-tiny from a small YAML-able dict, its processor, and a vision health check.

::

    from robix_planner.models import build_model, build_processor, build_tokenizer
    tok = build_tokenizer(texts, vocab_size=2048)
    model = build_model({"hidden_size": 256, "num_layers": 4}, tok)   # unspecified keys: DEFAULT_CONFIG
    processor = build_processor(tok, model.config)
    model.save_pretrained(out); processor.save_pretrained(out)      # loads with the Auto classes
"""

from __future__ import annotations

from typing import Any, Mapping

#: The shipped size (docs/robix_tiny.md): 4.2M parameters with a 2048-token vocabulary, 17 MB saved in float32.
DEFAULT_CONFIG: dict[str, Any] = {
    "text_model": "llama",  # model_type of the decoder ("llama" or "qwen2")
    "hidden_size": 256,
    "num_layers": 4,
    "num_heads": 4,
    "num_kv_heads": 2,
    "intermediate_size": 768,
    "max_positions": 16384,
    "rope_theta": 10000.0,
    "image_size": [96, 128],  # height, width the image processor resizes to
    "vision_encoder": "cnn",  # "cnn" | "patch"
    "vision_channels": [32, 64, 128, 256],
    "vision_grid": [3, 4],  # rows, columns of visual tokens per image (6x8 map average-pooled 2x2)
    "tie_embeddings": True,
    "init_std": 0.02,
    "seed": 0,
}


def model_config(config: Mapping[str, Any] | None, tokenizer):
    """A :class:`RobixTinyConfig` for ``config`` (keys of :data:`DEFAULT_CONFIG`) and ``tokenizer``'s ids."""
    from robix_planner.models.robix_tiny.configuration import RobixTinyConfig, check_vision
    from robix_planner.models.robix_tiny.tokenizer import IMAGE

    cfg = dict(DEFAULT_CONFIG)
    unknown = sorted(set(config or {}) - set(cfg))
    if unknown:
        raise ValueError(f"unknown robix-tiny model keys {unknown}; the keys are {sorted(cfg)}")
    cfg.update(config or {})
    image_id = tokenizer.convert_tokens_to_ids(IMAGE)
    if image_id is None or image_id == tokenizer.unk_token_id or tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer needs {IMAGE!r} and an eos token; build it with build_tokenizer()")
    if cfg["hidden_size"] % cfg["num_heads"] or cfg["num_heads"] % cfg["num_kv_heads"]:
        raise ValueError("hidden_size must be a multiple of num_heads, and num_heads a multiple of num_kv_heads")
    text = dict(
        model_type=cfg["text_model"],
        vocab_size=len(tokenizer),
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_layers"],
        num_attention_heads=cfg["num_heads"],
        num_key_value_heads=cfg["num_kv_heads"],
        max_position_embeddings=cfg["max_positions"],
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg["rope_theta"])},
        initializer_range=cfg["init_std"],
        tie_word_embeddings=cfg["tie_embeddings"],
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    height, width = cfg["image_size"]
    check_vision(height, width, cfg["vision_encoder"], cfg["vision_channels"], cfg["vision_grid"],
                RobixTinyConfig.vision_norm_groups)
    return RobixTinyConfig(
        text_config=text,
        image_token_id=image_id,
        image_height=int(height),
        image_width=int(width),
        vision_encoder=cfg["vision_encoder"],
        vision_channels=list(cfg["vision_channels"]),
        vision_grid=list(cfg["vision_grid"]),
        initializer_range=cfg["init_std"],
        tie_word_embeddings=cfg["tie_embeddings"],
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_model(config: Mapping[str, Any] | None, tokenizer):
    """A fresh, randomly initialised robix-tiny (float32) for ``tokenizer``; ``config`` overrides :data:`DEFAULT_CONFIG`.

    Deterministic for a given ``config["seed"]``. Its ``generation_config`` stops at the
    tokenizer's eos (``<|end|>``) and pads with its pad token.
    """
    import torch

    from robix_planner.models.robix_tiny.modeling import RobixTinyForConditionalGeneration

    cfg = model_config(config, tokenizer)
    seed = (config or {}).get("seed", DEFAULT_CONFIG["seed"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = RobixTinyForConditionalGeneration(cfg)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    return model


def build_processor(tokenizer, config):
    """The :class:`RobixTinyProcessor` for ``tokenizer`` and a model ``config`` (image size, tokens per image)."""
    from robix_planner.models.robix_tiny.processing import RobixTinyImageProcessor, RobixTinyProcessor

    image_processor = RobixTinyImageProcessor(size={"height": config.image_height, "width": config.image_width})
    return RobixTinyProcessor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_length=config.image_seq_length
    )


def count_parameters(model) -> int:
    """Distinct parameters (tied weights counted once)."""
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def feature_stats(model, pixel_values) -> dict[str, float]:
    """How much the image encoder's output varies, a cheap check for collapsed vision features.

    On the encoder's feature map (before position embeddings) for a batch of images (n >= 2):

    - ``token_std``: standard deviation across the visual tokens of one image (averaged over
      channels and images): ~0 when every cell of the grid looks the same to the encoder;
    - ``image_std``: standard deviation across the images at the same token (averaged over
      channels and tokens): ~0 when the encoder ignores its input;
    - ``rms``: root mean square of the features, the scale the two are read against.

    ``token_rel`` and ``image_rel`` are the two divided by ``rms``. A trained, healthy encoder
    on distinct scenes keeps both well above 0; :func:`features_collapsed` applies a threshold.
    """
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    vision = base.model.vision
    with torch.no_grad():
        x = vision.feature_map(pixel_values.to(vision.proj_in.weight.dtype)).float()  # (n, tokens, channels)
    if x.shape[0] < 2:
        raise ValueError("feature_stats needs at least 2 images")
    rms = float(x.pow(2).mean().sqrt()) + 1e-12
    token_std = float(x.std(dim=1).mean())
    image_std = float(x.std(dim=0).mean())
    return {
        "token_std": token_std,
        "image_std": image_std,
        "rms": rms,
        "token_rel": token_std / rms,
        "image_rel": image_std / rms,
    }


def features_collapsed(model, pixel_values, *, min_rel: float = 0.05) -> bool:
    """True when the encoder's features barely vary across tokens or across images (see :func:`feature_stats`)."""
    s = feature_stats(model, pixel_values)
    return s["token_rel"] < min_rel or s["image_rel"] < min_rel
