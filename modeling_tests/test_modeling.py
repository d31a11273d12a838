"""The model against independent references: stock LLaVA, and a plain-PyTorch evaluation of the paper's equations."""

import collections
import copy
import functools
import re

import pytest
import torch
import torch.nn.functional as F
from transformers import GenerationConfig, LlavaForConditionalGeneration
from transformers.models.llava import modeling_llava

from conftest import (
    IMAGE_TOKEN,
    DispatchedOps,
    images,
    left_pad,
    make_model,
    prompt_ids,
    randomize_experts,
    recorded_compilation,
    training_batch,
)  # fmt: skip
from transformers_hyperllava import HyperLlavaConfig, HyperLlavaForConditionalGeneration, modeling_hyperllava
from transformers_hyperllava.modeling_hyperllava import (
    CACHE_ARG,
    CACHED_WEIGHTS,
    IMAGE_OUTPUT,
    HyperExpert,
    expert_adapter,
    split_weights,
    swiglu_bottleneck,
)
from transformers_hyperllava.tiny import tiny_config

# --- 1. zero-init equivalence --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ids, num_images",
    [
        (prompt_ids("img", 10, 11, 12), 1),  # one image
        (prompt_ids(10, 11, 12, 13, 14), 0),  # text only
        (prompt_ids("img", 10, "img", 11, 12), 2),  # several images in one prompt
    ],
    ids=["image", "text-only", "two-images"],
)
def test_from_llava_matches_llava_at_step_zero(tiny_llava, ids, num_images):
    llava, _ = tiny_llava
    llava = llava.float()
    model = HyperLlavaForConditionalGeneration.from_llava(llava, visual_expert="both", language_expert_layers="all")
    kwargs = {"input_ids": torch.tensor([ids])}
    if num_images:
        kwargs["pixel_values"] = images(num_images)
    torch.testing.assert_close(model(**kwargs).logits, llava(**kwargs).logits, atol=1e-5, rtol=0)


def test_from_llava_loads_a_saved_llava_folder(tiny_llava, tmp_path):
    llava, _ = tiny_llava
    llava.save_pretrained(tmp_path)
    model = HyperLlavaForConditionalGeneration.from_llava(tmp_path, expert_mode="latent")
    assert model.config.expert_mode == "latent"
    kwargs = {"input_ids": torch.tensor([prompt_ids("img", 9)]), "pixel_values": images(1).double()}
    torch.testing.assert_close(model(**kwargs).logits, llava(**kwargs).logits, atol=1e-8, rtol=0)
    # `from_pretrained` on it would load none of LLaVA's weights (saved under LLaVA's own names): refused, with the way.
    with pytest.raises(ValueError, match=r"a 'llava' config is not a HyperLLaVA one: .*from_llava\(path\)"):
        HyperLlavaForConditionalGeneration.from_pretrained(tmp_path)
    # One device through a device_map is fine; a model spread over several, or offloaded to disk, is refused.
    on_cpu = HyperLlavaForConditionalGeneration.from_llava(tmp_path, load_kwargs={"device_map": "cpu"})
    torch.testing.assert_close(on_cpu(**kwargs).logits, llava(**kwargs).logits, atol=1e-8, rtol=0)
    offload = {"offload_folder": str(tmp_path / "offload")}
    split = {"model.vision_tower": "cpu", "model.multi_modal_projector": "cpu", "model.language_model": "disk"}
    for device_map, placement in (({**split, "lm_head": "cpu"}, r"\['cpu', 'disk'\]"), ({"": "disk"}, r"\['disk'\]")):
        with pytest.raises(ValueError, match=rf"from_llava needs the LLaVA model whole on one device, .* {placement}"):
            HyperLlavaForConditionalGeneration.from_llava(tmp_path, load_kwargs={"device_map": device_map, **offload})
    # Two devices without offload, as accelerate records them (a GPU's index, here only written down).
    llava.hf_device_map = {**split, "model.language_model": 0, "lm_head": 0}
    try:
        with pytest.raises(ValueError, match=r"whole on one device, .* \['0', 'cpu'\]"):
            HyperLlavaForConditionalGeneration.from_llava(llava)
    finally:
        del llava.hf_device_map


def test_from_llava_keeps_each_parts_attention_implementation(tiny_llava, tmp_path):
    llava, _ = tiny_llava
    llava.save_pretrained(tmp_path)
    per_part = {"": "sdpa", "text_config": "eager", "vision_config": "sdpa"}
    llava = LlavaForConditionalGeneration.from_pretrained(tmp_path, attn_implementation=per_part).eval()
    model = HyperLlavaForConditionalGeneration.from_llava(llava)
    kwargs = {"input_ids": torch.tensor([prompt_ids("img", 10)]), "pixel_values": images(1).double()}
    # The text model's eager attention reports its weights (SDPA reports none).
    got, want = model(**kwargs, output_attentions=True).attentions, llava(**kwargs, output_attentions=True).attentions
    assert len(got) == len(want) == llava.config.text_config.num_hidden_layers
    for got_layer, want_layer in zip(got, want):
        torch.testing.assert_close(got_layer, want_layer, atol=1e-10, rtol=0)


def test_from_llava_keeps_what_the_llava_model_froze_frozen(tiny_llava):
    """The two models share tensors, but a state dict carries no requires_grad: it is copied, the experts train."""
    llava, _ = tiny_llava
    llava.model.vision_tower.requires_grad_(False)
    model = HyperLlavaForConditionalGeneration.from_llava(llava)
    for name, param in model.named_parameters():
        assert param.requires_grad == ("expert" in name or llava.get_parameter(name).requires_grad), name
    assert not any(p.requires_grad for p in model.model.vision_tower.parameters())


def test_from_llava_keeps_tied_embeddings_tied_and_copies_the_generation_config():
    """Tied, the output embedding is the input embedding's parameter: one parameter, one optimizer state, as in LLaVA."""
    config = tiny_config().to_llava_config()
    config.tie_word_embeddings = config.text_config.tie_word_embeddings = True
    torch.manual_seed(0)
    llava = LlavaForConditionalGeneration(config)
    assert llava.lm_head.weight is llava.get_input_embeddings().weight
    model = HyperLlavaForConditionalGeneration.from_llava(llava)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    assert model.parameter_counts()["total"] - model.parameter_counts()["expert"] == llava.num_parameters()
    assert model.generation_config is not llava.generation_config
    assert model.generation_config.to_dict() == llava.generation_config.to_dict()


def test_fresh_model_starts_as_identity_but_has_gradients_for_w_up():
    model = make_model(experts=False)  # the model's own initialisation
    expert = model.model.language_model.language_expert
    w_down, w_up = split_weights(expert(torch.randn(2, 32)), expert.in_dim, expert.rank, expert.out_dim)
    assert torch.count_nonzero(w_up) == 0 and torch.count_nonzero(w_down) > 0
    # docs/model.md's scales: W_d's layer bias like LoRA's A (std 1/sqrt(d_in), so x W_d keeps the size of x), the
    # hypernetwork's biases zero.
    for module in (expert, model.model.multi_modal_projector.visual_expert_first):
        for bias in (module.encoder_bias, module.hyper_in.bias, module.hyper_out.bias):
            assert torch.count_nonzero(bias) == 0
        down_std = module.layer_bias[:, : module.num_down].std().item()
        assert abs(down_std * module.in_dim**0.5 - 1) < 0.15, down_std
    model.train()
    ids = torch.tensor([prompt_ids("img", 10, 11, 12)])
    labels = torch.where(torch.arange(ids.shape[1]) >= ids.shape[1] - 2, ids, -100)
    model(input_ids=ids, pixel_values=images(1), labels=labels).loss.backward()
    assert expert.hyper_out.weight.grad[expert.num_down :].abs().sum() > 0
    assert expert.layer_bias.grad[:, expert.num_down :].abs().sum() > 0


# --- 2. reference math ----------------------------------------------------------------------------------------------


def reference_weights(params, guidance, layer, mode):
    """Eqs. 2-3 for one layer and one sample, written out: K(n) = W2 (W1 e(n) + B1) + B2 + b(n)."""
    if mode == "static":
        return params["layer_bias"][layer]
    if mode == "dynamic":
        embedding = params["encoder_weight"][layer] @ guidance + params["encoder_bias"][layer]
    else:
        embedding = params["latent"][layer]
    hidden = params["hyper_in.weight"] @ embedding + params["hyper_in.bias"]
    return params["hyper_out.weight"] @ hidden + params["hyper_out.bias"] + params["layer_bias"][layer]


def reference_adapter(x, weights, d_in, d_out, r):
    """Eq. 4 for one sample: E(x) = SwiGLU(x W_d) W_u, W_d (d_in x 2r) then W_u (r x d_out) read from K."""
    w_down = weights[: 2 * r * d_in].reshape(d_in, 2 * r)
    w_up = weights[2 * r * d_in :].reshape(r, d_out)
    projected = x @ w_down
    return (F.silu(projected[:, :r]) * projected[:, r:]) @ w_up


def expert_params(model, prefix):
    return {name[len(prefix) + 1 :]: p for name, p in model.named_parameters() if name.startswith(prefix + ".")}


def reference_logits(llava, model, input_ids, pixel_values, guidance_mask, expert_layers, k):
    """Stock LLaVA's modules, with the experts added by hooks that evaluate the equations sample by sample: the
    language expert in `expert_layers`, its guidance entering layer `k`."""
    config = model.config
    mode, r = config.expert_mode, config.expert_bottleneck_dim
    hooks = []

    def visual_shift(name):
        params = expert_params(model, f"model.multi_modal_projector.visual_expert_{name}")

        def shift(expert_input, output):
            shifts = [
                reference_adapter(x, reference_weights(params, x.mean(0), 0, mode), x.shape[-1], output.shape[-1], r)
                for x in expert_input
            ]
            return output + torch.stack(shifts)

        return shift

    projector = llava.model.multi_modal_projector
    if config.visual_expert in ("first", "both"):
        shift_first = visual_shift("first")
        hooks.append(projector.linear_1.register_forward_hook(lambda m, args, out: shift_first(args[0], out)))
    if config.visual_expert in ("second", "both"):
        shift_second = visual_shift("second")
        # E_V2 reads the (possibly shifted) hidden a = GELU(...) that linear_2 reads.
        hooks.append(projector.linear_2.register_forward_hook(lambda m, args, out: shift_second(args[0], out)))

    if expert_layers:
        params = expert_params(model, "model.language_model.language_expert")
        generated = {}
        text = llava.model.language_model

        def make_weights(hidden):
            mask = guidance_mask.double()
            guidance = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
            for slot, layer in enumerate(expert_layers):
                generated[layer] = [reference_weights(params, g, slot, mode) for g in guidance]

        # What enters layer k: the hidden state after layer k-1, or the embeddings (images scattered in) for k = 0.
        hooks.append(text.layers[k].register_forward_pre_hook(lambda m, args: make_weights(args[0])))
        for layer in expert_layers:
            d = config.text_config.hidden_size

            def branch(module, args, out, layer=layer):
                normed = args[0]  # the FFN's input norm2(h): the expert reads the same
                return out + torch.stack([reference_adapter(x, w, d, d, r) for x, w in zip(normed, generated[layer])])

            hooks.append(text.layers[layer].mlp.register_forward_hook(branch))
    try:
        return llava(input_ids=input_ids, pixel_values=pixel_values).logits
    finally:
        for hook in hooks:
            hook.remove()


