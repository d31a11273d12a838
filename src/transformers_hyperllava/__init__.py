"""HyperLLaVA (arXiv 2403.13447) for Hugging Face Transformers. Importing the package registers it with the Auto
classes, so `AutoModelForImageTextToText.from_pretrained(...)` works without `trust_remote_code`."""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageTextToText,
    AutoModelForMultimodalLM,
    AutoModelForPreTraining,
    AutoProcessor,
)

from .configuration_hyperllava import HyperLlavaConfig
from .modeling_hyperllava import (
    HyperLlavaForConditionalGeneration,
    HyperLlavaModel,
    HyperLlavaPreTrainedModel,
)
from .processing_hyperllava import HyperLlavaProcessor

AutoConfig.register("hyperllava", HyperLlavaConfig)
AutoModel.register(HyperLlavaConfig, HyperLlavaModel)
# The three Auto classes that load LLaVA's full model (AutoModelForMultimodalLM: the "any-to-any" pipeline's).
AutoModelForImageTextToText.register(HyperLlavaConfig, HyperLlavaForConditionalGeneration)
AutoModelForMultimodalLM.register(HyperLlavaConfig, HyperLlavaForConditionalGeneration)
AutoModelForPreTraining.register(HyperLlavaConfig, HyperLlavaForConditionalGeneration)
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
