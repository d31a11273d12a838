"""Tiny HyperLLaVA configurations for tests, the demo and CPU benchmarks (LLaVA-1.5's structure, toy sizes)."""

from .configuration_hyperllava import HyperLlavaConfig


def tiny_config(
    hidden_size=32,
    num_hidden_layers=4,
    vocab_size=64,
    image_size=28,
    patch_size=14,
    vision_hidden_size=24,
    image_token_id=4,
    pad_token_id=3,
    **overrides,
) -> HyperLlavaConfig:
    """A HyperLLaVA config small enough for a CPU test: (image_size // patch_size)^2 visual tokens per image."""
    text_config = {
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "pad_token_id": pad_token_id,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    vision_config = {
        "model_type": "clip_vision_model",
        "hidden_size": vision_hidden_size,
        "intermediate_size": 2 * vision_hidden_size,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "image_size": image_size,
        "patch_size": patch_size,
        "projection_dim": vision_hidden_size,
    }
    overrides.setdefault("expert_embedding_dim", 8)
    overrides.setdefault("expert_bottleneck_dim", 4)
    overrides.setdefault("hypernetwork_hidden_dim", 8)
    overrides.setdefault("vision_feature_layer", -2)
    overrides.setdefault("vision_feature_select_strategy", "default")
    return HyperLlavaConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_index=image_token_id,
        image_seq_length=(image_size // patch_size) ** 2,
        pad_token_id=pad_token_id,
        **overrides,
    )
