"""robix-tiny's configuration: a small CNN image encoder in front of a decoder-only text model."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec


def check_vision(image_height, image_width, encoder, channels, grid, norm_groups) -> None:
    """Raise ValueError, saying what to change, when these vision settings cannot work together."""
    if encoder not in ("cnn", "patch"):
        raise ValueError(f"vision_encoder={encoder!r}: use 'cnn' or 'patch'")
    if len(grid) != 2 or min(grid) < 1:
        raise ValueError(f"vision_grid={list(grid)}: give [rows, columns], both >= 1")
    if not channels:
        raise ValueError("vision_channels must list at least one layer")
    stride = 2 ** len(channels)
    rows, cols = image_height // stride, image_width // stride
    if rows < grid[0] or cols < grid[1]:
        raise ValueError(
            f"a {image_height}x{image_width} image gives a {rows}x{cols} feature map after {len(channels)} "
            f"stride-2 layers, smaller than vision_grid={list(grid)}; use larger images, fewer layers or a smaller grid"
        )
    if encoder == "cnn":
        bad = [c for c in channels if c % norm_groups]
        if bad:
            raise ValueError(f"vision_channels {bad} are not multiples of vision_norm_groups={norm_groups}")


@strict
class RobixTinyConfig(PreTrainedConfig):
    r"""Configuration of :class:`~robix_planner.models.robix_tiny.modeling.RobixTinyForConditionalGeneration`.

    text_config (`dict` or `PreTrainedConfig`):
        The decoder: any decoder-only transformers text model (``model_type`` "llama" by default,
        "qwen2" works too), built with ``AutoModel.from_config``.
    image_token_id (`int`):
        The placeholder token replaced by the visual tokens (one placeholder per visual token).
    image_height, image_width (`int`):
        Pixel size the image processor resizes every image to.
    vision_encoder (`str`):
        "cnn": ``len(vision_channels)`` stride-2 3x3 convolutions, each followed by GroupNorm and
        GELU; "patch": one ``2**len(vision_channels)``-pixel patch embedding (a linear map per
        patch, no convolution stack; the cheap baseline of the architecture probe).
    vision_channels (`list[int]`):
        Output channels of each convolution ("patch": only the last is used).
    vision_grid (`list[int]`):
        [rows, columns] of visual tokens per image; the encoder's feature map is average-pooled
        to it when it is larger. ``rows * columns`` placeholder tokens stand for one image.
    vision_norm_groups (`int`):
        Groups of the GroupNorm after each convolution (per-image statistics: no batch effects).
    projector_hidden_act (`str`):
        Activation of the two-layer projector from encoder channels to the text model's width.
    """

    model_type = "robix_tiny"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    text_config: dict | PreTrainedConfig | None = None
    image_token_id: int = 5
    image_height: int = 96
    image_width: int = 128
    vision_encoder: str = "cnn"
    vision_channels: list[int] | tuple[int, ...] = (32, 64, 128, 256)
    vision_grid: list[int] | tuple[int, ...] = (3, 4)
    vision_norm_groups: int = 8
    projector_hidden_act: str = "gelu"
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.vision_channels = list(self.vision_channels)
        self.vision_grid = list(self.vision_grid)

    def validate_architecture(self):
        """Raise ValueError when the vision settings cannot work together (checked at construction)."""
        check_vision(self.image_height, self.image_width, self.vision_encoder, self.vision_channels,
                     self.vision_grid, self.vision_norm_groups)

    @property
    def image_seq_length(self) -> int:
        """Visual tokens (placeholder tokens) per image."""
        return self.vision_grid[0] * self.vision_grid[1]


__all__ = ["RobixTinyConfig", "check_vision"]