# The tiny model has 4 decoder layers: "posterior" is layers 2-3 with the guidance entering layer 2 (L // 2); "all"
# and "anterior" start at layer 0, and so does their guidance (the input embeddings).
@pytest.mark.parametrize(
    "overrides, expert_layers, k",
    [
        ({"visual_expert": "first", "expert_mode": "dynamic"}, [2, 3], 2),
        (
            {
                "visual_expert": "second",
                "expert_mode": "dynamic",
                "language_expert_layers": [2, 3],
                "language_guidance_layer": 1,
            },
            [2, 3],
            1,
        ),
        ({"visual_expert": "both", "expert_mode": "dynamic", "language_expert_layers": "all"}, [0, 1, 2, 3], 0),
        ({"visual_expert": "both", "expert_mode": "latent"}, [2, 3], 2),
        ({"visual_expert": "first", "expert_mode": "static", "language_expert_layers": "anterior"}, [0, 1], 0),
        (
            {
                "visual_expert": None,
                "expert_mode": "dynamic",
                "language_expert_layers": [3],
                "language_guidance_layer": 3,
            },
            [3],
            3,
        ),
    ],
    ids=["first-dynamic", "second-k1", "both-all-k0", "both-latent", "static-anterior", "language-only"],
)
@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "no-grad"])  # the adapter's two forms (decoding's)
def test_model_matches_reference_equations(overrides, expert_layers, k, grad):
    model = make_model(torch.float64, **overrides)
    llava = LlavaForConditionalGeneration(model.config.to_llava_config()).double().eval()
    llava.load_state_dict(model.state_dict(), strict=False)
    input_ids = torch.tensor([prompt_ids("img", 10, 11, 12, 13), prompt_ids(14, "img", 15, 16, 17)])
    pixel_values = images(2).double()
    # The second sample's last two tokens are not prompt: they must not reach the guidance.
    guidance_mask = torch.ones_like(input_ids, dtype=torch.bool)
    guidance_mask[1, -2:] = False
    expected = reference_logits(llava, model, input_ids, pixel_values, guidance_mask, expert_layers, k)
    with torch.set_grad_enabled(grad):
        actual = model(input_ids=input_ids, pixel_values=pixel_values, language_guidance_mask=guidance_mask).logits
    torch.testing.assert_close(actual, expected, atol=1e-10, rtol=1e-10)
    # The experts matter here: without them the logits differ, so the comparison above is a real one.
    assert (llava(input_ids=input_ids, pixel_values=pixel_values).logits - expected).abs().max() > 1e-3


def test_parameter_counts_follow_the_formula():
    model = make_model(experts=False, visual_expert="both")
    c = model.config
    m, h, r = c.expert_embedding_dim, c.hypernetwork_hidden_dim, c.expert_bottleneck_dim

    def expert_size(d_g, d_in, d_out, layers):
        p = 2 * r * d_in + r * d_out
        return layers * (m * d_g + m) + (m * h + h) + (h * p + p) + layers * p

    d, dv = c.text_config.hidden_size, c.vision_config.hidden_size
    counts = model.parameter_counts()
    assert counts["visual_expert"] == expert_size(dv, dv, d, 1) + expert_size(d, d, d, 1)
    assert counts["language_expert"] == expert_size(d, d, d, 2)  # "posterior": layers 2 and 3 of 4
    llava = LlavaForConditionalGeneration(c.to_llava_config())
    assert counts["total"] == sum(p.numel() for p in llava.parameters()) + counts["expert"]
    model.requires_grad_(False)
    assert model.parameter_counts()["trainable"] == 0


# --- 3. no leakage --------------------------------------------------------------------------------------------------


def test_answer_tokens_do_not_reach_the_expert_weights():
    model = make_model()
    ids = torch.tensor([prompt_ids("img", 10, 11, 12, 20, 21, 22, 2)])
    labels = torch.full_like(ids, -100)
    first = ids.shape[1] - 4
    labels[0, first:] = ids[0, first:]
    changed = ids.clone()
    changed[0, first:] = torch.tensor([30, 31, 32, 33])

    def run(input_ids):
        out = model(input_ids=input_ids, pixel_values=images(1), labels=labels)
        return out.language_expert_weights, out.logits

    weights, logits = run(ids)
    weights_changed, logits_changed = run(changed)
    torch.testing.assert_close(weights_changed, weights, atol=0, rtol=0)
    torch.testing.assert_close(logits_changed[:, :first], logits[:, :first], atol=1e-6, rtol=0)
    # A change inside the prompt does reach them: the assertions above could fail.
    prompt_changed = ids.clone()
    prompt_changed[0, first - 1] = 40
    assert not torch.equal(run(prompt_changed)[0], weights)


