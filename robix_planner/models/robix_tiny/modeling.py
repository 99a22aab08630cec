"""robix-tiny: a small CNN image encoder projected into a transformers decoder, LLaVA style.

::

    pixel_values (n_images, 3, H, W)
      -> RobixTinyVisionEncoder: stride-2 conv + GroupNorm + GELU, x4  -> (n, C, H/16, W/16)
         average-pooled to vision_grid (rows x cols), + learned row and column embeddings
         -> two-layer MLP projector -> (n, rows*cols, hidden)
    input_ids with rows*cols image placeholder tokens per image
      -> token embeddings, placeholders replaced by the image's visual tokens in order
      -> the text model (AutoModel.from_config(config.text_config), e.g. LlamaModel) -> lm_head

The text model is transformers' own, so KV caching (``cache`` / ``past_key_values``), sdpa
attention, ``position_ids`` from the cache length, ``logits_to_keep`` and ``generate()`` are the
library's. Pixels are needed only with the input ids that hold the image's placeholders: a prompt
prefilled in pieces (the hf backend's prefix reuse and chunked prefill) passes each image with the
piece that holds all its placeholders, and later pieces attend to the cached keys.

Image placeholder tokens are never targets: ``labels`` equal to ``image_token_id`` are ignored.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.utils.deprecation import deprecate_kwarg

from robix_planner.models.robix_tiny.configuration import RobixTinyConfig


class RobixTinyVisionEncoder(nn.Module):
    """Pixels (n, 3, H, W) -> visual tokens (n, rows*cols, hidden)."""

    def __init__(self, config: RobixTinyConfig):
        super().__init__()
        chans = config.vision_channels
        if config.vision_encoder == "cnn":
            layers, c_in = [], 3
            for c in chans:
                layers += [
                    nn.Conv2d(c_in, c, kernel_size=3, stride=2, padding=1),
                    nn.GroupNorm(config.vision_norm_groups, c),
                    nn.GELU(),
                ]
                c_in = c
            self.stem = nn.Sequential(*layers)
        else:  # "patch": one linear map per 2**len(chans)-pixel patch
            patch = 2 ** len(chans)
            self.stem = nn.Sequential(nn.Conv2d(3, chans[-1], kernel_size=patch, stride=patch), nn.GELU())
        rows, cols = config.vision_grid
        self.grid = (rows, cols)
        width = chans[-1]
        self.row_embed = nn.Parameter(torch.zeros(rows, width))
        self.col_embed = nn.Parameter(torch.zeros(cols, width))
        hidden = config.text_config.hidden_size
        self.proj_in = nn.Linear(width, hidden)
        self.act = ACT2FN[config.projector_hidden_act]
        self.proj_out = nn.Linear(hidden, hidden)

    def feature_map(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Encoder features before position embeddings: (n, rows*cols, channels)."""
        x = self.stem(pixel_values)
        if tuple(x.shape[-2:]) != self.grid:
            x = nn.functional.adaptive_avg_pool2d(x, self.grid)
        return x.flatten(2).transpose(1, 2)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.feature_map(pixel_values)
        rows, cols = self.grid
        pos = (self.row_embed[:, None, :] + self.col_embed[None, :, :]).reshape(rows * cols, -1)
        x = x + pos.to(x.dtype)
        return self.proj_out(self.act(self.proj_in(x)))


class RobixTinyPreTrainedModel(PreTrainedModel):
    config: RobixTinyConfig
    config_class = RobixTinyConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["RobixTinyVisionEncoder"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, nn.Conv2d):  # a CNN trained from scratch needs He init, not N(0, 0.02)
            init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, RobixTinyVisionEncoder):
            init.normal_(module.row_embed, mean=0.0, std=0.1)
            init.normal_(module.col_embed, mean=0.0, std=0.1)
            for lin in (module.proj_in, module.proj_out):
                init.xavier_uniform_(lin.weight)
                init.zeros_(lin.bias)


class RobixTinyModel(RobixTinyPreTrainedModel):
    """The encoder and the text model, without the LM head."""

    def __init__(self, config: RobixTinyConfig):
        super().__init__(config)
        self.vision = RobixTinyVisionEncoder(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Visual tokens (n_images, rows*cols, hidden) for pixel values (n_images, 3, H, W)."""
        return self.vision(pixel_values.to(self.vision.proj_in.weight.dtype))

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        if pixel_values is not None:
            if input_ids is None:
                raise ValueError("pixel_values need input_ids (their image placeholder tokens say where they go)")
            features = self.get_image_features(pixel_values)
            mask = input_ids == self.config.image_token_id
            n_tokens, n_features = int(mask.sum()), features.shape[0] * features.shape[1]
            if n_tokens != n_features:
                raise ValueError(
                    f"{features.shape[0]} image(s) need {n_features} image placeholder tokens "
                    f"({features.shape[1]} each, id {self.config.image_token_id}) but input_ids hold {n_tokens}; "
                    "pass each image with the input ids that hold all its placeholders"
                )
            inputs_embeds = inputs_embeds.masked_scatter(
                mask.unsqueeze(-1), features.reshape(-1, features.shape[-1]).to(inputs_embeds.dtype)
            )
        return self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )


class RobixTinyForConditionalGeneration(RobixTinyPreTrainedModel, GenerationMixin):
    """robix-tiny with its LM head (tied to the token embeddings when ``tie_word_embeddings``)."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: RobixTinyConfig):
        super().__init__(config)
        self.model = RobixTinyModel(config)
        text = config.text_config
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.get_image_features(pixel_values)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        out = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden = slice_logits_to_keep(out.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            labels = labels.masked_fill(labels == self.config.image_token_id, -100)
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=out.cache,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
        )


__all__ = ["RobixTinyForConditionalGeneration", "RobixTinyModel", "RobixTinyPreTrainedModel", "RobixTinyVisionEncoder"]
