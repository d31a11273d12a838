"""HyperLLaVA (arXiv 2403.13447): LLaVA-1.5 with a visual and a language hypernetwork expert.

Where the paper's equations live:
- Eqs. 2-3 (layer embedding e(n) = Enc_n(g), hypernetwork K(n) = W2 (W1 e(n) + B1) + B2 + b(n)): `HyperExpert.forward`
- Eq. 4 (adapter E(x) = SwiGLU(x W_d) W_u, with K(n) split into W_d and W_u): `split_weights`, `swiglu_bottleneck`,
  `expert_adapter`
- Eq. 5 (visual expert, a shift of the projector): `HyperLlavaMultiModalProjector.forward`
- Language expert (guidance after layer k-1, adapters beside the FFN of later layers): `HyperLlamaModel.forward`,
  `HyperLlamaDecoderLayer.forward`. The prompt the guidance pools over: `prompt_mask` (training, from the labels),
  `_expand_inputs_for_generation` (generation); the weights continue with the cache they were generated for.
"""

import copy
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, LlavaConfig
from transformers import initialization as init
from transformers.cache_utils import DynamicCache
from transformers.generation.continuous_batching import PagedAttentionCache
from transformers.masking_utils import create_causal_mask, find_packed_sequence_indices
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)
from transformers.models.llava.modeling_llava import (
    LlavaCausalLMOutputWithPast,
    LlavaForConditionalGeneration,
    LlavaModel,
    LlavaModelOutputWithPast,
    LlavaMultiModalProjector,
    LlavaPreTrainedModel,
)
from transformers.utils import can_return_tuple
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_hyperllava import HyperLlavaConfig
from .fused_expert_hyperllava import (
    DecodeAdapter,
    beats_eager,
    expert_adapter_beside_ffn,
    fused_expert_adapter,
)
from .fused_expert_hyperllava import is_available as fused_kernel_available

# Transformers 5.24 renamed the forward argument `past_key_values` to `cache`; we pass on whichever the installed
# version speaks, so one file serves every supported release.
CACHE_ARG = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"
# Likewise for the images an output reports: 5.24's `image_outputs` (the image encoder's output, the projected features
# as its pooler_output), earlier releases' `image_hidden_states` (the projected features).
IMAGE_OUTPUT = (
    "image_outputs" if "image_outputs" in LlavaModelOutputWithPast.__dataclass_fields__ else "image_hidden_states"
)
# And the logits a forward computes: 5.21+ LLaVA takes a 2-D `logits_to_keep` too (positions or a mask per sample),
# earlier releases' an int or a 1-D tensor of positions.
try:
    from transformers.modeling_utils import slice_logits_to_keep
except ImportError:

    def slice_logits_to_keep(hidden_states, logits_to_keep):
        return hidden_states[:, slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep]


def swiglu_bottleneck(x, w_down):
    """Eq. 4's SwiGLU(x W_d), the (B, T, r) bottleneck of E(x) = SwiGLU(x W_d) W_u; per-sample weights.
    x: (B, T, d_in), w_down: (B, d_in, 2r); `expert_adapter` multiplies by W_u (B, r, d_out).

    bmm, not matmul: eager decoding is bound by the number of dispatched ops, and matmul's reshaping and expanding of
    batched operands made the adapter 16 ops instead of 6 (now 5 in decoding: `expert_adapter`).
    """
    gate, value = torch.bmm(x, w_down).chunk(2, dim=-1)
    return F.silu(gate) * value


def split_weights(weights, in_dim, rank, out_dim):
    """Eq. 4's split of K (..., P) into W_d (..., d_in, 2r) and W_u (..., r, d_out): views, no copies. (A function
    of the sizes, not a method of the expert: PEFT's `target_parameters` wraps the expert in a module of its own.)"""
    num_down = 2 * rank * in_dim
    return (
        weights[..., :num_down].unflatten(-1, (in_dim, 2 * rank)),
        weights[..., num_down:].unflatten(-1, (rank, out_dim)),
    )


# Whether "auto" computes the language expert's adapter beside the FFN, on a second stream, in a compiled decoding step
# (`expert_adapter_beside_ffn`, which has no backward) rather than after it: on an H200 it took less GPU time per 7B
# step than the fused op after the FFN, at batch 1 (1.005x LLaVA's against 1.010x) and 16 (1.007x against 1.022x),
# and less wall-clock time (run 9, docs/performance.md).
ADAPTER_BESIDE_FFN = True


def expert_adapter(x, w_down, w_up, residual, kernel="eager", ffn=None, decode=None):
    """`residual [+ ffn(x)] + E(x)`, by the fused kernel or in plain PyTorch; weights per sample or shared (batch 1).

    x: (B, T, d_in), w_down: (B|1, d_in, 2r), w_up: (B|1, r, d_out), residual: (B, T, d_out). `ffn`: the FFN beside
    which the expert sits (the language expert's), applied to x too; its output is added to the residual first.
    `decode`: this layer's adapter for eager decoding steps on an NVIDIA GPU (`DecodeAdapter`: the whole sum by one
    launch), which "auto" uses where it serves.
    """
    if kernel == "triton" or (
        # The fused decode kernel takes half the eager adapter's GPU time and, launched directly, less host time a
        # call, but eager decoding measured slower with it, so "auto" launches it only inside a compiled graph; eager
        # decoding launches one kernel a layer instead (`decode`, below: level with the eager adapter at batch 1 and
        # 1-2% faster at batch 16, where the fused op was the slowest of the three, run 13; docs/performance.md).
        kernel == "auto"
        and torch.compiler.is_compiling()
        and fused_kernel_available(x.device)
        and beats_eager(x, w_up)
    ):
        if kernel == "auto" and ffn is not None and ADAPTER_BESIDE_FFN and not torch.is_grad_enabled():
            return expert_adapter_beside_ffn(x, w_down, w_up, residual, ffn)
        return fused_expert_adapter(x, w_down, w_up, residual, None if ffn is None else ffn(x))
    decoding = ffn is not None and not torch.is_grad_enabled()
    if decoding:
        ffn_out = ffn(x)
        if kernel == "auto" and decode is not None and (out := decode(x, residual, ffn_out)) is not None:
            return out
        total = residual + ffn_out
    if w_down.shape[0] != x.shape[0]:  # one weight set shared by the batch
        w_down, w_up = w_down.expand(x.shape[0], -1, -1), w_up.expand(x.shape[0], -1, -1)
    bottleneck = swiglu_bottleneck(x, w_down)
    if decoding:
        # Without autograd (decoding), W_u's product is added into the sum h + FFN(x) that this call makes: one op
        # and one kernel fewer per expert layer in host-bound eager decoding, and rounded once, as the fused kernel
        # does. Not where the dtypes differ (a float32 residual stream under autocast: an in-place op does not cast),
        # nor under autograd (below).
        if total.dtype == bottleneck.dtype == w_up.dtype:
            return total.baddbmm_(bottleneck, w_up)
        return total + torch.bmm(bottleneck, w_up)
    # E(x) before the FFN: activation checkpointing recomputes a layer only up to the last tensor saved for backward.
    # For LLaVA's layer that is the input of the FFN's down projection, so the recomputation skips that GEMM; with the
    # expert after the FFN it would run the whole FFN again (7.3 ms of a 7B training step's 448, docs/performance.md).
    expert = torch.bmm(bottleneck, w_up)
    if ffn is not None:
        residual = residual + ffn(x)
    return residual + expert