def test_the_prompt_is_what_comes_before_the_first_supervised_token_and_not_padding():
    from transformers_hyperllava.modeling_hyperllava import prompt_mask

    labels = torch.tensor(
        [[-100, -100, -100, 7, -100, 8], [-100, -100, -100, -100, -100, 9], [5, 6, -100, -100, 1, 1]]
    )
    attention_mask = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    want = torch.tensor([[0, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(prompt_mask(labels, attention_mask), want)


def test_training_guidance_of_a_left_padded_batch_is_each_samples_own():
    """With labels, each row's weights are those of the sample alone, unpadded: padding stays out of the prompt."""
    model = make_model()
    batch = training_batch()
    together = model(**batch).language_expert_weights
    pixel_values = iter(batch["pixel_values"].split(1))
    for row, (ids, mask, labels) in enumerate(zip(batch["input_ids"], batch["attention_mask"], batch["labels"])):
        keep = mask.bool()
        alone = model(
            input_ids=ids[keep][None],
            labels=labels[keep][None],
            pixel_values=next(pixel_values) if (ids == IMAGE_TOKEN).any() else None,
        ).language_expert_weights
        torch.testing.assert_close(together[row], alone[0], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("expert_mode", ["dynamic", "static"])
def test_packed_sequences_are_refused_where_the_weights_depend_on_the_prompt(expert_mode):
    """`DataCollatorWithFlattening` packs samples into one row, which one generated weight set cannot serve; where
    the weights do not depend on the input, each packed sample gets what it gets alone, as in LLaVA."""
    from transformers import DataCollatorWithFlattening

    model = make_model(dtype=torch.float64, expert_mode=expert_mode)
    samples = [prompt_ids("img", 10, 11, 20, 2), prompt_ids(12, "img", 13, 21, 22, 2)]
    features = [{"input_ids": ids, "labels": [-100] * (len(ids) - 2) + ids[-2:]} for ids in samples]
    pixel_values = images(2).double()
    by_positions = DataCollatorWithFlattening(return_position_ids=True)(features)
    by_boundaries = DataCollatorWithFlattening(return_position_ids=False, return_flash_attn_kwargs=True)(features)
    if expert_mode == "static":
        alone = [
            model(input_ids=torch.tensor([ids]), pixel_values=pixel_values[i : i + 1]) for i, ids in enumerate(samples)
        ]
        packed = model(**by_positions, pixel_values=pixel_values, use_cache=False)
        torch.testing.assert_close(packed.logits[0], torch.cat([out.logits[0] for out in alone]), atol=1e-10, rtol=0)
        return
    for batch in (by_positions, by_boundaries):
        with pytest.raises(ValueError, match="packs several sequences into one row"):
            model(**batch, pixel_values=pixel_values, use_cache=False)
    # Position ids that count on without restarting are one sequence, as without them.
    ids = torch.tensor(samples[:1])
    with_positions = model(input_ids=ids, position_ids=torch.arange(ids.shape[1])[None], use_cache=False)
    torch.testing.assert_close(with_positions.logits, model(input_ids=ids).logits, atol=0, rtol=0)


def test_an_empty_prompt_gives_a_zero_guidance_not_nan():
    """Labels that supervise every token leave the guidance no prompt: it is zero (documented), not 0/0."""
    model = make_model()
    ids = torch.tensor([prompt_ids(10, 11, 12)])
    out = model(input_ids=ids, labels=ids)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
    expert = model.model.language_model.language_expert
    zero_guidance = torch.zeros(1, model.config.text_config.hidden_size)
    torch.testing.assert_close(out.language_expert_weights, expert(zero_guidance), atol=0, rtol=0)


def test_the_guidance_of_a_long_float16_prompt_with_massive_activations_is_finite_and_right():
    """Llama's hidden states carry "massive activations" (~2500 in a channel at a few tokens): at 30 of them a float16
    sum over the prompt passes float16's 65504, while the mean the guidance is stays far below."""
    model = make_model(dtype=torch.float16)
    embeds = torch.randn(1, 500, model.config.text_config.hidden_size, generator=torch.Generator().manual_seed(0))
    embeds[0, :30, 0] = 2500
    with torch.no_grad():
        out = model(inputs_embeds=embeds.half(), attention_mask=torch.ones(1, 500), output_hidden_states=True)
        guidance = out.hidden_states[model.config.language_guidance_layer].double().mean(dim=1)  # layer k's input
        expected = copy.deepcopy(model.model.language_model.language_expert).double()(guidance)
    torch.testing.assert_close(out.language_expert_weights.double(), expected, rtol=1e-2, atol=1e-2)


# --- 4. batch invariance --------------------------------------------------------------------------------------------


def test_batch_invariance_left_padded():
    model = make_model()
    prompts = [prompt_ids("img", 10, 11), prompt_ids(12, "img", 13, 14, 15, 16, 17), prompt_ids(18, 19, 20)]
    pixel_values = images(2)
    per_sample_images = [pixel_values[:1], pixel_values[1:], None]
    ids, mask = left_pad(prompts)
    batch = model(input_ids=ids, attention_mask=mask, pixel_values=pixel_values)
    # Every step's logits, not only the tokens: guidance that took in the padding would change the logits long before
    # it changed a token of this tiny model.
    generate_kwargs = {"max_new_tokens": 6, "do_sample": False, "output_logits": True, "return_dict_in_generate": True}
    batch_gen = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, **generate_kwargs)
    for i, (prompt, image) in enumerate(zip(prompts, per_sample_images)):
        alone = model(input_ids=torch.tensor([prompt]), pixel_values=image)
        n = len(prompt)
        torch.testing.assert_close(batch.logits[i, -n:], alone.logits[0], atol=1e-5, rtol=1e-5)
        # (No pixel_values=None: since 5.18 Transformers' generate would encode None, for LLaVA too.)
        image_kwargs = {} if image is None else {"pixel_values": image}
        alone_gen = model.generate(input_ids=torch.tensor([prompt]), **image_kwargs, **generate_kwargs)
        assert batch_gen.sequences[i, -6:].tolist() == alone_gen.sequences[0, -6:].tolist()
        for batch_step, alone_step in zip(batch_gen.logits, alone_gen.logits, strict=True):
            torch.testing.assert_close(batch_step[i], alone_step[0], atol=1e-5, rtol=1e-5)


# --- 5. generation --------------------------------------------------------------------------------------------------


class CountCalls:
    def __init__(self, module):
        self.calls, self.module, self.original = 0, module, module.forward

    def __enter__(self):
        def counted(*args, **kwargs):
            self.calls += 1
            return self.original(*args, **kwargs)

        self.module.forward = counted
        return self

    def __exit__(self, *exc):
        del self.module.forward


def full_recompute_logits(model, sequences, prompt_length, pixel_values, attention_mask=None):
    """Logits of a whole sequence in one forward, the guidance pooled over the prompt only."""
    guidance_mask = torch.zeros_like(sequences, dtype=torch.bool)
    guidance_mask[:, :prompt_length] = True
    if attention_mask is not None:
        guidance_mask[:, :prompt_length] &= attention_mask.bool()
        attention_mask = torch.cat([attention_mask, torch.ones_like(sequences[:, prompt_length:])], dim=1)
    return model(
        input_ids=sequences,
        pixel_values=pixel_values,
        attention_mask=attention_mask,
        language_guidance_mask=guidance_mask,
    ).logits


def test_generation_reuses_prefill_weights_and_matches_full_recompute():
    model = make_model()
    ids, mask = left_pad([prompt_ids("img", 10, 11, 12), prompt_ids("img", 13)])
    pixel_values = images(2)
    kwargs = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixel_values, "max_new_tokens": 8}
    with CountCalls(model.model.language_model.language_expert) as counter:
        out = model.generate(**kwargs, do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert counter.calls == 1  # the prefill only, not once per decoded token
    n = ids.shape[1]
    logits = full_recompute_logits(model, out.sequences, n, pixel_values, mask)
    step_logits = torch.stack(out.logits, dim=1)
    torch.testing.assert_close(step_logits, logits[:, n - 1 : -1], atol=1e-5, rtol=1e-5)
    no_cache = model.generate(**kwargs, do_sample=False, use_cache=False)
    assert torch.equal(no_cache, out.sequences)


def test_static_cache_generation_equals_dynamic_cache_generation():
    model = make_model()
    ids, mask = left_pad([prompt_ids("img", 10, 11, 12), prompt_ids("img", 13)])
    kwargs = {"input_ids": ids, "attention_mask": mask, "pixel_values": images(2), "max_new_tokens": 6}
    dynamic = model.generate(**kwargs, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with CountCalls(model.model.language_model.language_expert) as counter:
        static = model.generate(
            **kwargs, do_sample=False, output_logits=True, return_dict_in_generate=True, cache_implementation="static"
        )
    assert counter.calls == 1
    assert torch.equal(static.sequences, dynamic.sequences)
    torch.testing.assert_close(torch.stack(static.logits), torch.stack(dynamic.logits), atol=1e-5, rtol=1e-5)


def test_generate_gives_the_decoding_steps_the_weights_at_a_fixed_address_with_a_static_cache():
    """Compiled decoding's CUDA graphs copy every input not marked as a static address in before each replay, as
    they would the cache's keys and values if Transformers did not mark them. With a static cache, `generate` gives
    the decoding steps a marked copy of the weights that the cache keeps: the same for every step, refilled in place
    when the cache starts a new sequence. No one else gets that copy: the prefill's weights, which the cache carries
    for whoever continues it, stay the caller's."""
    from transformers import StaticCache

    model = make_model()
    steps = []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: steps.append(kwargs.get("language_expert_weights")), with_kwargs=True
    )
    cache = StaticCache(model.config.text_config, 16)

    def generate(ids, pixels):
        steps.clear()
        tokens = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=3, **{CACHE_ARG: cache})
        prefill, *decoding = steps
        assert prefill is None and len(decoding) == 2 and decoding[0] is decoding[1]
        return tokens, decoding[0], getattr(cache, CACHED_WEIGHTS)

    first_ids, second_ids = torch.tensor([prompt_ids("img", 10, 11)]), torch.tensor([prompt_ids("img", 13)])
    first_tokens, buffer, first_weights = generate(first_ids, images(1))
    marked = torch.zeros(1)
    torch._dynamo.mark_static_address(marked)  # as Transformers marks the static cache's keys and values
    assert buffer._dynamo_static_input_type == marked._dynamo_static_input_type  # (torch 2.7-2.8 guard them, 2.13 not)
    assert buffer is not first_weights and torch.equal(buffer, first_weights)
    kept = first_weights.clone()
    assert torch.equal(first_tokens, model.generate(input_ids=first_ids, pixel_values=images(1), max_new_tokens=3))

    cache.reset()
    second_tokens, refilled, second_weights = generate(second_ids, images(1, seed=1))
    assert refilled is buffer and torch.equal(buffer, second_weights)
    assert not torch.equal(kept, second_weights)  # (other images, other weights)
    assert torch.equal(first_weights, kept)  # the first call's weights are untouched
    expected = model.generate(input_ids=second_ids, pixel_values=images(1, seed=1), max_new_tokens=3)
    assert torch.equal(second_tokens, expected)
    # A call of one's own that continues the cache gets the weights the cache carries, not the decoding steps' copy.
    with torch.no_grad():
        out = model(input_ids=second_tokens[:, -1:], use_cache=True, **{CACHE_ARG: cache})
    assert out.language_expert_weights is second_weights


def test_each_layers_view_of_the_weights_is_made_once_per_sequence_and_never_under_autograd(monkeypatch):
    """The views each expert layer reads its weights through cost eager decoding about 1% of its step when made at
    every step: the decoding steps that continue a cache with its weights reuse the prefill's. Under autograd every
    forward makes its own, so that the continuation of a cache carries the gradient to the experts."""
    model = make_model()
    expert = model.model.language_model.language_expert
    made = []

    def split(weights, *sizes):
        if weights.dim() == 3:  # the language expert's (batch, layers, P); the visual expert's are (batch, P)
            made.append(weights)
        return split_weights(weights, *sizes)

    monkeypatch.setattr(modeling_hyperllava, "split_weights", split)
    ids = torch.tensor([prompt_ids("img", 10, 11)])
    tokens = model.generate(input_ids=ids, pixel_values=images(1), max_new_tokens=4, do_sample=False)
    assert len(made) == 1  # the prefill's, reused by the three decoding steps
    prompt = torch.arange(tokens.shape[1]) < ids.shape[1]  # (the guidance generate pooled over)
    with torch.no_grad():
        logits = model(input_ids=tokens, pixel_values=images(1), language_guidance_mask=prompt[None]).logits
    assert tokens[0, ids.shape[1] :].tolist() == logits[0, ids.shape[1] - 1 : -1].argmax(-1).tolist()

    made.clear()
    prefill = model(input_ids=ids, pixel_values=images(1), use_cache=True)
    continued = model(input_ids=tokens[:, ids.shape[1] : ids.shape[1] + 1], **{CACHE_ARG: getattr(prefill, CACHE_ARG)})
    assert len(made) == 2 and made[0] is made[1]
    continued.logits.sum().backward()
    assert expert.hyper_out.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("given", [False, True], ids=["generated", "passed-in"])
def test_a_new_sequence_on_an_emptied_cache_continues_with_its_own_weights(given):
    """The weights (and the views kept with them) a cache carries are those of its latest sequence: a cache emptied by
    `reset()` and filled with another prompt continues with that prompt's weights, generated or passed in. (A static
    cache: Transformers 5.17's `DynamicCache` keeps its length through `reset()`.)"""
    from transformers import StaticCache

    model = make_model()
    first, second, next_token = prompt_ids("img", 10, 11), prompt_ids("img", 13, 12, 9), [7]
    cache = StaticCache(model.config.text_config, 16)
    with torch.no_grad():
        weights = model(input_ids=torch.tensor([second]), pixel_values=images(1, seed=1)).language_expert_weights
        model(input_ids=torch.tensor([first]), pixel_values=images(1), use_cache=True, **{CACHE_ARG: cache})
        cache.reset()
        model(
            input_ids=torch.tensor([second]),
            pixel_values=images(1, seed=1),
            use_cache=True,
            language_expert_weights=weights if given else None,
            **{CACHE_ARG: cache},
        )
        continued = model(input_ids=torch.tensor([next_token]), use_cache=True, **{CACHE_ARG: cache}).logits[:, -1]
        whole = torch.tensor([second + next_token])
        prompt = (torch.arange(whole.shape[1]) < len(second))[None]
        expected = model(input_ids=whole, pixel_values=images(1, seed=1), language_guidance_mask=prompt).logits[:, -1]
    torch.testing.assert_close(continued, expected)


def test_a_compiled_prefill_on_an_emptied_cache_generates_its_own_weights():
    """With prefill_chunk_size (one chunk) `generate` runs the prefill through the compiled forward, which cannot tell
    an emptied static cache from a filled one: the previous sequence's weights must be gone before it."""
    from transformers import StaticCache

    model = make_model()
    # Text prompts: Transformers 5.17's compiled chunked prefill mishandles images, for stock LLaVA too.
    prompts = [torch.tensor([prompt_ids(10, 11, 12, 5)]), torch.tensor([prompt_ids(20, 13, 9)])]
    settings = {"max_new_tokens": 3, "do_sample": False, "output_logits": True, "return_dict_in_generate": True}
    expected = [model.generate(input_ids=ids, **settings) for ids in prompts]
    cache = StaticCache(model.config.text_config, 32)
    with recorded_compilation(model) as graphs:
        for ids, reference in zip(prompts, expected):
            cache.reset()
            out = model.generate(input_ids=ids, prefill_chunk_size=64, **settings, **{CACHE_ARG: cache})
            assert torch.equal(out.sequences, reference.sequences)
            torch.testing.assert_close(torch.stack(out.logits), torch.stack(reference.logits), atol=1e-5, rtol=1e-5)
    assert graphs  # (the prefill and the decoding steps ran compiled)


def test_sampling_and_several_return_sequences_reuse_the_prompt_weights():
    model = make_model()
    ids = torch.tensor([prompt_ids("img", 10, 11)])
    greedy = model.generate(input_ids=ids, pixel_values=images(1), max_new_tokens=6, do_sample=False)
    # Sampling from the top-1 token is greedy: each of the expanded sequences must find the right weights.
    sampled = model.generate(
        input_ids=ids, pixel_values=images(1), max_new_tokens=6, do_sample=True, top_k=1, num_return_sequences=3
    )
    assert sampled.tolist() == greedy.repeat(3, 1).tolist()
    torch.manual_seed(0)
    free = model.generate(
        input_ids=ids,
        pixel_values=images(1),
        max_new_tokens=6,
        do_sample=True,
        num_return_sequences=4,
        suppress_tokens=[IMAGE_TOKEN],  # a sampled placeholder would be taken for an image in the recompute
        output_logits=True,
        return_dict_in_generate=True,
    )
    n = ids.shape[1]
    logits = full_recompute_logits(model, free.sequences, n, images(1).repeat(4, 1, 1, 1))
    torch.testing.assert_close(torch.stack(free.logits, dim=1), logits[:, n - 1 : -1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("with_mask", [True, False], ids=["attention-mask", "no-mask"])
def test_assisted_decoding_gives_the_greedy_tokens(tiny_llava, with_mask):
    """Assisted decoding's first forward appends the candidate tokens to the prompt; the guidance must still pool over
    the prompt alone, or the verified tokens differ from greedy decoding's. Greedy verification gives exactly the
    greedy tokens, with candidates from n-grams of the prompt (which repeats some) or from a stock LLaVA assistant."""
    model = make_model()
    ids = torch.tensor([prompt_ids("img", 10, 11, 12, 10, 11, 12, 10, 11)])
    kwargs = {"input_ids": ids, "pixel_values": images(1), "max_new_tokens": 10, "do_sample": False}
    if with_mask:
        kwargs["attention_mask"] = torch.ones_like(ids)
    greedy = model.generate(**kwargs)
    assistant = tiny_llava[0].float()
    assert torch.equal(model.generate(**kwargs, prompt_lookup_num_tokens=3), greedy)
    assert torch.equal(model.generate(**kwargs, assistant_model=assistant), greedy)
    # A HyperLLaVA assistant (other experts, so that some candidates are rejected) continues its own cache each round.
    hyper_assistant = randomize_experts(make_model(), seed=1)
    assert torch.equal(model.generate(**kwargs, assistant_model=hyper_assistant), greedy)
    # Weights passed in for the prefill are this model's: the assistant (LLaVA has no experts) does without them.
    weights = model(input_ids=ids, pixel_values=images(1)).language_expert_weights
    assert torch.equal(model.generate(**kwargs, assistant_model=assistant, language_expert_weights=weights), greedy)


def test_generation_from_inputs_embeds_matches_generation_from_input_ids():
    model = make_model()
    ids = torch.tensor([prompt_ids(10, 11, 12, 13)])
    kwargs = {"max_new_tokens": 5, "do_sample": False, "output_logits": True, "return_dict_in_generate": True}
    from_ids = model.generate(input_ids=ids, **kwargs)
    from_embeds = model.generate(inputs_embeds=model.get_input_embeddings()(ids), **kwargs)
    assert torch.equal(from_embeds.sequences, from_ids.sequences[:, ids.shape[1] :])
    torch.testing.assert_close(torch.stack(from_embeds.logits), torch.stack(from_ids.logits), atol=1e-5, rtol=1e-5)


def test_a_chunked_prefill_is_refused_with_a_language_expert():
    """The guidance pools over the whole prompt before any expert layer runs, which a chunked prefill never holds."""
    model = make_model()
    ids = torch.tensor([prompt_ids(10, 11, 12, 13)])
    kwargs = {"input_ids": ids, "max_new_tokens": 3, "do_sample": False}
    with pytest.raises(NotImplementedError, match="prefill_chunk_size=2 splits the 5-token prompt"):
        model.generate(**kwargs, prefill_chunk_size=2)
    assert torch.equal(model.generate(**kwargs, prefill_chunk_size=ids.shape[1]), model.generate(**kwargs))


def test_beam_search_scores_match_full_recompute():
    model = make_model()
    ids = torch.tensor([prompt_ids("img", 10, 11), prompt_ids("img", 12, 13)])
    pixel_values = images(2)
    out = model.generate(
        input_ids=ids,
        pixel_values=pixel_values,
        max_new_tokens=5,
        min_new_tokens=5,
        num_beams=3,
        num_return_sequences=2,
        do_sample=False,
        length_penalty=0.0,
        return_dict_in_generate=True,
        output_scores=True,
    )
    n = ids.shape[1]
    logits = full_recompute_logits(model, out.sequences, n, pixel_values.repeat_interleave(2, dim=0))
    logprobs = torch.log_softmax(logits[:, n - 1 : -1], dim=-1)
    sequence_logprob = logprobs.gather(-1, out.sequences[:, n:, None]).sum(dim=(1, 2))
    # Beam scores are the log-softmax before processors (min_new_tokens masks EOS afterwards), summed; no length penalty.
    torch.testing.assert_close(out.sequences_scores, sequence_logprob, atol=1e-4, rtol=1e-5)


# --- 6. training paths ----------------------------------------------------------------------------------------------


def test_loss_and_gradients_reach_every_expert_parameter():
    model = make_model(visual_expert="both").train()
    batch = training_batch()
    out = model(**batch)
    shifted_logits, shifted_labels = out.logits[:, :-1], batch["labels"][:, 1:]
    expected = F.cross_entropy(shifted_logits.reshape(-1, shifted_logits.shape[-1]), shifted_labels.reshape(-1))
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    expert_grads = {n: p.grad for n, p in model.named_parameters() if "expert" in n}
    assert len(expert_grads) == 21
    for name, grad in expert_grads.items():
        assert grad is not None and grad.abs().sum() > 0, name


def gradients(model, batch):
    model.zero_grad()
    model(**batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_activation_checkpointing_gives_the_same_gradients():
    model = make_model().train()
    batch = training_batch()
    reference = gradients(model, batch)
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    assert model.model.language_model.layers[-1].gradient_checkpointing
    checkpointed = gradients(model, batch)
    assert reference.keys() == checkpointed.keys()
    for name in reference:
        torch.testing.assert_close(checkpointed[name], reference[name], atol=1e-6, rtol=1e-5, msg=name)


def test_activation_checkpointing_recomputes_an_expert_layer_no_further_than_llavas(tiny_llava):
    """Non-reentrant checkpointing recomputes a layer up to the last tensor saved for backward. LLaVA's layer saves
    nothing after the input of the FFN's down projection, so its biggest GEMM is not run again; an expert layer must
    not make it run again either (with the expert's tensors saved after the FFN, it did: 7.3 ms of a 7B step)."""
    llava, _ = tiny_llava
    model = randomize_experts(HyperLlavaForConditionalGeneration.from_llava(llava, language_expert_layers="all"))
    batch = {**training_batch(), "pixel_values": images(2).double()}
    runs = {}
    for name, candidate in (("llava", llava), ("hyperllava", model)):
        candidate.train()
        enable = getattr(candidate, "activation_checkpointing_enable", None) or candidate.gradient_checkpointing_enable
        enable({"use_reentrant": False})
        runs[name] = collections.Counter()
        for module_name, module in candidate.model.language_model.layers.named_modules():
            if isinstance(module, torch.nn.Linear):  # a forward hook fires only where the forward ran to its end
                module.register_forward_hook(lambda *_, key=module_name, count=runs[name]: count.update([key]))
        candidate(**batch).loss.backward()
    assert runs["llava"]["0.mlp.down_proj"] == 1  # the recomputation stopped before it
    assert runs["hyperllava"] == runs["llava"]


@pytest.mark.parametrize("grad", [True, False], ids=["training", "inference"])
def test_autocast_keeps_the_float32_residual_stream(grad):
    """Mixed precision (float32 weights, bf16 autocast): every decoder layer, the expert ones too, hands on a float32
    residual stream, as LLaVA's do, in training and in inference (where the adapter's in-place form must give way)."""
    model = make_model()
    dtypes = {}
    for index, layer in enumerate(model.model.language_model.layers):
        layer.register_forward_hook(lambda module, args, output, index=index: dtypes.__setitem__(index, output.dtype))
    with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=torch.tensor([prompt_ids("img", 10, 11)]), pixel_values=images(1))
    assert model.model.language_model.expert_layers  # the test covers expert layers
    assert set(dtypes.values()) == {torch.float32}, dtypes


def test_sdpa_and_eager_attention_agree():
    batch = training_batch()
    outputs = {}
    for implementation in ("sdpa", "eager"):
        model = make_model()
        model.set_attn_implementation(implementation)
        assert model.model.language_model.config._attn_implementation == implementation
        outputs[implementation] = model(**batch)
    valid = batch["attention_mask"].bool()  # padding rows attend to nothing; backends may fill them differently
    torch.testing.assert_close(outputs["sdpa"].logits[valid], outputs["eager"].logits[valid], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outputs["sdpa"].loss, outputs["eager"].loss)


# --- 8. torch.compile -------------------------------------------------------------------------------------------------


def test_compiled_forward_has_no_graph_breaks():
    model = make_model()
    batch = training_batch()
    expected = model(**batch)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # fullgraph: a graph break is an error
    try:
        actual = compiled(**batch)
    except torch._dynamo.exc.TorchDynamoException as error:
        skip_if_llava_fails_too(model, batch, error)
        raise
    torch.testing.assert_close(actual.logits, expected.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(actual.language_expert_weights, expected.language_expert_weights)


def skip_if_llava_fails_too(model, batch, error):
    """Skips when stock LLaVA's forward fails to compile as HyperLLaVA's did: an error of this torch, not ours (torch
    2.11, the GPU machine's: masked_scatter's fake implementation loses the unbacked size of the image tokens' count)."""
    llava = LlavaForConditionalGeneration(model.config.to_llava_config()).eval()
    llava(**batch)  # (a first eager forward, as for HyperLLaVA: Transformers' hook lock, docs/model.md)
    torch._dynamo.reset()
    try:
        torch.compile(llava, fullgraph=True, backend="aot_eager")(**batch)
    except type(error) as llava_error:
        pytest.skip(
            f"stock LLaVA's forward does not compile with fullgraph in torch {torch.__version__} either: {llava_error}"
        )


@pytest.mark.parametrize("overrides", [{}, {"language_expert_layers": None}], ids=["experts", "no-language-expert"])
def test_static_cache_generate_compiles_the_decoding_step_with_the_experts_inside(overrides):
    # On the CPU, with Dynamo's graph run as traced: what this covers is the graph (one for every step, no break, the
    # adapters inside), not Inductor's kernels or CUDA graphs.
    model = make_model(**overrides)
    ids, mask = left_pad([prompt_ids("img", 10, 11, 12), prompt_ids("img", 13)])
    kwargs = {"input_ids": ids, "attention_mask": mask, "pixel_values": images(2), "max_new_tokens": 6}
    kwargs.update(do_sample=False, output_logits=True, return_dict_in_generate=True)
    expected = model.generate(**kwargs)  # eager, dynamic cache

    with recorded_compilation(model) as graphs:
        compiled = model.generate(**kwargs, cache_implementation="static")

    assert len(graphs) == 1  # one graph serves every decoding step (the prefill runs uncompiled): no recompilation
    # Each expert layer's adapter is inside: x W_d, and W_u's product added into h + FFN(x) (decoding: no autograd).
    matmuls = [node.target for node in graphs[0].graph.nodes if node.target in (torch.bmm, "baddbmm_")]
    assert matmuls.count(torch.bmm) == matmuls.count("baddbmm_") == len(model.config.language_expert_layer_indices)
    assert torch.equal(compiled.sequences, expected.sequences)
    torch.testing.assert_close(torch.stack(compiled.logits), torch.stack(expected.logits), atol=1e-5, rtol=1e-5)


def decode_step_ops(model, ids, mask):
    """The aten ops one decoding step dispatches (after a prefill with a cache): what bounds eager decoding."""
    with torch.no_grad():
        prefill = model(input_ids=ids, attention_mask=mask, use_cache=True)
        step = {
            CACHE_ARG: getattr(prefill, CACHE_ARG),
            "input_ids": ids[:, -1:],
            "attention_mask": F.pad(mask, (0, 1), value=1),
        }
        if isinstance(model, HyperLlavaForConditionalGeneration):
            step["language_expert_weights"] = prefill.language_expert_weights
        with DispatchedOps() as dispatched:
            model(**step)
    return dispatched.calls.total()


@pytest.mark.parametrize("weight_sets", [3, 1], ids=["per-sample", "shared"])
def test_without_autograd_the_language_expert_adds_its_product_rounded_once(weight_sets):
    """In bf16 decoding W_u's product goes into h + FFN(x) in place, rounded once, as the fused kernel rounds it: what
    float32 arithmetic on the same bf16 operands rounds to. (Added as a sum of its own, it is rounded twice: a fifth
    of the elements here differ.)"""
    generator = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=generator)).bfloat16()

    x, residual, ffn_out = rand(3, 5, 48), rand(3, 5, 48, scale=4), rand(3, 5, 48)
    w_down, w_up = rand(weight_sets, 48, 16, scale=48**-0.5), rand(weight_sets, 8, 48)
    with torch.no_grad():
        out = expert_adapter(x, w_down, w_up, residual, "eager", ffn=lambda _: ffn_out)
        bottleneck = swiglu_bottleneck(x, w_down.expand(3, -1, -1)).float()
    expected = ((residual + ffn_out).float() + torch.matmul(bottleneck, w_up.float())).bfloat16()
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


@pytest.mark.parametrize("batch, expert_mode", [(1, "dynamic"), (3, "dynamic"), (3, "static")])
def test_a_decoding_step_adds_five_ops_per_expert_layer(batch, expert_mode):
    # Eager decoding is host-bound on a GPU, so its cost is the number of dispatched ops: the adapter is bmm, chunk,
    # SiLU, multiply, and W_u's product added into the residual stream by baddbmm_ (plus two expands when one weight
    # set serves the batch), and nothing else: each layer's view of the weights was made by the prefill.
    config = tiny_config(num_hidden_layers=8, expert_mode=expert_mode)
    torch.manual_seed(0)
    llava = LlavaForConditionalGeneration(config.to_llava_config()).eval()
    hyper = randomize_experts(HyperLlavaForConditionalGeneration.from_llava(llava, expert_mode=expert_mode))
    ids, mask = torch.randint(5, 60, (batch, 7)), torch.ones(batch, 7, dtype=torch.long)
    expert_layers = len(config.language_expert_layer_indices)
    per_layer = 5 if batch == 1 or expert_mode == "dynamic" else 7
    extra = decode_step_ops(hyper, ids, mask) - decode_step_ops(llava, ids, mask)
    assert extra <= per_layer * expert_layers, (extra, expert_layers)


# --- 9. bad input -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_images", [1, 3])
def test_image_count_mismatch_is_a_clear_error(num_images):
    model = make_model()
    ids = torch.tensor([prompt_ids("img", 10, "img")])
    generate = functools.partial(
        model.generate, max_new_tokens=2
    )  # since 5.18 it encodes the images before the forward
    for run in (model, generate):
        with pytest.raises(ValueError, match=rf"got {num_images} image\(s\) of 4 features but 8 image tokens"):
            run(input_ids=ids, pixel_values=images(num_images))
    # The features per image are counted, not taken from the config: "full" keeps the CLS token, 5 per image.
    with pytest.raises(ValueError, match=r"got 2 image\(s\) of 5 features but 8 image tokens.*needs exactly 5"):
        model(input_ids=ids, pixel_values=images(2), vision_feature_select_strategy="full")


def test_wrong_pixel_shape_is_a_clear_error():
    model = make_model()
    with pytest.raises(
        ValueError, match=r"pixel_values must have shape \(num_images, 3, 28, 28\), got \(1, 3, 32, 32\)"
    ):
        model(input_ids=torch.tensor([prompt_ids("img")]), pixel_values=torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            {"language_expert_layers": [0, 3], "language_guidance_layer": 2},
            r"language_expert_layers \[0\] come before language_guidance_layer=2",
        ),
        ({"language_expert_layers": [1, 7]}, r"language_expert_layers \[7\] are out of range.*0\.\.3"),
        ({"expert_bottleneck_dim": 64}, r"expert_bottleneck_dim=64 is larger than .* allowed values: 1\.\.24"),
        ({"language_guidance_layer": 9}, r"language_guidance_layer must be an integer in 0\.\.3, got 9"),
        ({"language_expert_layers": []}, r"language_expert_layers must be one of .* or a non-empty list"),
        (
            {"num_hidden_layers": 1, "language_expert_layers": "anterior"},
            r"language_expert_layers='anterior' \(the first half\) names no layer of a 1-layer text model",
        ),
    ],
)
def test_invalid_config_fields_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


@pytest.mark.parametrize("inside, outside", [(-4, -5), (3, 4), ([-4, 3], [-2, 4])])
def test_a_vision_feature_layer_outside_the_vision_towers_hidden_states_is_refused(inside, outside):
    """The bounds are those of stock LLaVA's forward, which the 3-layer tiny tower's hidden states (4: the
    embeddings' and one per layer) fail past them with an IndexError."""
    ids, pixel_values = torch.tensor([prompt_ids("img", 10)]), images(1)
    llava_config = tiny_config(vision_feature_layer=inside).to_llava_config()
    LlavaForConditionalGeneration(llava_config)(input_ids=ids, pixel_values=pixel_values)
    llava_config.vision_feature_layer = outside
    with pytest.raises(IndexError):
        LlavaForConditionalGeneration(llava_config)(input_ids=ids, pixel_values=pixel_values)
    make_model(vision_feature_layer=inside)(input_ids=ids, pixel_values=pixel_values)
    out_of_range = [outside[-1]] if isinstance(outside, list) else [outside]
    with pytest.raises(ValueError, match=re.escape(f"vision_feature_layer {out_of_range} is out of range: the vision "
                                                   "tower has 3 layers, so its hidden states are indexed -4..3")):  # fmt: skip
        tiny_config(vision_feature_layer=outside)


@pytest.mark.parametrize(
    "visual_expert, feature_layer, widest",
    [(None, -2, 32), ("second", -2, 32), ("first", -2, 24), ("both", [-2, -1], 32)],
)
def test_the_bottleneck_may_be_as_wide_as_the_narrowest_width_an_expert_adapts(visual_expert, feature_layer, widest):
    """The LLM's width (32 here), and for the first visual expert its input: the vision width (24) per feature layer."""
    config = tiny_config(visual_expert=visual_expert, vision_feature_layer=feature_layer, expert_bottleneck_dim=widest)
    model = HyperLlavaForConditionalGeneration(config)
    assert all(expert.rank == widest for expert in model.modules() if isinstance(expert, HyperExpert))
    with pytest.raises(ValueError, match=rf"expert_bottleneck_dim={widest + 1} .* allowed values: 1\.\.{widest}$"):
        tiny_config(visual_expert=visual_expert, vision_feature_layer=feature_layer, expert_bottleneck_dim=widest + 1)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("expert_mode", "hyper", r"'expert_mode' expected one of \('dynamic', 'latent', 'static'\), got hyper"),
        ("visual_expert", "third", r"'visual_expert' expected one of \('first', 'second', 'both'\), got third"),
        ("expert_kernel", "cuda", r"'expert_kernel' expected one of \('auto', 'eager', 'triton'\), got cuda"),
        ("expert_embedding_dim", 0, r"'expert_embedding_dim':\s+ValueError: must be a positive integer, got 0"),
        ("expert_bottleneck_dim", True, r"'expert_bottleneck_dim' expected int, got bool"),
        ("language_expert_layers", "middle", r"'language_expert_layers' expected one of \('posterior', 'anterior'"),
        ("language_expert_layers", (2, 3), r"'language_expert_layers' expected a list, got tuple"),
        ("language_expert_layers", [2, True], r"Invalid item at index 1 in list 'language_expert_layers'"),
        ("language_guidance_layer", 1.0, r"'language_guidance_layer' expected int, got float"),
    ],
)
def test_config_fields_are_checked_when_set(field, value, message):
    """As LlavaConfig's fields are (a strict dataclass): in the constructor and on assignment, which leaves the
    config as it was."""
    from huggingface_hub.errors import StrictDataclassFieldValidationError

    with pytest.raises(StrictDataclassFieldValidationError, match=message):
        tiny_config(**{field: value})
    config = tiny_config()
    before = config.to_dict()
    with pytest.raises(StrictDataclassFieldValidationError, match=message):
        setattr(config, field, value)
    assert config.to_dict() == before


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda c: c.update({"language_expert_layers": "anterior"}),
            r"\[0, 1\] come before language_guidance_layer=2",
        ),
        (
            lambda c: setattr(c.text_config, "num_hidden_layers", 2),
            r"language_guidance_layer must be .* in 0..1, got 2",
        ),
        (lambda c: setattr(c, "expert_bottleneck_dim", 100), "expert_bottleneck_dim=100 is larger than"),
    ],
    ids=["layers", "depth", "bottleneck"],
)
def test_a_config_whose_fields_were_changed_apart_is_not_saved_if_it_would_not_load(
    tmp_path, monkeypatch, change, message
):
    """Each field is checked when set, but what involves several only as a whole: `save_pretrained` checks it, so that
    a saved config always loads, and `push_to_hub` checks it before it creates the Hub repo."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import StrictDataclassClassValidationError

    monkeypatch.setattr(HfApi, "create_repo", lambda *args, **kwargs: pytest.fail("created a Hub repo"))
    config = tiny_config()  # 4 layers: k = 2, experts in layers 2 and 3
    change(config)
    with pytest.raises(StrictDataclassClassValidationError, match=message):
        config.save_pretrained(tmp_path / "config")
    assert not (tmp_path / "config").exists()  # not even configuration_hyperllava.py in it
    with pytest.raises(StrictDataclassClassValidationError, match=message):
        config.push_to_hub("me/hyperllava")
    # A model whose config was so changed writes nothing either: no remote-code files without their config.
    model = HyperLlavaForConditionalGeneration(tiny_config())
    change(model.config)
    with pytest.raises(StrictDataclassClassValidationError, match=message):
        model.save_pretrained(tmp_path / "model")
    assert not (tmp_path / "model").exists()
    with pytest.raises(StrictDataclassClassValidationError, match=message):
        model.push_to_hub("me/hyperllava")


@pytest.mark.parametrize(
    "change, k",
    [
        (lambda c: c.update({"language_expert_layers": "anterior"}), 0),
        (lambda c: setattr(c.text_config, "num_hidden_layers", 2), 1),
    ],
    ids=["layers", "depth"],
)
def test_a_guidance_layer_refused_after_a_change_names_the_way_to_its_default_which_then_fits(change, k):
    """The guidance layer filled in for a 4-layer config (2) is kept when the layers or the depth change; the refusal
    says that `language_guidance_layer=None` takes the default again, and that default is a fresh config's."""
    config = tiny_config()
    change(config)
    with pytest.raises(ValueError, match="language_guidance_layer=None takes the default"):
        config.validate_expert_fields()
    config.language_guidance_layer = None
    config.validate_expert_fields()
    fresh = tiny_config(
        num_hidden_layers=config.text_config.num_hidden_layers, language_expert_layers=config.language_expert_layers
    )
    assert config.language_guidance_layer == fresh.language_guidance_layer == k


