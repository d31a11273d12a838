"""HyperLLaVA (arXiv 2403.13447) for Hugging Face Transformers. Importing the package registers it with the Auto
classes, so `AutoModelForImageTextToText.from_pretrained(...)` works without `trust_remote_code`."""

import transformers
from transformers import AutoConfig, AutoProcessor

from . import modeling_hyperllava
from .configuration_hyperllava import REMOTE_AUTO_MAP, HyperLlavaConfig
from .modeling_hyperllava import (
    HyperLlavaForConditionalGeneration,
    HyperLlavaModel,
    HyperLlavaPreTrainedModel,
)
from .processing_hyperllava import HyperLlavaProcessor

AutoConfig.register("hyperllava", HyperLlavaConfig)
# The Auto classes that a saved folder names for remote code (its auto_map) are the ones registered here.
for auto_class, target in REMOTE_AUTO_MAP.items():
    getattr(transformers, auto_class).register(
        HyperLlavaConfig, getattr(modeling_hyperllava, target.rpartition(".")[2])
    )
AutoProcessor.register(HyperLlavaConfig, HyperLlavaProcessor)
# `save_pretrained` then writes `auto_map` and copies the remote-code files, so that a saved folder also loads with
# `trust_remote_code=True` where this package is not installed.
HyperLlavaConfig.register_for_auto_class()
HyperLlavaModel.register_for_auto_class("AutoModel")
HyperLlavaForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
HyperLlavaProcessor.register_for_auto_class("AutoProcessor")

__all__ = [
    "HyperLlavaConfig",
    "HyperLlavaForConditionalGeneration",
    "HyperLlavaModel",
    "HyperLlavaPreTrainedModel",
    "HyperLlavaProcessor",
]
