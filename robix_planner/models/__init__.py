"""Models that ship with Robix Planner, registered with transformers' Auto classes.

``import robix_planner.models`` registers every model here (:func:`register`), so a saved
checkpoint loads like any other::

    import robix_planner.models  # noqa: F401
    from transformers import AutoModelForImageTextToText, AutoProcessor
    model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True)
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)

Importing this package imports torch and transformers (the planner's CLI never imports it).
"""

from __future__ import annotations

import threading

from robix_planner.models.robix_tiny import (
    DEFAULT_CONFIG,
    RobixTinyConfig,
    RobixTinyForConditionalGeneration,
    RobixTinyImageProcessor,
    RobixTinyModel,
    RobixTinyProcessor,
    build_model,
    build_processor,
    build_tokenizer,
    count_parameters,
    feature_stats,
    features_collapsed,
)

_lock = threading.Lock()
_registered = False


def register() -> None:
    """Register robix-tiny with AutoConfig, AutoModel, AutoModelForImageTextToText, AutoModelForCausalLM,
    AutoImageProcessor and AutoProcessor. Idempotent; done on import of this package."""
    global _registered
    with _lock:
        if _registered:
            return
        from transformers import (
            AutoConfig,
            AutoImageProcessor,
            AutoModel,
            AutoModelForCausalLM,
            AutoModelForImageTextToText,
            AutoProcessor,
        )

        model_type = RobixTinyConfig.model_type
        AutoConfig.register(model_type, RobixTinyConfig, exist_ok=True)
        AutoModel.register(RobixTinyConfig, RobixTinyModel, exist_ok=True)
        AutoModelForImageTextToText.register(RobixTinyConfig, RobixTinyForConditionalGeneration, exist_ok=True)
        AutoModelForCausalLM.register(RobixTinyConfig, RobixTinyForConditionalGeneration, exist_ok=True)
        AutoImageProcessor.register(
            RobixTinyConfig, image_processor_classes={"pil": RobixTinyImageProcessor}, exist_ok=True
        )
        AutoProcessor.register(RobixTinyConfig, RobixTinyProcessor, exist_ok=True)
        _registered = True


register()

__all__ = [
    "DEFAULT_CONFIG",
    "RobixTinyConfig",
    "RobixTinyForConditionalGeneration",
    "RobixTinyImageProcessor",
    "RobixTinyModel",
    "RobixTinyProcessor",
    "build_model",
    "build_processor",
    "build_tokenizer",
    "count_parameters",
    "feature_stats",
    "features_collapsed",
    "register",
]