def test_from_llava_config_takes_llavas_own_attributes():
    """`image_token_id` (LlavaConfig's alias of image_token_index) and what LLaVA's config carries, `pad_token_id`."""
    llava = tiny_config().to_llava_config()
    config = HyperLlavaConfig.from_llava_config(llava, image_token_id=7, pad_token_id=5, expert_mode="static")
    assert (config.image_token_index, config.pad_token_id, config.expert_mode) == (7, 5, "static")
    with pytest.raises(ValueError, match=r"\['expert_mod'\] are not HyperLlavaConfig fields"):
        HyperLlavaConfig.from_llava_config(llava, expert_mod="static")


def test_unsupported_text_backbone_is_refused():
    from transformers_hyperllava import HyperLlavaConfig

    with pytest.raises(ValueError, match=r"text_config.model_type='mistral' is not supported.*\['llama'\]"):
        HyperLlavaConfig(text_config={"model_type": "mistral"})
    with pytest.raises(ValueError, match=r"vision_config.model_type='siglip_vision_model' is not supported"):
        HyperLlavaConfig(vision_config={"model_type": "siglip_vision_model"})


@pytest.mark.parametrize(
    "num_layers, spec, layers, k",
    [
        (4, "posterior", [2, 3], 2),
        (5, "posterior", [2, 3, 4], 2),
        (5, "anterior", [0, 1], 0),
        (5, "all", [0, 1, 2, 3, 4], 0),
        (4, [3], [3], 2),  # k defaults to L // 2 when the experts start later
        (4, [3, 1], [1, 3], 1),  # ... and is lowered to the first expert layer when they start earlier
        (4, None, [], None),
    ],
)
def test_language_expert_presets_and_the_default_guidance_layer(num_layers, spec, layers, k):
    config = tiny_config(num_hidden_layers=num_layers, language_expert_layers=spec)
    assert config.language_expert_layer_indices == layers
    assert config.language_guidance_layer == k


