"""HyperLLaVA (arXiv 2403.13447) for Hugging Face Transformers. Importing the package registers it with the Auto
classes, so `AutoModelForImageTextToText.from_pretrained(...)` works without `trust_remote_code`."""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

from .configuration_hyperllava import HyperLlavaConfig
from .modeling_hyperllava import (
    HyperLlavaForConditionalGeneration,
    HyperLlavaModel,
    HyperLlavaPreTrainedModel,
)

AutoConfig.register("hyperllava", HyperLlavaConfig)
AutoModel.register(HyperLlavaConfig, HyperLlavaModel)
AutoModelForImageTextToText.register(HyperLlavaConfig, HyperLlavaForConditionalGeneration)

__all__ = [
    "HyperLlavaConfig",
    "HyperLlavaForConditionalGeneration",
    "HyperLlavaModel",
    "HyperLlavaPreTrainedModel",
]