def decode_adapters_available(device) -> bool:
    """Whether eager decoding adds the adapters with one launch of a fused kernel a layer (`DecodeAdapter`):
    where the fused kernels run (an NVIDIA GPU with Triton)."""
    return torch.device(device).type == "cuda" and fused_kernel_available(device)


# The language expert's weights ride on the cache they were generated with, so that whoever continues the cache (a
# later `generate` call, a decoding loop of one's own, assisted decoding's assistant model) continues with them.
CACHED_WEIGHTS = "language_expert_weights"
WEIGHTS_BUFFER = "language_expert_weights_buffer"  # a static cache's copy for generate's decoding steps
LAYER_WEIGHTS = "language_expert_layer_weights"  # the weights a cache continues with, with each layer's views of them


def _known_length(cache):
    """How many tokens `cache` holds; None inside a compiled graph when that is a tensor (a static cache's), where
    reading it would break the graph (and, run, sync with the device)."""
    length = cache.get_seq_length()
    if isinstance(length, torch.Tensor) and torch.compiler.is_compiling():
        return None
    return int(length)


def _weights_of(cache):
    """The language expert's weights that a non-empty `cache`'s tokens were computed with, else None."""
    if isinstance(cache, PagedAttentionCache):
        # Continuous batching's cache holds many requests and no length: every step generates the weights (only
        # outside "dynamic" mode, where they do not depend on the input; `init_continuous_batching` refuses it).
        return None
    weights = getattr(cache, CACHED_WEIGHTS, None)
    # A cache emptied by `reset()` keeps the attribute, but it then starts a new sequence. (A compiled graph cannot
    # tell an emptied static cache from a filled one: there the weights it carries are taken, docs/model.md.)
    if weights is None or _known_length(cache) == 0:
        return None
    return weights


def _static_copy(cache, weights):
    """The weights in a buffer that `cache` keeps for `generate`'s decoding steps, marked as a static address as
    Transformers marks a static cache's keys and values: compiled decoding's CUDA graphs then read them in place
    instead of copying them in before every step (6 MiB per token at batch 1, 96 MiB at batch 16 for 7B;
    docs/performance.md). A new sequence on the same cache refills the buffer, so that the graphs recorded for the
    cache stay valid. Only the decoding steps get it: a refill would change the tensor under anyone who kept it."""
    buffer = getattr(cache, WEIGHTS_BUFFER, None)
    if (
        buffer is not None
        and (buffer.shape, buffer.dtype, buffer.device) == (weights.shape, weights.dtype, weights.device)
        and (not buffer.is_inference() or torch.is_inference_mode_enabled())  # (read-only outside inference mode)
    ):
        return buffer.copy_(weights)
    buffer = weights.clone()
    torch._dynamo.mark_static_address(buffer)
    setattr(cache, WEIGHTS_BUFFER, buffer)
    return buffer


def prompt_mask(labels, attention_mask=None):
    """The prompt of each training sample: the non-padding tokens before its first supervised token.

    The language guidance is pooled over this mask only, so that no answer token reaches the weights that predict it.
    """
    mask = (labels != -100).cumsum(dim=-1) == 0
    if attention_mask is None:
        return mask
    if attention_mask.dim() != 2:
        raise ValueError(
            f"a {attention_mask.dim()}-D attention_mask does not say which tokens are padding, so the labels alone "
            "cannot name the prompt: pass language_guidance_mask (batch, sequence_length) to pool the language "
            "guidance over"
        )
    # (An attention mask that also covers cached tokens, as PEFT's prefix tuning passes it, ends with the labels'
    # positions: sliced so, it reaches the model's own refusal of such a cache instead of failing on shapes here.)
    return mask & attention_mask[:, -labels.shape[1] :].bool()


def mean_pool(hidden_states, mask=None):
    """Mean of `hidden_states` (B, T, d) over the positions where `mask` (B, T) is set; all positions without one."""
    if mask is None:
        return hidden_states.mean(dim=1)
    # (The mask comes with the inputs; under a device_map the hidden states can be on another device.)
    mask = mask.to(hidden_states.device, hidden_states.dtype).unsqueeze(-1)
    # Summed in at least float32: in float16 the sum over a long prompt overflows where the mean does not (Llama's
    # massive activations, ~2500 in a channel at a few tokens, pass 65504 at 27 of them). The count is clamped so that
    # an empty prompt gives a zero guidance instead of NaN, without a host sync.
    dtype = torch.promote_types(hidden_states.dtype, torch.float32)
    total = (mask * hidden_states).sum(dim=1, dtype=dtype)
    return (total / mask.sum(dim=1, dtype=dtype).clamp(min=1)).to(hidden_states.dtype)