def test_config_defaults_reproduce_the_paper():
    config = tiny_config(expert_embedding_dim=64, expert_bottleneck_dim=16, hypernetwork_hidden_dim=64)
    from transformers_hyperllava import HyperLlavaConfig

    default = HyperLlavaConfig()  # LLaVA-1.5-7B shapes
    assert (default.visual_expert, default.expert_mode, default.language_expert_layers) == (
        "first",
        "dynamic",
        "posterior",
    )
    assert default.language_guidance_layer == 16 and default.language_expert_layer_indices == list(range(16, 32))
    assert (default.expert_embedding_dim, default.expert_bottleneck_dim, default.hypernetwork_hidden_dim) == (
        64,
        16,
        64,
    )
    assert config.language_guidance_layer == 2


# --- Transformers interfaces ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_a_cache_passed_under_either_name_is_used(name):
    from transformers import DynamicCache

    model = make_model()
    ids = torch.tensor([prompt_ids("img", 10, 11, 12)])
    full = model(input_ids=ids, pixel_values=images(1))
    cache = DynamicCache(config=model.config.text_config)
    prefill = model(input_ids=ids[:, :-1], pixel_values=images(1), use_cache=True, **{name: cache})
    assert cache.get_seq_length() == ids.shape[1] - 1
    step = model(
        input_ids=ids[:, -1:],
        use_cache=True,
        language_expert_weights=prefill.language_expert_weights,
        **{name: cache},
    )
    # The prefill's guidance covers its own tokens only: compare with a recompute pooled the same way.
    guidance_mask = torch.ones_like(ids, dtype=torch.bool)
    guidance_mask[:, -1] = False
    expected = model(input_ids=ids, pixel_values=images(1), language_guidance_mask=guidance_mask).logits[:, -1]
    torch.testing.assert_close(step.logits[:, -1], expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(step.logits[:, -1], full.logits[:, -1], atol=1e-4)  # the guidance mask matters


def test_continuous_batching_is_refused_with_a_language_expert():
    """Instead of requests that come back empty, with the reason only in a log."""
    config = GenerationConfig(max_new_tokens=2, do_sample=False)
    with pytest.raises(NotImplementedError, match="continuous batching .* does not support the language expert"):
        make_model().generate_batch(inputs=[prompt_ids(10, 11)], generation_config=config, warmup=False)


def assert_continuous_batching_matches(model, reference):
    """`model.generate_batch`'s tokens are those of `reference.generate` on each prompt alone."""
    config = GenerationConfig(max_new_tokens=4, do_sample=False, pad_token_id=0)
    prompts = [prompt_ids(10, 11, 12), prompt_ids(13, 14)]
    results = model.generate_batch(inputs=prompts, generation_config=config, warmup=False)
    generated = {tuple(result.prompt_ids): result.generated_tokens for result in results.values()}
    for prompt in prompts:
        expected = reference.generate(torch.tensor([prompt]), generation_config=config)[0, len(prompt) :]
        assert generated[tuple(prompt)] == expected.tolist()


@pytest.mark.parametrize("mode", ["static", "latent"])
def test_continuous_batching_matches_generate_where_the_weights_ignore_the_input(mode):
    model = make_model(expert_mode=mode)
    assert_continuous_batching_matches(model, model)


def test_continuous_batching_makes_no_adapter_for_eager_decoding(monkeypatch):
    """Continuous batching generates the weights at every step (its paged cache holds many requests): an adapter made
    for them would serve one step, so its steps run the eager adapter."""
    made = []
    monkeypatch.setattr(modeling_hyperllava, "decode_adapters_available", lambda device: True)
    monkeypatch.setattr(modeling_hyperllava, "DecodeAdapter", lambda *pair: made.append(pair))
    model = make_model(expert_mode="static")
    config = GenerationConfig(max_new_tokens=4, do_sample=False, pad_token_id=0)
    results = model.generate_batch(inputs=[prompt_ids(10, 11, 12)], generation_config=config, warmup=False)
    assert [len(result.generated_tokens) for result in results.values()] == [4]  # three decoding steps of one token
    assert made == []
    with torch.no_grad():  # (as a decoding step on a cache of one's own makes them)
        model(input_ids=torch.tensor([prompt_ids(10, 11)]), use_cache=True)
    assert len(made) == len(model.config.language_expert_layer_indices)


def test_continuous_batching_without_a_language_expert_generates_llavas_tokens(tiny_llava):
    llava, _ = tiny_llava
    model = randomize_experts(HyperLlavaForConditionalGeneration.from_llava(llava, language_expert_layers=None))
    assert_continuous_batching_matches(model, llava)


def test_precomputed_image_features_give_what_pixel_values_give():
    """`mm_encoder_outputs`, as Transformers' `generate` (5.18 on) passes the images to the forward."""
    model = make_model()
    ids = torch.tensor([prompt_ids("img", 10, 11, "img", 12)])
    pixel_values = images(2)
    encoded = {"image": model.model.get_image_features(pixel_values=pixel_values, return_dict=True)}
    from_pixels = model(input_ids=ids, pixel_values=pixel_values).logits
    assert torch.equal(model(input_ids=ids, mm_encoder_outputs=encoded).logits, from_pixels)
    assert not torch.allclose(model(input_ids=ids).logits, from_pixels)  # (the images matter)
    with pytest.raises(ValueError, match="pass the images once"):
        model(input_ids=ids, pixel_values=pixel_values, mm_encoder_outputs=encoded)


def test_outputs_report_the_images_as_llava_does(tiny_llava):
    """The image field of both models' outputs (5.24: `image_outputs`; earlier: `image_hidden_states`), and the tuples
    of `return_dict=False`: LLaVA's, then the generated weights."""
    llava, _ = tiny_llava
    model = HyperLlavaForConditionalGeneration.from_llava(llava)
    kwargs = {"input_ids": torch.tensor([prompt_ids("img", 10, "img")]), "pixel_values": images(2).double()}

    def same(got, want):
        assert type(got) is type(want)
        if isinstance(want, torch.Tensor):
            torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
        elif IMAGE_OUTPUT == "image_outputs" and hasattr(want, "pooler_output"):
            torch.testing.assert_close(torch.cat(got.pooler_output), torch.cat(want.pooler_output), atol=1e-10, rtol=0)

    for ours, llavas in ((model, llava), (model.model, llava.model)):
        same(getattr(ours(**kwargs), IMAGE_OUTPUT), getattr(llavas(**kwargs), IMAGE_OUTPUT))
        got, want = ours(**kwargs, return_dict=False), llavas(**kwargs, return_dict=False)
        assert len(got) == len(want) + 1 and got[-1].shape[:2] == (1, len(model.config.language_expert_layer_indices))
        for got_item, want_item in zip(got, want):
            same(got_item, want_item)


@pytest.mark.parametrize("kind", ["int", "positions", "positions-per-sample", "mask-per-sample"])
def test_logits_to_keep_selects_the_logits_llava_selects(tiny_llava, kind):
    """Every form of `logits_to_keep` the installed LLaVA takes (2-D ones from Transformers 5.21)."""
    ids = torch.tensor([prompt_ids("img", 10, 11), prompt_ids(12, "img", 13)])
    keep = {
        "int": 2,
        "positions": torch.tensor([0, 5]),
        "positions-per-sample": torch.tensor([[1, 6], [0, 2]]),
        "mask-per-sample": torch.tensor([[True] * 3 + [False] * 4, [False] * 6 + [True]]),
    }[kind]
    if isinstance(keep, torch.Tensor) and keep.ndim == 2 and "slice_logits_to_keep" not in vars(modeling_llava):
        pytest.skip("this release's LLaVA takes an int or 1-D logits_to_keep only")
    llava, _ = tiny_llava
    model = HyperLlavaForConditionalGeneration.from_llava(llava)
    kwargs = {"input_ids": ids, "pixel_values": images(2).double(), "logits_to_keep": keep}
    torch.testing.assert_close(model(**kwargs).logits, llava(**kwargs).logits, atol=1e-10, rtol=0)


@pytest.mark.parametrize("case", ["hidden-states", "interpolated-positions"])
def test_the_vision_towers_arguments_reach_it_as_in_llava(tiny_llava, case):
    """The forward's other arguments go to the vision tower too, as LLaVA passes them: its hidden states are reported
    with the images (and the text model's as LLaVA's), and images of another size are encoded at interpolated
    positions (42 px: 9 patches)."""
    llava, _ = tiny_llava
    model = HyperLlavaForConditionalGeneration.from_llava(llava)
    if case == "hidden-states":
        kwargs = {"input_ids": torch.tensor([prompt_ids("img", 10)]), "output_hidden_states": True}
        kwargs["pixel_values"] = images(1).double()
    else:
        kwargs = {"input_ids": torch.tensor([[1] + [IMAGE_TOKEN] * 9 + [10]]), "interpolate_pos_encoding": True}
        kwargs["pixel_values"] = torch.randn(1, 3, 42, 42, dtype=torch.float64)
    if case == "interpolated-positions" and IMAGE_OUTPUT == "image_hidden_states":
        pytest.skip(
            "LLaVA before 5.24 passes nothing on to its vision tower, so it is no reference for other image sizes"
        )
    want, got = llava(**kwargs), model(**kwargs)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-10, rtol=0)
    if case == "hidden-states":  # the text model's, one per layer and the embeddings
        assert len(got.hidden_states) == len(want.hidden_states) == model.config.text_config.num_hidden_layers + 1
        for got_item, want_item in zip(got.hidden_states, want.hidden_states):
            torch.testing.assert_close(got_item, want_item, atol=1e-10, rtol=0)
    if (
        case == "hidden-states" and IMAGE_OUTPUT == "image_outputs"
    ):  # (earlier releases report the projected features only)
        got_states, want_states = got.image_outputs.hidden_states, want.image_outputs.hidden_states
        assert len(got_states) == len(want_states) == model.config.vision_config.num_hidden_layers + 1
        for got_item, want_item in zip(got_states, want_states):
            torch.testing.assert_close(got_item, want_item, atol=1e-10, rtol=0)


