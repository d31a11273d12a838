"""Processor class for HyperLLaVA: LLaVA-1.5's image processing and prompt format (`vicuna_v1`)."""

from transformers import LlavaProcessor
from transformers.image_utils import make_flat_list_of_images
from transformers.utils.chat_template_utils import render_jinja_template

try:  # Transformers 5.24 and later: placeholders that `sanitize_control_tokens=True` marked in user text
    from transformers.processing_utils import _MARKED_RE
except ImportError:  # earlier releases have no such marks
    _MARKED_RE = None

# LLaVA-1.5's `conv_vicuna_v1` (llava/conversation.py; its training scripts pass `--version v1`): the system line,
# then turns "USER: {question} ASSISTANT: {answer}</s>", the first question starting with "<image>\n". (Its
# `conv_llava_v1` has the same format with a "human" in the system line; LLaVA-1.5 did not train with it.)
VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

# Images go first in a user turn, as LLaVA-1.5 trained (it moved every "<image>" to the front of the question).
# The `{% generation %}` block marks the supervised tokens (`return_assistant_tokens_mask=True`): the answer, its "</s>"
# (LLaVA-1.5 supervises it too) and the space before it, whose token LLaVA-1.5 supervises (its `preprocess_v1`
# counts the prompt up to "ASSISTANT:"), as the answer's first token where the two merge ("▁The"), and alone where they
# do not (Llama's "▁" before a digit): the token a generation prompt, which ends at "ASSISTANT:", must produce first.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] if messages[0]['content'] is string "
    "else messages[0]['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') -%}"
    "{%- set messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system = '" + VICUNA_V1_SYSTEM.replace("'", "\\'") + "' -%}"
    "{%- endif -%}"
    "{{- system + ' ' -}}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}"
    "{%- set text = message['content'] -%}"
    "{%- else -%}"
    "{%- set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- 'USER: ' -}}"
    "{%- if message['content'] is not string -%}"
    "{%- for item in message['content'] | selectattr('type', 'equalto', 'image') -%}{{- '<image>\n' -}}{%- endfor -%}"
    "{%- endif -%}"
    "{{- text + ' ' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- 'ASSISTANT:' -}}{%- generation -%}{{- ' ' + text + eos_token -}}{%- endgeneration -%}"
    "{%- elif message['role'] == 'system' -%}"
    "{{- raise_exception('vicuna_v1 takes a system message only as the first message') -}}"
    "{%- else -%}"
    "{{- raise_exception('vicuna_v1 has roles system, user and assistant; got ' + message['role']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)


_NOT_FOR_THE_UNEXPANDED_PROMPT = (
    "tokenize", "return_dict", "processor_kwargs", "padding", "padding_side", "truncation", "max_length",
    "pad_to_multiple_of",
)  # fmt: skip


def overlap_mask(offsets, spans):
    """1 for each token whose characters (`offsets`, as the tokenizer gives them) overlap one of `spans`."""
    return [
        int(any(start < span_end and end > span_start for span_start, span_end in spans)) for start, end in offsets
    ]