class HyperExpert(nn.Module):
    """A hypernetwork expert: generates the adapter weights K(n) of `num_layers` layers from a guidance vector.

    Modes (config.expert_mode): "dynamic" e(n) = Enc_n(g) (the paper); "latent" e(n) = z(n), a learned latent
    (Table 5's vanilla HyperNetwork); "static" K(n) = b(n), a plain adapter with learned weights.
    """

    def __init__(self, config: HyperLlavaConfig, guidance_dim: int, in_dim: int, out_dim: int, num_layers: int):
        super().__init__()
        self.mode = config.expert_mode
        self.in_dim, self.out_dim, self.rank = in_dim, out_dim, config.expert_bottleneck_dim
        self.num_down = 2 * self.rank * in_dim  # W_d holds both SwiGLU halves
        num_params = self.num_down + self.rank * out_dim
        m, h = config.expert_embedding_dim, config.hypernetwork_hidden_dim
        if self.mode == "dynamic":  # Enc_n: one Linear(d_g, m) per layer
            self.encoder_weight = nn.Parameter(torch.empty(num_layers, m, guidance_dim))
            self.encoder_bias = nn.Parameter(torch.empty(num_layers, m))
        elif self.mode == "latent":  # z(n)
            self.latent = nn.Parameter(torch.empty(num_layers, m))
        if self.mode != "static":
            self.hyper_in = nn.Linear(m, h)  # W1, B1: shared by all layers
            self.hyper_out = nn.Linear(h, num_params)  # W2, B2: shared by all layers
            # Its rows from num_down on produce W_u: tagged for the model's initialisation, which zeroes them.
            self.hyper_out.num_down = self.num_down
        self.layer_bias = nn.Parameter(torch.empty(num_layers, num_params))  # b(n)

    def forward(self, guidance=None):
        """Eqs. 2-3: K(n) for every layer, (B, num_layers, P). B is 1 when K does not depend on the input."""
        if self.mode == "static":
            return self.layer_bias.unsqueeze(0)
        if self.mode == "dynamic":  # e(n) = Enc_n(g), every layer's at once
            embedding = torch.einsum("bg,lmg->blm", guidance, self.encoder_weight) + self.encoder_bias
        else:
            embedding = self.latent.unsqueeze(0)
        # No activation between the two linears, as the paper writes it.
        return self.hyper_out(self.hyper_in(embedding)) + self.layer_bias

    def init_weights(self, std):
        """Everything that produces W_u starts at zero (a new HyperLLaVA computes exactly its LLaVA base); W_d
        starts small and random, like LoRA's A, so that the first step already has a gradient for W_u."""
        if self.mode == "dynamic":
            init.normal_(self.encoder_weight, std=std)
            init.zeros_(self.encoder_bias)
        elif self.mode == "latent":
            init.normal_(self.latent, std=1.0)
        if self.mode != "static":
            init.normal_(self.hyper_in.weight, std=std)
            init.zeros_(self.hyper_in.bias)
            init.zeros_(self.hyper_out.bias)
            self._init_down_random_up_zero(self.hyper_out.weight, dim=0, std=std)
        # LoRA-like scale for the per-layer W_d: x W_d keeps the size of x.
        self._init_down_random_up_zero(self.layer_bias, dim=-1, std=self.in_dim**-0.5)

    def _init_down_random_up_zero(self, param, dim, std):
        # Slicing drops Transformers' "already loaded" flag, so check it here: never overwrite loaded weights.
        if getattr(param, "_is_hf_initialized", False):
            return
        with torch.no_grad():
            param.normal_(std=std)
            param.narrow(dim, self.num_down, param.shape[dim] - self.num_down).zero_()


def init_expert_weights(module, std):
    """HyperLLaVA's part of `_init_weights`, which Transformers calls for each module, children first. Also for an
    expert's `hyper_out` on its own: Transformers skips an expert whose own parameters all loaded, so one whose
    hypernetwork alone is new (another hypernetwork_hidden_dim) gets only its linear layers initialised, and their W_u
    rows must start at zero all the same. (Zeroed without a random draw: a model built from a seed keeps its values.)"""
    if isinstance(module, HyperExpert):
        module.init_weights(std)
    elif isinstance(module, nn.Linear) and hasattr(module, "num_down"):
        if not getattr(module.weight, "_is_hf_initialized", False):
            with torch.no_grad():
                module.weight[module.num_down :].zero_()


class HyperLlavaMultiModalProjector(LlavaMultiModalProjector):
    """LLaVA-1.5's two-layer projector plus the visual expert of Eq. 5, with weights generated per image: `"first"`
    shifts the hidden state inside the GELU, `"second"` the output, `"both"` does both (E_V2 reads the shifted hidden
    state)."""

    def __init__(self, config: HyperLlavaConfig):
        super().__init__(config)
        vision_dim, text_dim = self.linear_1.in_features, self.linear_1.out_features
        variant = config.visual_expert
        self.visual_expert_first = (
            HyperExpert(config, vision_dim, vision_dim, text_dim, 1) if variant in ("first", "both") else None
        )
        self.visual_expert_second = (
            HyperExpert(config, text_dim, text_dim, text_dim, 1) if variant in ("second", "both") else None
        )
        self.expert_kernel, self.expert_rank = config.expert_kernel, config.expert_bottleneck_dim

    def forward(self, image_features):
        hidden_states = self.linear_1(image_features)
        if self.visual_expert_first is not None:  # "first": V = L2(GELU(L1 f + E_V1(f)))
            hidden_states = self._shift(self.visual_expert_first, image_features, hidden_states)
        hidden_states = self.act(hidden_states)
        output = self.linear_2(hidden_states)
        if self.visual_expert_second is not None:  # "second": V = L2(a) + E_V2(a)
            output = self._shift(self.visual_expert_second, hidden_states, output)
        return output

    def _shift(self, expert, expert_input, residual):
        # One set of weights per image, generated from the mean of the expert's input over the image's patches (the
        # visual expert is a single "layer": [:, 0]).
        weights = expert(mean_pool(expert_input))[:, 0]
        w_down, w_up = split_weights(weights, expert_input.shape[-1], self.expert_rank, residual.shape[-1])
        return expert_adapter(expert_input, w_down, w_up, residual, self.expert_kernel)


class HyperLlamaDecoderLayer(LlamaDecoderLayer):
    """A Llama decoder layer that, given adapter weights, adds the language expert beside its FFN:
    `out = h + FFN(norm2(h)) + E_L(norm2(h))` with `h = x + Attn(norm1(x))`."""

    def __init__(self, config, layer_idx: int, expert_kernel: str):
        super().__init__(config, layer_idx)
        self.expert_kernel = expert_kernel

    # The weights come positionally so that activation checkpointing sees them as inputs, reentrant or not.
    def forward(self, hidden_states, expert_down=None, expert_up=None, expert_decode=None, **kwargs):
        residual = hidden_states
        hidden_states, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)
        hidden_states = residual + hidden_states
        normed = self.post_attention_layernorm(hidden_states)
        if expert_down is None:
            return hidden_states + self.mlp(normed)
        # The FFN runs inside the adapter call: the fused kernel does both additions, which saves a compiled step one
        # kernel per expert layer (Inductor cannot fuse an add into a custom op's input), and the eager adapter runs
        # the expert before the FFN under autograd (cheaper recomputation under activation checkpointing) and adds its
        # last product into the FFN's sum without (one op fewer in decoding).
        return expert_adapter(
            normed, expert_down, expert_up, hidden_states, self.expert_kernel, ffn=self.mlp, decode=expert_decode
        )


