"""robix-tiny: the small vision-language model trained from scratch and shipped with Robix Planner.

See docs/robix_tiny.md. Importing this package imports torch and transformers.
"""

from robix_planner.models.robix_tiny.build import (
    DEFAULT_CONFIG,
    build_model,
    build_processor,
    count_parameters,
    feature_stats,
    features_collapsed,
    model_config,
)
from robix_planner.models.robix_tiny.configuration import RobixTinyConfig
from robix_planner.models.robix_tiny.modeling import (
    RobixTinyForConditionalGeneration,
    RobixTinyModel,
    RobixTinyVisionEncoder,
)
from robix_planner.models.robix_tiny.processing import RobixTinyImageProcessor, RobixTinyProcessor
from robix_planner.models.robix_tiny.tokenizer import CHAT_TEMPLATE, EOS, IMAGE, PAD, SPECIAL_TOKENS, build_tokenizer

__all__ = [
    "CHAT_TEMPLATE",
    "DEFAULT_CONFIG",
    "EOS",
    "IMAGE",
    "PAD",
    "SPECIAL_TOKENS",
    "RobixTinyConfig",
    "RobixTinyForConditionalGeneration",
    "RobixTinyImageProcessor",
    "RobixTinyModel",
    "RobixTinyProcessor",
    "RobixTinyVisionEncoder",
    "build_model",
    "build_processor",
    "build_tokenizer",
    "count_parameters",
    "feature_stats",
    "features_collapsed",
    "model_config",
]
