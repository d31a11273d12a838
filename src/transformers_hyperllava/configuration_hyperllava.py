"""HyperLLaVA configuration: a LLaVA-1.5 config plus the two hypernetwork experts (arXiv 2403.13447)."""

from typing import Literal

from huggingface_hub.dataclasses import as_validated_field, strict
from transformers import LlavaConfig

VISUAL_EXPERTS = ("first", "second", "both")
LANGUAGE_EXPERT_PRESETS = ("posterior", "anterior", "all")
EXPERT_MODES = ("dynamic", "latent", "static")
EXPERT_KERNELS = ("auto", "eager", "triton")
# Only the backbones we test; others are refused rather than half-working.
SUPPORTED_TEXT_BACKBONES = ("llama",)
SUPPORTED_VISION_BACKBONES = ("clip_vision_model",)
# What a LLaVA config carries that describes its file or class rather than the model.
NOT_MODEL_FIELDS = ("model_type", "architectures", "auto_map", "transformers_version")
# The Auto classes that load HyperLLaVA: the package registers these (its __init__), and a saved folder names them
# for remote code. The three for the full model are those that load LLaVA's (AutoModelForMultimodalLM: the
# "any-to-any" pipeline's).
_FULL_MODEL = "modeling_hyperllava.HyperLlavaForConditionalGeneration"
REMOTE_AUTO_MAP = {
    "AutoModel": "modeling_hyperllava.HyperLlavaModel",
    "AutoModelForImageTextToText": _FULL_MODEL,
    "AutoModelForMultimodalLM": _FULL_MODEL,
    "AutoModelForPreTraining": _FULL_MODEL,
}


@as_validated_field
def positive_int(value):
    if value < 1:  # (the type, int and not bool, is checked first)
        raise ValueError(f"must be a positive integer, got {value!r}")