@dataclass
class HyperLlavaModelOutputWithPast(LlavaModelOutputWithPast):
    r"""
    language_expert_weights (`torch.FloatTensor` of shape `(batch_size or 1, num_expert_layers, P)`, *optional*):
        The language expert's weights K(n) that this call generated, or took from the cache it continues (`None` when
        they were passed in), to be passed back during generation.
    """

    language_expert_weights: torch.FloatTensor | None = None


@dataclass
class HyperLlavaCausalLMOutputWithPast(LlavaCausalLMOutputWithPast):
    r"""
    language_expert_weights (`torch.FloatTensor` of shape `(batch_size or 1, num_expert_layers, P)`, *optional*):
        The language expert's weights K(n) that this call generated, or took from the cache it continues (`None` when
        they were passed in), to be passed back during generation.
    """

    language_expert_weights: torch.FloatTensor | None = None


class HyperLlavaPreTrainedModel(LlavaPreTrainedModel):
    config: HyperLlavaConfig
    # Each on one device under a device_map (accelerate moves tensors only at the boundaries of the modules it
    # places): the projector applies the visual expert's generated weights to its own hidden state. Transformers adds
    # the submodels' lists (CLIP's, and HyperLlamaModel's below).
    _no_split_modules = ["HyperLlavaMultiModalProjector"]

    def _init_weights(self, module):
        super()._init_weights(module)
        init_expert_weights(module, self.config.text_config.initializer_range)

    def save_pretrained(self, save_directory, *args, **kwargs):
        # A config that would not load is refused before anything is written: Transformers copies the remote-code
        # files into the folder (and, with push_to_hub, creates the repo) before it saves, and so checks, the config.
        self.config.validate()
        return super().save_pretrained(save_directory, *args, **kwargs)

    def push_to_hub(self, *args, **kwargs):
        self.config.validate()  # before Transformers creates the Hub repo (it saves, and so checks, only after)
        return super().push_to_hub(*args, **kwargs)