class HyperLlavaProcessor(LlavaProcessor):
    r"""
    Constructs a HyperLLaVA processor: [`LlavaProcessor`] (image processor + tokenizer, each `<image>` expanded to
    the number of visual tokens) with LLaVA-1.5's `vicuna_v1` chat template as the default.

    For LLaVA-1.5's preprocessing use a [`LlavaImageProcessor`] (or `LlavaImageProcessorPil`) with `do_pad=True`
    (pad to a square with the mean colour, then resize and crop to 336) and a tokenizer whose `padding_side` is
    `"left"`, so that batched prompts can be generated from.

    Args:
        image_processor ([`LlavaImageProcessor`], *optional*): The image processor.
        tokenizer ([`PreTrainedTokenizerBase`], *optional*): The tokenizer; it must know `image_token`.
        patch_size (`int`, *optional*): Patch size of the vision tower.
        vision_feature_select_strategy (`str`, *optional*): As in the model's config (`"default"` drops CLS).
        chat_template (`str`, *optional*): Defaults to LLaVA-1.5's `vicuna_v1` format.
        image_token (`str`, *optional*, defaults to `"<image>"`): The image placeholder.
        num_additional_image_tokens (`int`, *optional*, defaults to 0): Extra vision tokens such as CLS (+1).
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        patch_size=None,
        vision_feature_select_strategy=None,
        chat_template=None,
        image_token="<image>",
        num_additional_image_tokens=0,
        **kwargs,
    ):
        super().__init__(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=patch_size,
            vision_feature_select_strategy=vision_feature_select_strategy,
            chat_template=CHAT_TEMPLATE if chat_template is None else chat_template,
            image_token=image_token,
            num_additional_image_tokens=num_additional_image_tokens,
            **kwargs,
        )

    def __call__(self, images=None, text=None, **kwargs):
        # Checked here rather than left to Transformers, whose releases differ (5.17 fails with StopIteration).
        if text is not None:
            texts = [text] if isinstance(text, str) else text
            if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
                raise TypeError(f"text must be a prompt string or a list of them, got {text!r:.200}")
            empty = [i for i, t in enumerate(texts) if not t.strip()]
            if empty:
                raise ValueError(f"Empty prompt at batch index {empty}: every prompt needs some text")
            if images is not None:
                images = self.image_processor.fetch_images(images)  # URLs and paths become images
            num_images = 0 if images is None else len(make_flat_list_of_images(images))
            if kwargs.get("sanitize_control_tokens") and _MARKED_RE is not None:
                # User text that spells the placeholder is marked as text, and Transformers does not expand it.
                texts = [_MARKED_RE.sub("", t) for t in texts]
            num_placeholders = sum(t.count(self.image_token) for t in texts)
            if num_placeholders != num_images:
                raise ValueError(
                    f"The prompts have {num_placeholders} {self.image_token} placeholder(s) but {num_images} image(s) "
                    f"were given: each image needs one {self.image_token} in the text"
                )
        return super().__call__(images=images, text=text, **kwargs)

    def apply_chat_template(self, conversation, chat_template=None, **kwargs):
        mask = kwargs.get("return_assistant_tokens_mask") and kwargs.get("tokenize") and kwargs.get("return_dict")
        # (With sanitize_control_tokens, Transformers 5.24 on refuses the mask and says so; earlier releases ignore the
        # argument, and their own mask is the one this replaces.)
        if not mask or (kwargs.get("sanitize_control_tokens") and _MARKED_RE is not None):
            return super().apply_chat_template(conversation, chat_template, **kwargs)
        # The mask is made here, the same on every release: each token that overlaps an answer's characters, on the
        # prompt before its "<image>"s were expanded (one token each), then expanded as the processor expanded them.
        # (Transformers 5.17 maps the answers onto the expanded prompt, which misplaces them, and stops at an answer
        # whose first character no token covers, such as the space before it where a pre-tokenizer drops spaces; 5.18
        # and later map them right, but return a partial or empty mask for a truncated prompt without a word, which
        # this refuses.) Lists until the mask is placed, then tensors of the type asked for, at the top level or in
        # processor_kwargs.
        processor_kwargs = dict(kwargs.pop("processor_kwargs", None) or {})
        inner_return_tensors = processor_kwargs.pop("return_tensors", None)
        return_tensors = kwargs.pop("return_tensors", None) or inner_return_tensors
        out = super().apply_chat_template(
            conversation,
            chat_template,
            **{**kwargs, "return_assistant_tokens_mask": False},
            processor_kwargs=processor_kwargs,
            return_tensors=None,
        )
        # The conversations as the call above rendered them (OpenAI-style image_url blocks as image blocks): 5.23 and
        # later normalise a copy; earlier releases rewrote the caller's conversation in place, in that call.
        if hasattr(self, "_normalize_conversations"):
            conversations, _ = self._normalize_conversations(conversation)
        else:
            conversations = conversation if isinstance(conversation[0], (list, tuple)) else [conversation]
        # The template's own arguments only: padded or truncated, the unexpanded prompt would no longer match the
        # expanded one token for token.
        template_kwargs = {k: v for k, v in kwargs.items() if k not in _NOT_FOR_THE_UNEXPANDED_PROMPT}
        texts, answers = render_jinja_template(  # (with the special tokens, as the tokenizer renders a template)
            conversations,
            chat_template=self._template_text(chat_template),
            **{**self.tokenizer.special_tokens_map, **template_kwargs},
        )
        unexpanded = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        out["assistant_masks"] = [
            self._expand_assistant_mask(ids, overlap_mask(offsets, spans), expanded)
            for ids, offsets, spans, expanded in zip(
                unexpanded["input_ids"], unexpanded["offset_mapping"], answers, out["input_ids"], strict=True
            )
        ]
        out.convert_to_tensors(tensor_type=return_tensors)
        return out

    def _template_text(self, chat_template):
        """The template that `chat_template` names, as the call above resolved it: a template's text, the name of one
        of the processor's templates, or None for its default one."""
        if isinstance(self.chat_template, dict):
            if chat_template is None:
                return self.chat_template["default"]  # (the call above refused a processor without one)
            return self.chat_template.get(chat_template, chat_template)
        return chat_template or self.chat_template

    def _expand_assistant_mask(self, unexpanded_ids, mask, expanded_ids):
        """The mask of `unexpanded_ids` placed onto `expanded_ids` (images expanded, maybe BOS and padding added)."""
        expanded_ids = list(expanded_ids)
        # Every image of a HyperLLaVA prompt has the same size after processing, hence the same number of tokens.
        num_images = unexpanded_ids.count(self.image_token_id)
        num_image_tokens = expanded_ids.count(self.image_token_id) // num_images if num_images else 0
        core_ids, core_mask = [], []
        for token_id, flag in zip(unexpanded_ids, mask, strict=True):
            repeat = num_image_tokens if token_id == self.image_token_id else 1
            core_ids += [token_id] * repeat
            core_mask += [flag] * repeat
        for start in range(len(expanded_ids) - len(core_ids) + 1):
            if expanded_ids[start : start + len(core_ids)] == core_ids:
                return [0] * start + core_mask + [0] * (len(expanded_ids) - start - len(core_ids))
        raise ValueError(
            "Could not place the assistant mask on the processed prompt (was it truncated?); "
            "call apply_chat_template without truncation to get `assistant_masks`"
        )


__all__ = ["HyperLlavaProcessor"]
