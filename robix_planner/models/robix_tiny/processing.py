"""robix-tiny's image processor (Pillow only) and processor (tokenizer + images + chat template)."""

from __future__ import annotations

from transformers import ProcessorMixin
from transformers.image_processing_backends import PilBackend
from transformers.image_utils import PILImageResampling

from robix_planner.models.robix_tiny.tokenizer import CHAT_TEMPLATE, IMAGE


class RobixTinyImageProcessor(PilBackend):
    """Resize every image to a fixed ``size`` (height x width, bilinear), scale to 0..1, normalise to -1..1.

    Pillow and numpy only (no torchvision). Returns ``pixel_values`` of shape (n, 3, height, width):
    one row per image, so a caller can pick the pixels of any one image.
    """

    resample = PILImageResampling.BILINEAR
    image_mean = [0.5, 0.5, 0.5]
    image_std = [0.5, 0.5, 0.5]
    size = {"height": 96, "width": 128}
    default_to_square = False
    do_resize = True
    do_center_crop = False
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True
    model_input_names = ["pixel_values"]


class RobixTinyProcessor(ProcessorMixin):
    """Tokenizer + :class:`RobixTinyImageProcessor` + chat template.

    ``processor(text=[...], images=[...])`` replaces each :data:`IMAGE` placeholder of the text,
    in order, by ``image_seq_length`` copies (one per visual token of the model) and returns
    ``input_ids``, ``attention_mask`` and ``pixel_values`` (one row per image).
    ``apply_chat_template(messages, ...)`` renders the chat template (see
    :mod:`robix_planner.models.robix_tiny.tokenizer`); with ``tokenize=True, return_dict=True,
    return_assistant_tokens_mask=True`` it also returns ``assistant_masks`` over the expanded tokens.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, image_seq_length: int = 12, **kwargs):
        if tokenizer is None:
            raise ValueError("RobixTinyProcessor needs a tokenizer")
        if image_seq_length < 1:
            raise ValueError(f"image_seq_length={image_seq_length} must be >= 1")
        self.image_seq_length = int(image_seq_length)
        self.image_token = getattr(tokenizer, "image_token", None) or IMAGE
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {self.image_token!r} token")
        super().__init__(image_processor, tokenizer, chat_template=chat_template or CHAT_TEMPLATE, **kwargs)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        return self.image_token * self.image_seq_length

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]


__all__ = ["RobixTinyImageProcessor", "RobixTinyProcessor"]