class HyperLlamaModel(LlamaModel):
    """The Llama text model with the language expert: guidance after layer k-1, adapters in the later layers."""

    # An expert adds its own parameters to its linear layers' outputs: on one device.
    _no_split_modules = ["HyperLlamaDecoderLayer", "HyperExpert"]

    def __init__(self, config: HyperLlavaConfig):
        text_config = config.text_config
        # LlamaModel's constructor with expert-aware decoder layers (calling it and replacing its layers would
        # initialise every layer twice).
        super(LlamaModel, self).__init__(text_config)
        self.padding_idx = text_config.pad_token_id
        self.vocab_size = text_config.vocab_size
        self.embed_tokens = nn.Embedding(text_config.vocab_size, text_config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            HyperLlamaDecoderLayer(text_config, i, config.expert_kernel) for i in range(text_config.num_hidden_layers)
        )
        self.norm = LlamaRMSNorm(text_config.hidden_size, eps=text_config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=text_config)
        self.gradient_checkpointing = False

        expert_layers = config.language_expert_layer_indices
        self.expert_layers = expert_layers
        self.guidance_layer = config.language_guidance_layer
        self.expert_rank = config.expert_bottleneck_dim
        d = text_config.hidden_size
        self.language_expert = HyperExpert(config, d, d, d, len(expert_layers)) if expert_layers else None
        # Only the "dynamic" mode generates its weights from the prompt; the others' do not depend on the input.
        self.pools_guidance = bool(expert_layers) and config.expert_mode == "dynamic"
        self.post_init()

    def _init_weights(self, module):
        super()._init_weights(module)
        init_expert_weights(module, self.config.initializer_range)

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        inputs_embeds=None,
        use_cache=None,
        language_guidance_mask=None,
        language_expert_weights=None,
        **kwargs,
    ) -> HyperLlavaModelOutputWithPast:
        r"""
        language_guidance_mask (`torch.BoolTensor` of shape `(batch_size, sequence_length)`, *optional*):
            The prompt positions to pool the guidance over. Defaults to `attention_mask` (the whole prefill).
        language_expert_weights (`torch.FloatTensor`, *optional*):
            Weights generated by an earlier call (generation's prefill); when given, no guidance is computed.
        """
        # LlamaModel.forward, plus: either cache name, the guidance at layer k, and each expert layer's weights.
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        # Either name, whatever the release: 5.24's `cache`, or `past_key_values` (earlier releases, and a deprecated
        # alias).
        cache, past_key_values = kwargs.pop("cache", None), kwargs.pop("past_key_values", None)
        cache = past_key_values if cache is None else cache
        if CACHE_ARG == "past_key_values" and isinstance(cache, PagedAttentionCache):
            # Before 5.24 continuous batching hands its paged cache to the attention functions as `cache`, as
            # LlamaModel passes it on; as `past_key_values` the attention layers would also update it themselves, and
            # fail.
            kwargs["cache"], cache = cache, None
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        given = language_expert_weights is not None
        if given and self.language_expert is not None:
            self._check_weights(language_expert_weights, len(inputs_embeds), "the language_expert_weights passed")
        if (
            given
            and cache is not None
            and not torch.compiler.is_compiling()  # (where setting them would be a side effect of the graph)
            and language_expert_weights is not getattr(cache, WEIGHTS_BUFFER, None)  # (the decoding steps' own copy)
        ):
            # Weights passed in ride on the cache too: whoever continues it continues with them, not with those of a
            # sequence the cache held before.
            setattr(cache, CACHED_WEIGHTS, language_expert_weights)
        if not given and self.language_expert is not None:
            if (
                self.pools_guidance
                and torch.compiler.is_exporting()
                and cache is not None
                and _known_length(cache) != 0
            ):
                # An exported program keeps no Python state, and unlike a compiled graph it has no guard on the cache's:
                # it would generate the weights from every call's own tokens, or keep one sequence's for all.
                raise ValueError(
                    f"torch.export of a call that continues a cache ({type(cache).__name__}) cannot carry the language "
                    "expert's weights from the prefill to the decoding steps: they ride on the cache as a Python "
                    "attribute, which an exported program does not keep. Export the decoding step with "
                    "language_expert_weights (the prefill's output.language_expert_weights) as an input, or export the "
                    "prefill alone with an empty DynamicCache"
                )
            # A call that continues a cache (a later turn of a chat, a decoding loop of one's own, an assistant model)
            # continues with the weights that the cache's tokens were computed with.
            language_expert_weights = _weights_of(cache)
            if language_expert_weights is not None and language_expert_weights.shape[0] not in (1, len(inputs_embeds)):
                raise ValueError(
                    f"the cache carries the language expert's weights of {len(language_expert_weights)} sequences, "
                    f"but the input has {len(inputs_embeds)}: rows selected or repeated on the cache "
                    "(batch_select_indices, batch_repeat_interleave) move its keys and values, not the weights it "
                    "carries; index cache.language_expert_weights the same way (docs/model.md)"
                )
            if language_expert_weights is not None:
                self._check_weights(
                    language_expert_weights, len(inputs_embeds), "the language expert weights the cache carries"
                )
            if language_expert_weights is None and self.pools_guidance:
                if language_guidance_mask is None and attention_mask is not None and attention_mask.dim() == 2:
                    language_guidance_mask = attention_mask[:, -inputs_embeds.shape[1] :]
                self._check_guidance_inputs(
                    language_guidance_mask, attention_mask, inputs_embeds.shape[1], cache, position_ids, kwargs
                )
        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)
        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **{CACHE_ARG: cache},
        )
        layer_kwargs = {
            "attention_mask": causal_mask,
            "position_ids": position_ids,
            "position_embeddings": self.rotary_emb(inputs_embeds, position_ids=position_ids),
            "use_cache": use_cache,
            CACHE_ARG: cache,
            **kwargs,
        }

        hidden_states = inputs_embeds
        layer_weights = {}
        for idx, decoder_layer in enumerate(self.layers[: self.config.num_hidden_layers]):
            if idx == self.guidance_layer and self.language_expert is not None:
                if language_expert_weights is None:  # the prefill: generate once, reused at every decode step
                    # g_L: the input of layer k, pooled over the prompt
                    g_L = mean_pool(hidden_states, language_guidance_mask) if self.pools_guidance else None
                    language_expert_weights = self.language_expert(g_L)
                    # (Not while exporting: an exported program keeps no Python state, and the tracer's tensor would
                    # stay on the cache, which Transformers' export wrappers hold, for a later eager call to read.)
                    if cache is not None and not torch.compiler.is_exporting():
                        setattr(cache, CACHED_WEIGHTS, language_expert_weights)
                layer_weights = self._layer_weights(language_expert_weights, cache)
            hidden_states = decoder_layer(hidden_states, *layer_weights.get(idx, ()), **layer_kwargs)

        return HyperLlavaModelOutputWithPast(
            last_hidden_state=self.norm(hidden_states),
            # The weights this call did not get as an argument (None otherwise): the caller keeps the ones it has.
            language_expert_weights=None if given else language_expert_weights,
            **{CACHE_ARG: cache},
        )

    def _layer_weights(self, weights, cache):
        """Each expert layer's (W_d, W_u), views into `weights`, and where they are kept on an NVIDIA GPU, its adapter
        for eager decoding steps (`DecodeAdapter`). Made once per sequence: kept on `cache` for the decoding
        steps that continue it with the same weights, as making them (a split and two unbinds: 36 views) cost eager
        decoding about 1% of its step. Kept and reused only without autograd (views made under it would carry one
        forward's graph into the next; views made without it would drop the gradient of a forward under it), and not
        inside a compiled graph, where views cost nothing."""
        keep = cache is not None and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
        kept = getattr(cache, LAYER_WEIGHTS, None) if keep else None
        if kept is not None and kept[0] is weights:
            return kept[1]
        d = self.config.hidden_size
        expert_down, expert_up = split_weights(weights, d, self.expert_rank, d)
        # One unbind for all layers: per-layer indexing would cost two more ops per layer and decode step.
        layer_weights = dict(zip(self.expert_layers, zip(expert_down.unbind(1), expert_up.unbind(1))))
        if keep:
            # (Not continuous batching's paged cache: every step there brings new weights.)
            if decode_adapters_available(weights.device) and not isinstance(cache, PagedAttentionCache):
                layer_weights = {idx: (*pair, DecodeAdapter(*pair)) for idx, pair in layer_weights.items()}
            setattr(cache, LAYER_WEIGHTS, (weights, layer_weights))
        return layer_weights

    def _check_weights(self, weights, batch, source):
        """Refuse weights from outside this call (passed in, or carried by a cache) that are not one weight set per
        sequence (or one for all) of this model's expert layers: split per layer, too few layers would leave the later
        ones without an adapter, and other sizes would make another model's adapters."""
        expected = (len(self.expert_layers), 3 * self.expert_rank * self.config.hidden_size)  # W_d and W_u, Eq. 4
        if weights.dim() != 3 or weights.shape[0] not in (1, batch) or tuple(weights.shape[1:]) != expected:
            shapes = " or ".join(str((rows, *expected)) for rows in dict.fromkeys((batch, 1)))
            raise ValueError(
                f"{source} have shape {tuple(weights.shape)}, but this model takes {shapes}: a weight set per "
                f"sequence (or one for all) for each of its {expected[0]} expert layers, of 3 * expert_bottleneck_dim "
                "* hidden_size values. Pass the weights that this model generated for these sequences "
                "(output.language_expert_weights)"
            )

    @staticmethod
    def _check_guidance_inputs(guidance_mask, attention_mask, length, cache, position_ids, kwargs):
        """Refuse what would pool the guidance over the wrong tokens instead of silently doing it."""
        # Packed sequences (`DataCollatorWithFlattening`), found as Transformers' attention masks find them: position
        # ids that restart without an attention mask, or flash attention's sequence boundaries. (Not inside a compiled
        # graph, where finding them would break it.)
        if "cu_seq_lens_q" in kwargs or (
            position_ids is not None
            and attention_mask is None
            and not torch.compiler.is_compiling()
            and find_packed_sequence_indices(position_ids) is not None
        ):
            raise ValueError(
                "the input packs several sequences into one row (position_ids restart, or cu_seq_lens_q is given), "
                "but the language expert generates one weight set per row from its prompt, so every packed sequence "
                "would get the first one's: give each sequence a row of its own (padded, as LlavaDataCollator does)"
            )
        if cache is not None and (_known_length(cache) or 0) > 0:
            raise ValueError(
                f"the cache already holds {_known_length(cache)} tokens but not the language expert's weights "
                "that they were computed with (a cache filled by this model carries them): pass them as "
                "language_expert_weights. The guidance cannot be pooled over tokens the cache holds. (PEFT's prefix "
                "tuning passes its prefix as such a cache, and is not supported with a language expert.)"
            )
        if guidance_mask is None and attention_mask is not None:
            raise ValueError(
                f"a {attention_mask.dim()}-D attention_mask does not say which tokens are the prompt: pass "
                "language_guidance_mask (batch, sequence_length) to pool the language guidance over"
            )
        if guidance_mask is not None and guidance_mask.shape[-1] != length:
            raise ValueError(
                f"language_guidance_mask covers {guidance_mask.shape[-1]} positions but the input has {length}: "
                "a cache filled earlier needs that prefill's language_expert_weights"
            )