def test_generate_continues_a_cache_that_a_forward_filled_with_its_weights():
    """A prefill of one's own, then `generate` on the cache: the tokens are those of a generation given the prefill's
    weights, and of a full forward whose guidance pools over what the prefill saw."""
    from transformers import DynamicCache

    model = make_model()
    ids = torch.tensor([prompt_ids("img", 10, 11)])
    cache = DynamicCache(config=model.config.text_config)
    prefill = model(input_ids=ids[:, :-1], pixel_values=images(1), use_cache=True, **{CACHE_ARG: cache})
    kwargs = {"max_new_tokens": 5, "do_sample": False}
    continued = model.generate(input_ids=ids, **{CACHE_ARG: cache}, **kwargs)
    given = model.generate(
        input_ids=ids, pixel_values=images(1), language_expert_weights=prefill.language_expert_weights, **kwargs
    )
    assert torch.equal(continued, given)
    guidance_mask = torch.ones_like(ids, dtype=torch.bool)
    guidance_mask[:, -1] = False
    first = model(input_ids=ids, pixel_values=images(1), language_guidance_mask=guidance_mask).logits[0, -1].argmax()
    assert continued[0, ids.shape[1]] == first


def test_a_second_turn_continues_the_first_turns_cache_with_its_weights():
    """Multi-turn chat reusing the cache: turn 2 runs with the weights turn 1's prompt generated, as training does for
    every turn of a conversation (the guidance is the prompt before the first answer)."""
    model = make_model()
    turn1 = torch.tensor([prompt_ids("img", 10, 11)])
    kwargs = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False, "return_dict_in_generate": True}
    first = model.generate(input_ids=turn1, pixel_values=images(1), **kwargs)
    turn2 = torch.cat([first.sequences, torch.tensor([[12, 13, 14]])], dim=1)
    second = model.generate(input_ids=turn2, **{CACHE_ARG: getattr(first, CACHE_ARG)}, output_logits=True, **kwargs)
    weights = model(input_ids=turn1, pixel_values=images(1)).language_expert_weights
    fresh = model.generate(
        input_ids=turn2, pixel_values=images(1), language_expert_weights=weights, output_logits=True, **kwargs
    )
    assert torch.equal(second.sequences, fresh.sequences)
    torch.testing.assert_close(torch.stack(second.logits), torch.stack(fresh.logits), atol=1e-5, rtol=1e-5)
    # The whole conversation as one prompt, without the cache: the guidance mask names the first turn's prompt.
    first_prompt = torch.zeros_like(turn2, dtype=torch.bool)
    first_prompt[:, : turn1.shape[1]] = True
    masked = model.generate(
        input_ids=turn2, pixel_values=images(1), language_guidance_mask=first_prompt, output_logits=True, **kwargs
    )
    assert torch.equal(masked.sequences, fresh.sequences)
    torch.testing.assert_close(torch.stack(masked.logits), torch.stack(fresh.logits), atol=1e-5, rtol=1e-5)


