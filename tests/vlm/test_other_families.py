"""SmolVLM (Idefics3), LLaVA-OneVision and Gemma3 adapters on their tiny offline builds.

Invariances checked per family: a left-padded MIXED batch (text-only, one image, two images)
scores a completion exactly as each sample alone; encoding each distinct image once gives the
plain forward; greedy generation on the padded batch equals generating each prompt alone.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vlm_treegrpo.vlm.batching import flat_image_keys
from vlm_treegrpo.vlm.registry import get_adapter

FAMILIES = ("smolvlm", "llava-onevision", "gemma3")

# What each family's chat template must render for a user turn with 2 images.
TEMPLATE = {
    "smolvlm": dict(image="<image>", start="<|im_start|>User:<image><image>", end="<end_of_utterance>\nAssistant:"),
    "llava-onevision": dict(image="<image>\n", start="<|im_start|>user\n<image>\n<image>\n", end="<|im_end|>\n<|im_start|>assistant\n"),
    "gemma3": dict(image="<start_of_image>", start="<bos><start_of_turn>user\n<start_of_image>", end="<end_of_turn>\n<start_of_turn>model\n"),
}
# The token the processor repeats for each image feature.
IMAGE_TOKEN = {"smolvlm": "<image>", "llava-onevision": "<image>", "gemma3": "<image_soft_token>"}

# Image tokens of the 2-image prompt (20 x 28 and 24 x 24 px): SmolVLM 2 x (2 x 2 tiles + global)
# x 4; LLaVA-OV 2 x (16 base + newline), untiled in a multi-image prompt; Gemma3 2 x 4 soft tokens.
TWO_IMAGE_TOKENS = {"smolvlm": 40, "llava-onevision": 34, "gemma3": 8}


def _image(h: int, w: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


IMG_A, IMG_B, IMG_C, IMG_D = _image(40, 30, 0), _image(20, 28, 1), _image(24, 24, 2), _image(40, 30, 3)


@pytest.fixture(scope="module", params=FAMILIES)
def fam(request):
    adapter = get_adapter(request.param)
    model, processor = adapter.build_tiny(seed=0)
    tok = processor.tokenizer
    samples = [
        adapter.encode(processor, "What is 3 + 4?", []),
        adapter.encode(processor, "What color is the box?", [IMG_A]),
        adapter.encode(processor, "Compare the two pictures and count the boxes in them.", [IMG_B, IMG_C]),
    ]
    completion = torch.tensor(tok.encode(" The answer is 7.", add_special_tokens=False) + [tok.eos_token_id])
    return request.param, adapter, model, processor, samples, completion


def _completion_logp(adapter, model, samples, completion, pad_id, **kw) -> torch.Tensor:
    """Log-prob of each completion token after each prompt: ``[B, C]``."""
    B, C = len(samples), len(completion)
    batch = adapter.append_completion(
        adapter.collate(samples, pad_id), completion.expand(B, C), torch.ones(B, C, dtype=torch.long)
    )
    with torch.no_grad():
        logits = adapter.forward_logits(model, batch, image_keys=flat_image_keys(samples), **kw)  # [B, T+C, V]
    logp = logits[:, -C - 1 : -1].float().log_softmax(-1)  # [B, C, V] predictors of the completion
    return logp.gather(-1, completion.expand(B, C)[..., None])[..., 0]  # [B, C]


def _vision_batch_sizes(adapter, model, fn) -> list[int]:
    """Run ``fn`` and return the batch size of every vision-tower call it made."""
    sizes: list[int] = []

    def hook(module, args, kwargs, output):
        pixels = args[0] if args else kwargs["pixel_values"]
        sizes.append(pixels.shape[0])

    handle = adapter.vision_tower(model).register_forward_hook(hook, with_kwargs=True)
    try:
        fn()
    finally:
        handle.remove()
    return sizes


def test_tiny_build_is_offline_deterministic_and_consistent(fam):
    name, adapter, model, processor, samples, _ = fam
    tok = processor.tokenizer
    again, _ = adapter.build_tiny(seed=0)
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    cfg = model.config
    assert cfg.get_text_config().vocab_size == len(tok)
    assert cfg.image_token_id == tok.convert_tokens_to_ids(IMAGE_TOKEN[name])
    assert cfg.get_text_config().eos_token_id == tok.eos_token_id
    assert all(p.dtype == torch.float32 for p in model.parameters()) and not model.training
    assert adapter.presets and all(p.hub_id and p.dtype == "bfloat16" for p in adapter.presets)
    assert samples[0].n_images == 0 and samples[0].image_inputs == {} and samples[2].n_images == 2
    assert len(samples[2].image_keys) == 2 and samples[1].image_keys[0] != samples[2].image_keys[0]


def test_chat_template_renders_image_placeholders(fam):
    name, adapter, model, processor, samples, _ = fam
    expected = TEMPLATE[name]
    prompt = processor.apply_chat_template(adapter.messages("Count the boxes.", 2), tokenize=False, add_generation_prompt=True)
    assert prompt.count(expected["image"]) == 2
    assert prompt.startswith(expected["start"]) and prompt.endswith(expected["end"])
    # The processor expanded the placeholders into image tokens, one run per image (or tile).
    image_id = model.config.image_token_id
    assert int((samples[0].input_ids == image_id).sum()) == 0
    assert int((samples[1].input_ids == image_id).sum()) > 0
    assert int((samples[2].input_ids == image_id).sum()) == TWO_IMAGE_TOKENS[name]
    assert processor.tokenizer.decode(samples[2].input_ids).endswith(expected["end"])


def test_mixed_padded_batch_scores_like_each_sample_alone(fam):
    name, adapter, model, processor, samples, completion = fam
    pad = processor.tokenizer.pad_token_id
    assert len({len(s.input_ids) for s in samples}) == 3  # really padded
    batched = _completion_logp(adapter, model, samples, completion, pad, dedupe_images=False)  # [3, C]
    alone = torch.cat([_completion_logp(adapter, model, [s], completion, pad, dedupe_images=False) for s in samples])
    torch.testing.assert_close(batched, alone, rtol=0, atol=1e-4)
    # Sanity: the images reach the LLM (another picture changes the scores).
    other = adapter.encode(processor, "What color is the box?", [IMG_D])
    assert not torch.allclose(_completion_logp(adapter, model, [other], completion, pad), alone[1:2], atol=1e-4)


def test_dedupe_equals_plain_forward_and_encodes_each_image_once(fam):
    name, adapter, model, processor, samples, completion = fam
    pad = processor.tokenizer.pad_token_id
    text, one, two = samples
    rows = [one, one, text, one, two, one]  # 4 leaves share one prompt's image
    plain = lambda: _completion_logp(adapter, model, rows, completion, pad, dedupe_images=False)  # noqa: E731
    dedup = lambda: _completion_logp(adapter, model, rows, completion, pad, dedupe_images=True)  # noqa: E731
    torch.testing.assert_close(dedup(), plain(), rtol=0, atol=1e-5)

    per_one = _vision_batch_sizes(adapter, model, lambda: _completion_logp(adapter, model, [one], completion, pad))
    per_two = _vision_batch_sizes(adapter, model, lambda: _completion_logp(adapter, model, [two], completion, pad))
    assert len(per_one) == len(per_two) == 1
    assert _vision_batch_sizes(adapter, model, plain) == [4 * per_one[0] + per_two[0]]
    assert _vision_batch_sizes(adapter, model, dedup) == [per_one[0] + per_two[0]]  # one call, each image once

    # Identity from pixels when no keys are given; an image shared by a lone-image prompt and a
    # multi-image prompt (encoded differently by LLaVA-OV) still matches the plain forward.
    shared = adapter.encode(processor, "Which picture is brighter?", [IMG_C, IMG_A])
    rows = [one, shared, one, text, shared]
    B, C = len(rows), len(completion)
    batch = adapter.append_completion(adapter.collate(rows, pad), completion.expand(B, C), torch.ones(B, C, dtype=torch.long))
    with torch.no_grad():
        ref = adapter.forward_logits(model, batch, dedupe_images=False)
        for keys in (None, flat_image_keys(rows)):
            torch.testing.assert_close(adapter.forward_logits(model, batch, image_keys=keys), ref, rtol=0, atol=1e-5)


def test_greedy_generate_on_padded_mixed_batch_matches_alone(fam):
    name, adapter, model, processor, samples, _ = fam
    pad = processor.tokenizer.pad_token_id
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=pad)
    batch = adapter.collate(samples, pad)
    T = batch["input_ids"].shape[1]
    with torch.no_grad():
        together = model.generate(**batch, **kw)[:, T:]  # [3, <=4]
        for row, s in enumerate(samples):
            single = adapter.collate([s], pad)
            alone = model.generate(**single, **kw)[0, single["input_ids"].shape[1] :]
            assert together[row, : len(alone)].tolist() == alone.tolist(), (name, row)