class HyperLlavaModel(HyperLlavaPreTrainedModel, LlavaModel):
    """LLaVA's vision tower, the projector with the visual expert, and the text model with the language expert."""

    def __init__(self, config: HyperLlavaConfig):
        # The config checked itself when built, but `from_pretrained(..., expert_mode=...)` sets fields afterwards.
        config.validate_expert_fields()
        HyperLlavaPreTrainedModel.__init__(self, config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = HyperLlavaMultiModalProjector(config)
        self.language_model = HyperLlamaModel(config)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids=None,
        pixel_values=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        vision_feature_layer=None,
        vision_feature_select_strategy=None,
        language_guidance_mask=None,
        language_expert_weights=None,
        cache=None,
        mm_encoder_outputs=None,
        **kwargs,
    ) -> HyperLlavaModelOutputWithPast:
        # LlavaModel.forward (5.24), plus: the guidance inputs passed on, PEFT's virtual tokens, named input errors.
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if input_ids is None and language_guidance_mask is not None:
            # PEFT's prompt tuning and p-tuning put virtual tokens in front of the embeddings (and ones in front of the
            # attention mask) after the guidance mask was made, by the collator or `generate`: they are prompt.
            prepended = inputs_embeds.shape[1] - language_guidance_mask.shape[1]
            if prepended > 0:
                prefix = language_guidance_mask.new_ones(len(inputs_embeds), prepended)
                language_guidance_mask = torch.cat([prefix, language_guidance_mask], dim=1)
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        # The images come as pixels or, as `generate` passes them since 5.18, already encoded (`get_image_features`).
        image_outputs = (mm_encoder_outputs or {}).get("image")
        if pixel_values is not None:
            if image_outputs is not None:
                raise ValueError("pass the images once: pixel_values or mm_encoder_outputs['image'], not both")
            if not kwargs.get("interpolate_pos_encoding"):
                self._check_pixel_shape(pixel_values)
            image_outputs = self.get_image_features(
                pixel_values=pixel_values,
                vision_feature_layer=vision_feature_layer,
                vision_feature_select_strategy=vision_feature_select_strategy,
                return_dict=True,
                **kwargs,
            )
        image_features = None
        if image_outputs is not None:
            self._check_image_count(input_ids, image_outputs.pooler_output)
            image_features = torch.cat(image_outputs.pooler_output, dim=0).to(
                inputs_embeds.device, inputs_embeds.dtype
            )
            special_image_mask = self.get_placeholder_mask(input_ids, inputs_embeds, image_features)
            inputs_embeds = inputs_embeds.masked_scatter(special_image_mask, image_features)

        outputs = self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            language_guidance_mask=language_guidance_mask,
            language_expert_weights=language_expert_weights,
            cache=cache if cache is not None else past_key_values,
            **kwargs,
        )
        images = image_outputs if IMAGE_OUTPUT == "image_outputs" else image_features
        return HyperLlavaModelOutputWithPast(**outputs, **{IMAGE_OUTPUT: images})

    def _check_pixel_shape(self, pixel_values):
        """A clear error before a wrong image size turns into a shape error deep inside the vision tower."""
        vision = self.config.vision_config
        expected = (vision.num_channels, vision.image_size, vision.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"pixel_values must have shape (num_images, {', '.join(map(str, expected))}), "
                f"got {tuple(pixel_values.shape)}"
            )

    def _check_image_count(self, input_ids, features_per_image):
        """LLaVA's own check counts feature elements; this one names images and image tokens. (Counting needs the
        token ids and a host sync; LLaVA's check still runs after.)"""
        if input_ids is None or torch.compiler.is_compiling():
            return
        num_image_tokens = int((input_ids == self.config.image_token_id).sum())
        num_features = sum(len(features) for features in features_per_image)
        if num_image_tokens != num_features:
            per_image = len(features_per_image[0])
            raise ValueError(
                f"got {len(features_per_image)} image(s) of {per_image} features but {num_image_tokens} image tokens "
                f"(id {self.config.image_token_id}) in input_ids; each image needs exactly {per_image} image tokens, "
                f"i.e. {num_image_tokens / per_image:g} image(s) for these input_ids"
            )


# What `from_pretrained` passes on to the Hub to find a checkpoint's config.json (the rest of `load_kwargs` is LLaVA's).
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "subfolder", "token")


def _checkpoint_model_type(path, load_kwargs):
    """The `model_type` that the checkpoint's config.json names; None where it names none or there is none (weights
    only, loaded with a `config=` of one's own): LLaVA's class then decides, as it did before this check."""
    hub_kwargs = {key: value for key, value in load_kwargs.items() if key in _HUB_KWARGS}
    try:
        return LlavaConfig.get_config_dict(path, **hub_kwargs)[0].get("model_type")
    except OSError:  # (LLaVA's class raises it again where it needs the file)
        return None


