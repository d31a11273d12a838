"""Tiny tokenizers and processors for tests, the demo and CPU benchmarks: word-level vocabularies trained here."""

from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import LlavaImageProcessorPil, PreTrainedTokenizerFast

from .processing_hyperllava import VICUNA_V1_SYSTEM, HyperLlavaProcessor
from .tiny import tiny_config

# Fixed ids, matching `tiny_config()`: unk 0, bos 1, eos 2, pad 3, image 4.
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")
# Words of the vicuna_v1 chat format, always in the vocabulary so that templated prompts never hit <unk>.
TEMPLATE_TEXT = f"{VICUNA_V1_SYSTEM} USER: ASSISTANT:"
DEFAULT_TEXTS = (
    "What is in the image?",
    "Describe the picture in detail.",
    "A red square on a blue background.",
    "There is a cat next to a green box.",
    "How many objects are there? Two.",
)


def train_tokenizer(texts, padding_side="left") -> PreTrainedTokenizerFast:
    """
    A fast word-level tokenizer trained with `tokenizers` on `texts` plus the words of the vicuna_v1 chat format.

    Special tokens `<unk>`=0, `<s>`=1 (bos, added at the start like Llama's), `</s>`=2 (eos), `<pad>`=3 and
    `<image>`=4; left padding by default, as batched generation needs. Every word of the corpus is kept: build
    the model's config with `vocab_size=len(tokenizer)`.
    """
    texts = list(texts)
    if not all(isinstance(text, str) for text in texts):
        raise TypeError("train_tokenizer expects an iterable of strings")
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS), min_frequency=1)
    tokenizer.train_from_iterator([TEMPLATE_TEXT, *texts], trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", SPECIAL_TOKENS.index("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side=padding_side,
    )


def tiny_processor(tokenizer=None, config=None) -> HyperLlavaProcessor:
    """A [`HyperLlavaProcessor`] matching `config` (default `tiny_config()`: 28px images, 4 image tokens)."""
    config = tiny_config() if config is None else config
    tokenizer = train_tokenizer(DEFAULT_TEXTS) if tokenizer is None else tokenizer
    vocab_size = config.text_config.vocab_size
    if len(tokenizer) > vocab_size:
        raise ValueError(
            f"The tokenizer has {len(tokenizer)} tokens but config.text_config.vocab_size is {vocab_size}; "
            f"build the config with vocab_size=len(tokenizer)"
        )
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    if image_token_id != config.image_token_id:
        raise ValueError(
            f"The tokenizer's <image> id is {image_token_id}, the config's image_token_id is {config.image_token_id}"
        )
    size = config.vision_config.image_size
    image_processor = LlavaImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}, do_pad=True
    )
    return HyperLlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        # CLIP's CLS token, which the "default" strategy drops again.
        num_additional_image_tokens=1,
    )