# Strict, as LlavaConfig is: each field's type (and choices) is checked when set, in the constructor, by
# `from_pretrained(path, field=...)` or by an assignment afterwards. What involves several fields (layers against the
# depth, the guidance layer against the experts) is checked by `validate_expert_fields`.
@strict
class HyperLlavaConfig(LlavaConfig):
    r"""
    Configuration of a [`HyperLlavaForConditionalGeneration`]: every field of [`LlavaConfig`] plus the experts.

    Args:
        visual_expert (`str` or `None`, defaults to `"first"`):
            Where the visual expert shifts the projector (paper Eq. 5): `"first"` inside the activation (LLaVA-1.5's
            GELU, `projector_hidden_act`) after `linear_1`,
            `"second"` after `linear_2`, `"both"`, or `None` for no visual expert.
        language_expert_layers (`str`, `list[int]` or `None`, defaults to `"posterior"`):
            Decoder layers that get a language expert beside their FFN: `"posterior"` (the second half, the
            paper's best), `"anterior"` (the first half), `"all"`, an explicit list of indices, or `None`.
        language_guidance_layer (`int`, *optional*):
            k: the guidance is the hidden state after layer k-1 (0 = the input embeddings), pooled over the prompt.
            Every expert layer must be >= k. Defaults to `num_hidden_layers // 2`, lowered to the first expert
            layer when the experts start earlier (`"anterior"`, `"all"`).
        expert_embedding_dim (`int`, defaults to 64): m, the size of the layer-specific embedding e(n).
        expert_bottleneck_dim (`int`, defaults to 16): r, the adapter's bottleneck.
        hypernetwork_hidden_dim (`int`, defaults to 64): the hidden size of the shared two-layer hypernetwork.
        expert_mode (`str`, defaults to `"dynamic"`):
            `"dynamic"` (the paper's method), `"latent"` (a learned latent replaces the guidance: the vanilla
            HyperNetwork of Table 5) or `"static"` (a plain adapter of the same shape with learned weights).
        expert_kernel (`str`, defaults to `"auto"`):
            How adapters are applied: `"eager"` (plain PyTorch, which `torch.compile` fuses itself), `"triton"`
            (the fused kernel, CUDA only) or `"auto"`: the fused kernel where it is faster (decoding inside a compiled
            graph, on an NVIDIA GPU with Triton installed), else eager (docs/performance.md).
    """

    model_type = "hyperllava"
    # Outputs the Trainer leaves out of its predictions: the caches (either name), the images (which it cannot gather,
    # for LLaVA either) and the generated weights, so that `predict` gives the logits as LLaVA's would.
    keys_to_ignore_at_inference = [
        "cache",
        "past_key_values",
        "image_outputs",
        "image_hidden_states",
        "language_expert_weights",
    ]

    visual_expert: Literal[VISUAL_EXPERTS] | None = "first"
    language_expert_layers: Literal[LANGUAGE_EXPERT_PRESETS] | list[int] | None = "posterior"
    language_guidance_layer: int | None = None
    expert_embedding_dim: int = positive_int(default=64)
    expert_bottleneck_dim: int = positive_int(default=16)
    hypernetwork_hidden_dim: int = positive_int(default=64)
    expert_mode: Literal[EXPERT_MODES] = "dynamic"
    expert_kernel: Literal[EXPERT_KERNELS] = "auto"

    def __post_init__(self, **kwargs):
        if kwargs.get("model_type", self.model_type) != self.model_type:
            # Transformers would only warn, and the model would then load none of the checkpoint's weights.
            raise ValueError(
                f"a {kwargs['model_type']!r} config is not a HyperLLaVA one: upgrade a LLaVA checkpoint with "
                "HyperLlavaForConditionalGeneration.from_llava(path), convert a LLaVA-codebase one with "
                "conversion/convert_hyperllava_weights_to_hf.py"
            )
        super().__post_init__(**kwargs)
        # `save_pretrained` adds the entry of the class that saves; the others are named here so that a saved folder
        # also loads with every Auto class that the package registers (those that load LLaVA) and
        # `trust_remote_code=True` where the package is not installed.
        self.auto_map = {**REMOTE_AUTO_MAP, **(getattr(self, "auto_map", None) or {})}
        self.validate_expert_fields()

    def validate_expert_fields(self):
        """Refuse combinations of settings that the model cannot build, and fill in the default
        `language_guidance_layer`. Run at construction, by `save_pretrained` (a `validate_` method is one of the strict
        dataclass's validators: a config whose fields were changed one by one so that they no longer fit together is
        not saved, as it would not load) and again by the model: `from_pretrained(..., language_expert_layers=...)`
        sets fields one by one on a config built without them (a config saved without a language expert has no
        guidance layer)."""
        text = self.text_config
        for name, sub_config, supported in (
            ("text_config", text, SUPPORTED_TEXT_BACKBONES),
            ("vision_config", self.vision_config, SUPPORTED_VISION_BACKBONES),
        ):
            if sub_config.model_type not in supported:
                raise ValueError(
                    f"{name}.model_type={sub_config.model_type!r} is not supported by HyperLLaVA yet; "
                    f"supported: {list(supported)}"
                )
        feature_layers = self.vision_feature_layer
        feature_layers = feature_layers if isinstance(feature_layers, list) else [feature_layers]
        # (Else the first forward with images fails on an index into the vision tower's hidden states: one per layer
        # and the embeddings'.)
        depth = self.vision_config.num_hidden_layers
        outside = [layer for layer in feature_layers if not -(depth + 1) <= layer <= depth]
        if outside:
            raise ValueError(
                f"vision_feature_layer {outside} is out of range: the vision tower has {depth} layers, so its hidden "
                f"states are indexed {-(depth + 1)}..{depth}"
            )
        # r is a bottleneck: no wider than what an expert adapts, the LLM's width, and for the first visual expert also
        # its input, the vision features (one vision width per layer of a vision_feature_layer list).
        widths = [text.hidden_size]
        if self.visual_expert in ("first", "both"):
            widths.append(self.vision_config.hidden_size * len(feature_layers))
        smallest_width = min(widths)
        if self.expert_bottleneck_dim > smallest_width:
            raise ValueError(
                f"expert_bottleneck_dim={self.expert_bottleneck_dim} is larger than the smallest hidden size an "
                f"expert adapts ({smallest_width}); allowed values: 1..{smallest_width}"
            )

        num_layers = text.num_hidden_layers
        layers = self.language_expert_layer_indices  # validates language_expert_layers
        if self.language_guidance_layer is None and layers:
            self.language_guidance_layer = min(num_layers // 2, layers[0])
        k = self.language_guidance_layer
        if k is not None:
            # (The config holds k once filled in, and a checkpoint saves it: its experts were trained with it. A
            # depth or expert layers changed later keep it, so the errors say how to take the default again.)
            default = "; language_guidance_layer=None takes the default for these layers and this depth"
            if not 0 <= k < num_layers:
                raise ValueError(
                    f"language_guidance_layer must be an integer in 0..{num_layers - 1}, got {k!r}{default}"
                )
            early = [i for i in layers if i < k]
            if early:
                raise ValueError(
                    f"language_expert_layers {early} come before language_guidance_layer={k}: a layer cannot "
                    f"use weights generated from a later hidden state. Use layers >= {k} or a smaller "
                    f"language_guidance_layer{default}, min(num_hidden_layers // 2, the first expert layer)."
                )

    def save_pretrained(self, save_directory, *args, **kwargs):
        # Checked before Transformers copies configuration_hyperllava.py into the folder (it checks only then).
        self.validate()
        return super().save_pretrained(save_directory, *args, **kwargs)

    def push_to_hub(self, *args, **kwargs):
        self.validate()  # before Transformers creates the Hub repo (it saves, and so checks, only after)
        return super().push_to_hub(*args, **kwargs)

    def to_llava_config(self) -> LlavaConfig:
        """The stock `LlavaConfig` with every field this config shares with it (the experts dropped)."""
        fields = self.to_dict()
        for key in (*NOT_MODEL_FIELDS, *self.__dataclass_fields__.keys() - LlavaConfig.__dataclass_fields__.keys()):
            fields.pop(key, None)
        return LlavaConfig(**fields)

    @classmethod
    def from_llava_config(cls, llava_config: LlavaConfig, **fields) -> "HyperLlavaConfig":
        """A LLaVA config with the experts added; `fields` set this config's fields (the experts' or LLaVA's)."""
        llava_fields = llava_config.to_dict()
        # (LLaVA's attributes too: their aliases, `image_token_id`, and those its config carries, `pad_token_id`.)
        known = cls.__dataclass_fields__.keys() | cls.attribute_map.keys() | llava_fields.keys()
        unknown = sorted(fields.keys() - known)
        if unknown:  # (the config would keep them as unused attributes, and a misspelt field would go unnoticed)
            raise ValueError(f"{unknown} are not HyperLlavaConfig fields; see docs/model.md for the expert fields")
        for key in NOT_MODEL_FIELDS:
            llava_fields.pop(key, None)
        config = cls(**{**llava_fields, **fields})
        # (Not in `to_dict`.) Per part, as LLaVA may have loaded each with its own (`attn_implementation` as a dict).
        config._attn_implementation = {"": llava_config._attn_implementation} | {
            key: getattr(llava_config, key)._attn_implementation for key in llava_config.sub_configs
        }
        return config

    @property
    def language_expert_layer_indices(self) -> list[int]:
        """The sorted decoder-layer indices that carry a language expert (empty for none)."""
        num_layers = self.text_config.num_hidden_layers
        spec = self.language_expert_layers
        if spec is None:
            return []
        if spec == "posterior":
            return list(range(num_layers // 2, num_layers))
        if spec == "anterior":
            if num_layers < 2:
                raise ValueError(
                    "language_expert_layers='anterior' (the first half) names no layer of a 1-layer text model: use "
                    "'posterior', 'all' or a list of layer indices"
                )
            return list(range(num_layers // 2))
        if spec == "all":
            return list(range(num_layers))
        if isinstance(spec, list) and spec:  # (a list of ints: the field's type)
            bad = [i for i in spec if not 0 <= i < num_layers]
            if bad:
                raise ValueError(
                    f"language_expert_layers {bad} are out of range: the text model has layers 0..{num_layers - 1}"
                )
            if len(set(spec)) != len(spec):
                raise ValueError(f"language_expert_layers has repeated indices: {list(spec)}")
            return sorted(spec)
        raise ValueError(
            f"language_expert_layers must be one of {list(LANGUAGE_EXPERT_PRESETS)}, None, or a non-empty list of "
            f"layer indices; got {spec!r}"
        )


__all__ = ["HyperLlavaConfig"]