class HyperLlavaForConditionalGeneration(HyperLlavaPreTrainedModel, LlavaForConditionalGeneration):
    def __init__(self, config: HyperLlavaConfig):
        HyperLlavaPreTrainedModel.__init__(self, config)
        self.model = HyperLlavaModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def from_llava(cls, path_or_model, load_kwargs=None, **config_overrides):
        """Upgrade a Transformers LLaVA checkpoint (path, Hub id or `LlavaForConditionalGeneration`) to HyperLLaVA.

        The shared weights keep their names (and, for a model passed in, its tensors: the two models share them); the
        experts are new and start as the identity, so the new model's logits equal the LLaVA model's until it is
        trained. `load_kwargs` go to `LlavaForConditionalGeneration.from_pretrained` (e.g. `{"dtype": torch.float32}`
        for training); `config_overrides` set HyperLLaVA's fields.
        """
        if isinstance(path_or_model, nn.Module):
            model_type = getattr(path_or_model.config, "model_type", None)
        else:
            # Read before the weights: LLaVA's class loads another model's folder with a warning only (a HyperLLaVA's
            # experts reported unexpected and dropped), and the experts built below would replace trained ones.
            model_type = _checkpoint_model_type(path_or_model, load_kwargs or {})
        if model_type not in ("llava", None):
            advice = (
                "load it with HyperLlavaForConditionalGeneration.from_pretrained(path, **config_overrides), which "
                "keeps its trained experts"
                if model_type == HyperLlavaConfig.model_type
                else "from_llava upgrades LLaVA-1.5 checkpoints (model_type 'llava') only"
            )
            raise ValueError(f"from_llava needs a LLaVA model, but this one is a {model_type!r} model: {advice}")
        if isinstance(path_or_model, nn.Module):
            llava = path_or_model
        else:
            llava = LlavaForConditionalGeneration.from_pretrained(path_or_model, **(load_kwargs or {}))
        placement = {str(device) for device in (getattr(llava, "hf_device_map", None) or {}).values()}
        if len(placement) > 1 or "disk" in placement:
            # Its state dict would hold offloaded weights as meta tensors, and the new model would lack accelerate's
            # hooks that move activations between devices.
            raise ValueError(
                f"from_llava needs the LLaVA model whole on one device, but its device_map places it on "
                f"{sorted(placement)}: upgrade it on one device (e.g. the CPU), save_pretrained the result, and load "
                "that with HyperLlavaForConditionalGeneration.from_pretrained(..., device_map=...)"
            )
        if getattr(llava, "hf_quantizer", None) is not None:
            # Quantized layers hold integer weights and their own state (scales, formats) that HyperLLaVA's plain
            # linear layers cannot take; the quantizer replaces them when a saved HyperLLaVA loads.
            raise ValueError(
                "from_llava needs an unquantized LLaVA model, but this one is quantized: upgrade the unquantized "
                "checkpoint, save_pretrained the result, and load that with HyperLlavaForConditionalGeneration.from_pretrained(..., "
                "quantization_config=...) (docs/inference.md, Quantization)"
            )
        config = HyperLlavaConfig.from_llava_config(llava.config, **config_overrides)
        # Built on the meta device and given LLaVA's own tensors: a 7B model upgrades in seconds, with no second copy.
        with torch.device("meta"):
            model = cls(config)
        missing, unexpected = model.load_state_dict(llava.state_dict(), strict=False, assign=True)
        not_experts = [key for key in missing if "expert" not in key]
        if not_experts or unexpected:
            raise ValueError(
                f"the LLaVA weights do not match HyperLLaVA's: missing {not_experts}, unexpected {list(unexpected)}"
            )
        # What a state dict does not carry: LLaVA's non-persistent buffers (rotary frequencies, ...) and the experts.
        for name, buffer in model.named_buffers():
            if buffer.is_meta:
                module_name, _, leaf = name.rpartition(".")
                setattr(model.get_submodule(module_name), leaf, llava.get_buffer(name))
        device = next(llava.parameters()).device
        for module in model.modules():
            if isinstance(module, HyperExpert):
                module.to_empty(device=device)
                module.init_weights(config.text_config.initializer_range)
                module.to(llava.dtype)
        # Assigning LLaVA's state dict gave a tied lm_head a parameter of its own (sharing the tensor): tie it again.
        model.tie_weights()
        # A state dict carries no requires_grad: a part frozen in the LLaVA model passed in stays frozen.
        for name, param in llava.named_parameters():
            model.get_parameter(name).requires_grad_(param.requires_grad)
        if llava.generation_config is not None:
            model.generation_config = copy.deepcopy(llava.generation_config)
        return model.train(llava.training)

    def parameter_counts(self) -> dict[str, int]:
        """Parameter counts the paper never gave: total (every parameter held, under PEFT its adapters and copies too),
        trainable, and the experts' share (each expert counted once, as it runs)."""
        projector = self.model.multi_modal_projector
        visual = [e for e in (projector.visual_expert_first, projector.visual_expert_second) if e is not None]
        language = [self.model.language_model.language_expert] if self.model.language_model.language_expert else []

        def count(modules):
            # An expert in PEFT's `modules_to_save` is a wrapper that holds its frozen original beside the trained copy
            # that runs: only the copy counts.
            return sum(
                p.numel()
                for m in modules
                for name, p in m.named_parameters()
                if not name.startswith("original_module.")
            )

        counts = {
            "total": self.num_parameters(),
            "trainable": self.num_parameters(only_trainable=True),
            "visual_expert": count(visual),
            "language_expert": count(language),
        }
        counts["expert"] = counts["visual_expert"] + counts["language_expert"]
        return counts

    @can_return_tuple
    def forward(
        self,
        input_ids=None,
        pixel_values=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        vision_feature_layer=None,
        vision_feature_select_strategy=None,
        labels=None,
        logits_to_keep=0,
        language_guidance_mask=None,
        language_expert_weights=None,
        cache=None,
        mm_encoder_outputs=None,
        **kwargs,
    ) -> HyperLlavaCausalLMOutputWithPast:
        r"""
        past_key_values, cache (`Cache`, *optional*):
            The KV cache, under either name: Transformers 5.24 calls it `cache`, earlier 5.x `past_key_values`.
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            As in LLaVA; they also mark the prompt: the language guidance is pooled over the non-padding tokens
            before the first supervised one, unless `language_guidance_mask` is given.
        language_guidance_mask (`torch.BoolTensor` of shape `(batch_size, sequence_length)`, *optional*):
            The prompt positions the language guidance is pooled over.
        language_expert_weights (`torch.FloatTensor`, *optional*):
            Weights generated by an earlier call; generation passes the prefill's to every decode step.
        mm_encoder_outputs (`dict`, *optional*):
            The images already encoded, `{"image": model.get_image_features(pixel_values, return_dict=True)}`, in
            place of `pixel_values` (Transformers' `generate` passes them so since 5.18; 5.17's cannot).
        """
        # LlavaForConditionalGeneration.forward, plus: the prompt named by the labels, the generated weights returned.
        if language_guidance_mask is None and labels is not None and self.model.language_model.pools_guidance:
            language_guidance_mask = prompt_mask(labels, attention_mask)
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            language_guidance_mask=language_guidance_mask,
            language_expert_weights=language_expert_weights,
            cache=cache if cache is not None else past_key_values,
            mm_encoder_outputs=mm_encoder_outputs,
            **kwargs,
        )
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))

        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )
        return HyperLlavaCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            language_expert_weights=outputs.language_expert_weights,
            **{CACHE_ARG: getattr(outputs, CACHE_ARG), IMAGE_OUTPUT: getattr(outputs, IMAGE_OUTPUT)},
        )

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        # `generate` calls this once, before the first forward: name the prompt here, as the positions the language
        # guidance pools over. Later the prefill's input may be longer (assisted decoding appends candidate tokens to
        # it), and its attention mask may be gone (dropped when all ones) or 4-D (a static cache).
        if (
            self.model.language_model.pools_guidance
            and model_kwargs.get("language_expert_weights") is None
            and model_kwargs.get("language_guidance_mask") is None
        ):
            attention_mask, inputs = model_kwargs.get("attention_mask"), model_kwargs.get("inputs_embeds")
            if attention_mask is None:
                inputs = input_ids if inputs is None else inputs
                model_kwargs["language_guidance_mask"] = torch.ones(
                    inputs.shape[:2], dtype=torch.bool, device=inputs.device
                )
            elif attention_mask.dim() == 2:  # (a 4-D one does not say which tokens are the prompt: the forward asks)
                model_kwargs["language_guidance_mask"] = attention_mask
        return super()._expand_inputs_for_generation(expand_size, is_encoder_decoder, input_ids, **model_kwargs)

    def _prefill(self, input_ids, generation_config, model_kwargs, *args, **kwargs):
        chunk = generation_config.prefill_chunk_size
        if (
            chunk is not None
            and input_ids.shape[1] > chunk
            and self.model.language_model.pools_guidance
            and model_kwargs.get("language_expert_weights") is None
        ):
            raise NotImplementedError(
                f"prefill_chunk_size={chunk} splits the {input_ids.shape[1]}-token prompt, but the language expert "
                "pools its guidance over the whole prompt before any expert layer runs: generate without "
                "prefill_chunk_size (or with one at least as long as the prompt)"
            )
        cache = model_kwargs.get(CACHE_ARG)
        if cache is not None and _known_length(cache) == 0:
            # A new sequence on a cache that held one: with prefill_chunk_size the prefill runs compiled, and a
            # compiled graph cannot tell an emptied cache from a filled one (`_weights_of`), so the weights of the
            # sequence before go now.
            for name in (CACHED_WEIGHTS, LAYER_WEIGHTS):
                if hasattr(cache, name):
                    delattr(cache, name)
        return super()._prefill(input_ids, generation_config, model_kwargs, *args, **kwargs)

    def _get_candidate_generator(self, *args, model_kwargs, **kwargs):
        # An assistant model gets a copy of the model kwargs, and it has no use for (nor accepts) this model's guidance
        # or the weights passed in for this model: a HyperLLaVA assistant generates its own.
        model_kwargs = {
            key: value
            for key, value in model_kwargs.items()
            if key not in ("language_guidance_mask", "language_expert_weights")
        }
        return super()._get_candidate_generator(*args, model_kwargs=model_kwargs, **kwargs)

    # `inputs_embeds` by name: `generate` accepts them only from models whose signature here shows it.
    def prepare_inputs_for_generation(
        self, *args, inputs_embeds=None, language_expert_weights=None, language_guidance_mask=None, **kwargs
    ):
        model_inputs = super().prepare_inputs_for_generation(
            *args, inputs_embeds=inputs_embeds, language_expert_weights=language_expert_weights, **kwargs
        )
        # Only the prefill pools the guidance (later steps reuse its weights; without a language expert in "dynamic"
        # mode there is nothing to pool): passed on to them, the mask would be an input LLaVA does not have.
        if language_expert_weights is None and self.model.language_model.pools_guidance:
            inputs = model_inputs.get("input_ids")
            length = (inputs if inputs is not None else model_inputs["inputs_embeds"]).shape[1]
            if language_guidance_mask is not None and language_guidance_mask.shape[1] < length:
                # Assisted decoding's candidate tokens, after the prompt: not part of the guidance.
                language_guidance_mask = F.pad(language_guidance_mask, (0, length - language_guidance_mask.shape[1]))
            model_inputs["language_guidance_mask"] = language_guidance_mask
        return model_inputs

    def init_continuous_batching(self, *args, **kwargs):
        # The entry point of `generate_batch` and `continuous_batching_context_manager` too. Refused up front: inside,
        # the failure would only be logged by the batching thread and the requests would come back empty.
        if self.model.language_model.pools_guidance:
            raise NotImplementedError(
                "continuous batching (generate_batch, init_continuous_batching) does not support the language expert: "
                "it packs several requests into one sequence over a paged cache, while the language expert generates "
                "one set of adapter weights per sequence from that sequence's prompt. Use generate() with a padded "
                "batch, or a model with language_expert_layers=None."
            )
        return super().init_continuous_batching(*args, **kwargs)

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, *args, **kwargs):
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)
        # The experts see only the prompt (docs/model.md): the prefill's weights serve every later step, from a fixed
        # address with a static cache (the one `generate` compiles the decoding step for).
        weights = outputs.language_expert_weights
        if weights is not None:
            cache = getattr(outputs, CACHE_ARG, None)
            if getattr(cache, "is_compileable", False):  # (generate runs without autograd)
                weights = _static_copy(cache, weights)
            model_kwargs["language_expert_weights"] = weights
        return model_kwargs


# `generate` reads the forward's signature at every decoding step for classes registered for remote code (as ours are,
# so that saved folders ship their code); computed once here, that costs ~2 us per step instead of ~25.
_forward = HyperLlavaForConditionalGeneration.forward
_forward.__signature__ = inspect.signature(_forward)

__all__ = [
    "HyperLlavaPreTrainedModel",
    "HyperLlavaModel",
    "HyperLlavaForConditionalGeneration",
    "HyperLlamaModel",
    "HyperExpert",
]