def test_rows_rearranged_on_a_cache_continue_with_their_weights_once_indexed_too():
    """The cache's row methods move its keys and values only: indexing the weights it carries the same way continues
    each row as a full recompute does; a row count the weights no longer match is refused."""
    model = make_model()
    ids, mask = left_pad([prompt_ids("img", 10, 11), prompt_ids(12, "img", 13, 14)])
    pixel_values, step = images(2), torch.tensor([[20], [21]])
    with torch.no_grad():
        for rows in ([1, 0], [1]):
            cache = getattr(
                model(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, use_cache=True), CACHE_ARG
            )
            if len(rows) == 2:
                cache.reorder_cache(torch.tensor(rows))
            else:
                cache.batch_select_indices(torch.tensor(rows))
                with pytest.raises(ValueError, match="carries the language expert's weights of 2 sequences, but the"):
                    model(
                        input_ids=step[: len(rows)],
                        attention_mask=torch.ones(1, ids.shape[1] + 1),
                        **{CACHE_ARG: cache},
                    )
            cache.language_expert_weights = cache.language_expert_weights[rows]
            full_mask = torch.cat([mask[rows], torch.ones(len(rows), 1, dtype=mask.dtype)], dim=1)
            continued = model(input_ids=step[: len(rows)], attention_mask=full_mask, **{CACHE_ARG: cache})
            full = model(
                input_ids=torch.cat([ids[rows], step[: len(rows)]], dim=1),
                attention_mask=full_mask,
                pixel_values=pixel_values[rows],
                language_guidance_mask=F.pad(mask[rows], (0, 1)),  # the prompt, as the prefill pooled it
            )
            torch.testing.assert_close(continued.logits[:, -1], full.logits[:, -1], atol=1e-5, rtol=1e-5)


def test_weights_from_outside_the_call_that_do_not_fit_the_models_expert_layers_are_refused():
    """Weights passed in, or carried by a cache another model filled, are split per expert layer: a tensor covering
    fewer layers would leave the later ones without an adapter, and other sizes would make another model's adapters.
    Each is refused with the shape this model needs; the model's own weights, for every sequence or one for all, run."""
    model = make_model()
    ids = torch.tensor([prompt_ids("img", 10, 11)])
    with torch.no_grad():
        own = model(input_ids=ids, pixel_values=images(1)).language_expert_weights
        layers, values = own.shape[1:]
        assert values == 3 * model.config.expert_bottleneck_dim * model.config.text_config.hidden_size
        for wrong in (own[:, :1], own[:, :, :-1], torch.cat([own, own], dim=1), own[0], own.repeat(3, 1, 1)):
            with pytest.raises(
                ValueError,
                match=re.escape(f"shape {tuple(wrong.shape)}, but this model takes (1, {layers}, {values})"),
            ):
                model(input_ids=ids, pixel_values=images(1), language_expert_weights=wrong)
        torch.testing.assert_close(
            model(
                input_ids=ids.repeat(2, 1), pixel_values=images(1).repeat(2, 1, 1, 1), language_expert_weights=own
            ).logits[1],
            model(input_ids=ids, pixel_values=images(1), language_expert_weights=own).logits[0],
        )
        # A cache that a model of another rank filled, continued by this one.
        other = make_model(expert_bottleneck_dim=2 * model.config.expert_bottleneck_dim)
        cache = getattr(other(input_ids=ids, pixel_values=images(1), use_cache=True), CACHE_ARG)
        with pytest.raises(ValueError, match="the language expert weights the cache carries have shape"):
            model(input_ids=torch.tensor([[12]]), **{CACHE_ARG: cache})


def test_a_decoding_loop_of_ones_own_continues_the_cache():
    model = make_model()
    ids = torch.tensor([prompt_ids("img", 10, 11)])
    prefill = model(input_ids=ids, pixel_values=images(1), use_cache=True)
    step = model(input_ids=torch.tensor([[12]]), **{CACHE_ARG: getattr(prefill, CACHE_ARG)})
    assert step.language_expert_weights is prefill.language_expert_weights
    full = full_recompute_logits(model, torch.cat([ids, torch.tensor([[12]])], dim=1), ids.shape[1], images(1))
    torch.testing.assert_close(step.logits[:, -1], full[:, -1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_a_compiled_decoding_loop_continues_the_cache_with_its_weights(kind):
    """Transformers' recipe for compiled decoding (an eager prefill, then a compiled forward per token, no graph break)
    gives the eager loop's logits: the compiled steps take the weights the prefill left on the cache."""
    from transformers import DynamicCache, StaticCache

    model = randomize_experts(make_model(), std=0.5)
    ids = torch.tensor([prompt_ids("img", 10, 11)])
    text_config = model.config.text_config
    new_cache = {"dynamic": lambda: DynamicCache(config=text_config), "static": lambda: StaticCache(text_config, 16)}

    def decode(forward):
        cache = new_cache[kind]()
        model(input_ids=ids, pixel_values=images(1), use_cache=True, **{CACHE_ARG: cache})
        steps = []
        for position, token in enumerate([12, 13, 14], start=ids.shape[1]):
            inputs = {"input_ids": torch.tensor([[token]]), "position_ids": torch.tensor([[position]])}
            steps.append(forward(**inputs, use_cache=True, **{CACHE_ARG: cache}).logits[:, -1])
        return torch.cat(steps)

    expected = decode(model.forward)
    torch._dynamo.reset()
    compiled = decode(torch.compile(model.forward, fullgraph=True, backend="aot_eager"))
    torch.testing.assert_close(compiled, expected, atol=1e-5, rtol=1e-5)


def test_an_exported_decoding_step_takes_the_weights_as_an_input():
    """An exported program keeps neither the weights riding on the cache nor a guard on them: exporting a call that
    continues a cache without the weights is refused (Transformers' ExecuTorch wrapper with its static cache, a filled
    DynamicCache); exported with them as an input, the step decodes another prompt's sequence as the eager model does."""
    from transformers import DynamicCache
    from transformers.integrations.executorch import (
        TorchExportableModuleForDecoderOnlyLM,
        register_dynamic_cache_export_support,
    )

    register_dynamic_cache_export_support()
    model = make_model()
    ids = torch.tensor([prompt_ids(10, 11, 12, 13)])
    model.generation_config.cache_implementation = "static"
    wrapper = TorchExportableModuleForDecoderOnlyLM(model, batch_size=1, max_cache_len=16)
    with pytest.raises(ValueError, match=r"torch.export of a call that continues a cache \(StaticCache\)"):
        wrapper.export(input_ids=ids, cache_position=torch.arange(ids.shape[1]), strict=False)
    # Strict (the wrapper's default), Dynamo reports the refusal as an unsupported exception, caused by it.
    with pytest.raises(Exception) as refused:
        wrapper.export(input_ids=ids, cache_position=torch.arange(ids.shape[1]), strict=True)
    causes = [refused.value]
    while causes[-1].__cause__ is not None:
        causes.append(causes[-1].__cause__)
    assert any("torch.export of a call that continues a cache (StaticCache)" in str(cause) for cause in causes)

    def prefill(ids, seed):
        cache = DynamicCache(config=model.config.text_config)
        with torch.no_grad():
            out = model(
                input_ids=torch.tensor([ids]), pixel_values=images(1, seed), use_cache=True, **{CACHE_ARG: cache}
            )
        return out.language_expert_weights, cache

    (weights, cache), (other_weights, other_cache) = (
        prefill(prompt_ids("img", 10, 11), 0),
        prefill(prompt_ids("img", 14, 15), 1),
    )
    step = {"input_ids": torch.tensor([[12]]), "use_cache": True}
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"torch.export of a call that continues a cache \(DynamicCache\)"):
            torch.export.export(model, (), {**step, CACHE_ARG: copy.deepcopy(cache)}, strict=False)
        exported = torch.export.export(
            model, (), {**step, CACHE_ARG: copy.deepcopy(cache), "language_expert_weights": weights}, strict=False
        ).module()
        got = exported(**step, **{CACHE_ARG: copy.deepcopy(other_cache)}, language_expert_weights=other_weights)
        expected = model(**step, **{CACHE_ARG: other_cache})
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["static", "latent"])
def test_an_export_leaves_no_tracers_tensor_on_the_cache_its_wrapper_holds(mode):
    """Where the weights do not depend on the input, the static cache of Transformers' ExecuTorch wrapper exports. The
    wrapper keeps that cache: the weights that the traced prefill generated must not stay on it, or a later eager call
    that continues the cache would compute with the tracer's tensor. Afterwards the wrapper computes as one never
    exported."""
    from transformers.integrations.executorch import TorchExportableModuleForDecoderOnlyLM

    model = make_model(expert_mode=mode)
    model.generation_config.cache_implementation = "static"
    ids = torch.tensor([prompt_ids(10, 11, 12, 13)])
    exported, fresh = (TorchExportableModuleForDecoderOnlyLM(model, batch_size=1, max_cache_len=16) for _ in range(2))
    with torch.no_grad():
        exported.export(input_ids=ids[:, :1], cache_position=torch.tensor([0]), strict=False)
        assert getattr(exported.model.static_cache, CACHED_WEIGHTS, None) is None
        got, expected = (
            wrapper.model(input_ids=ids[:, 3:4], cache_position=torch.tensor([3])) for wrapper in (exported, fresh)
        )
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_a_compiled_forward_on_an_emptied_dynamic_cache_starts_anew():
    """Inside a graph a DynamicCache's length is still known (a Python int): emptied, it must not hand its stale
    weights to a new prompt."""
    from transformers import DynamicCache

    model = make_model()
    other = torch.tensor([prompt_ids(13, 14, 15)])
    filled = model(input_ids=torch.tensor([prompt_ids("img", 10, 11)]), pixel_values=images(1), use_cache=True)
    # An empty cache that carries a filled one's weights, as 5.24's `reset()` leaves it (5.17's keeps a DynamicCache's
    # length: it is not emptied).
    cache = DynamicCache(config=model.config.text_config)
    setattr(cache, CACHED_WEIGHTS, filled.language_expert_weights)
    torch._dynamo.reset()
    compiled = torch.compile(model.forward, fullgraph=True, backend="aot_eager")
    restarted = compiled(input_ids=other, use_cache=True, **{CACHE_ARG: cache})
    torch.testing.assert_close(restarted.logits, model(input_ids=other).logits, atol=1e-5, rtol=1e-5)


def test_a_cache_without_the_experts_weights_is_refused_and_an_emptied_one_starts_anew(tiny_llava):
    from transformers import DynamicCache, StaticCache

    model = make_model()
    ids = torch.tensor([prompt_ids("img", 10, 11)])
    cache = DynamicCache(config=model.config.text_config)
    tiny_llava[0].float()(input_ids=ids, pixel_values=images(1), use_cache=True, **{CACHE_ARG: cache})
    with pytest.raises(ValueError, match="the cache already holds 7 tokens but not the language expert's weights"):
        model(input_ids=torch.tensor([[12]]), **{CACHE_ARG: cache})
    one_token = DynamicCache(config=model.config.text_config)
    tiny_llava[0](input_ids=torch.tensor([[1]]), use_cache=True, **{CACHE_ARG: one_token})
    with pytest.raises(ValueError, match="the cache already holds 1 tokens but not the language expert's weights"):
        model(input_ids=torch.tensor([[12]]), **{CACHE_ARG: one_token})
    # A cache that carries weights but was emptied (`reset()`, as a server reuses a static cache) starts a new
    # sequence: its prefill generates new weights.
    other = torch.tensor([prompt_ids(13, 14, 15)])
    filled = StaticCache(model.config.text_config, 16)
    model(input_ids=ids, pixel_values=images(1), use_cache=True, **{CACHE_ARG: filled})
    filled.reset()
    restarted = model(input_ids=other, use_cache=True, **{CACHE_ARG: filled})
    torch.testing.assert_close(restarted.logits, model(input_ids=other).logits, atol=1e-5, rtol=1e-5)


def test_a_4d_attention_mask_needs_a_guidance_mask():
    model = make_model()
    ids = torch.tensor([prompt_ids(10, 11, 12)])
    mask = torch.ones(1, 1, ids.shape[1], ids.shape[1], dtype=torch.bool).tril()
    with pytest.raises(ValueError, match="a 4-D attention_mask does not say which tokens are the prompt"):
        model(input_ids=ids, attention_mask=mask)
    labels = torch.full_like(ids, -100)
    labels[:, -1] = ids[:, -1]
    with pytest.raises(ValueError, match="a 4-D attention_mask does not say which tokens are padding"):
        model(input_ids=ids, attention_mask=mask, labels=labels)
    guided = model(input_ids=ids, attention_mask=mask, language_guidance_mask=torch.ones_like(ids))
    torch.testing.assert_close(guided.logits, model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["static", "latent"])
def test_modes_whose_weights_ignore_the_input_need_no_prompt(mode):
    """Their weights do not depend on the input: a 4-D mask with labels, and a cache that holds tokens but not the
    weights (as another model or PEFT's prefix tuning leaves it), which "dynamic" mode refuses, are fine there."""
    from transformers import DynamicCache

    model = make_model(expert_mode=mode)
    ids = torch.tensor([prompt_ids(10, 11, 12)])
    mask = torch.ones(1, 1, ids.shape[1], ids.shape[1], dtype=torch.bool).tril()
    labels = ids.clone()
    expected = model(input_ids=ids, labels=labels)
    with_4d = model(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(with_4d.logits, expected.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(with_4d.loss, expected.loss, atol=1e-5, rtol=1e-5)
    cache = DynamicCache(config=model.config.text_config)
    model(input_ids=ids[:, :-1], use_cache=True, **{CACHE_ARG: cache})
    delattr(cache, CACHED_WEIGHTS)
    step = model(input_ids=ids[:, -1:], **{CACHE_ARG: cache})
    torch.testing.assert_close(step.logits[:, -1], expected.logits[:, -1], atol=1e-5, rtol=1e-5)


def test_a_guidance_mask_that_does_not_cover_the_input_is_refused():
    """Say, one made for the prompt and used with prompt + answer: pooled as given it would not name the prompt."""
    model = make_model()
    ids = torch.tensor([prompt_ids(10, 11, 12, 13, 14)])
    for length in (ids.shape[1] - 2, ids.shape[1] + 1):
        guidance = torch.ones(1, length, dtype=torch.bool)
        with pytest.raises(ValueError, match=rf"language_guidance_mask covers {length} positions but the input has 6"):
            model(input_ids=ids, language_guidance_mask=guidance)
