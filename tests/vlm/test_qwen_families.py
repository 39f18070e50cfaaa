"""Qwen2-VL / Qwen2.5-VL / Qwen3-VL adapters (vlm_treegrpo.vlm.families.qwen*): tiny offline
builds, chat template placeholders, left-padded mixed batches equal single samples (log-probs,
mRoPE positions, greedy generation), and the image-dedupe forward."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vlm_treegrpo.vlm.batching import flat_image_keys, left_pad_ids
from vlm_treegrpo.vlm.registry import get_adapter

FAMILIES = ("qwen2-vl", "qwen2.5-vl", "qwen3-vl")


def _image(seed: int, h: int, w: int) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8"))


IMG_A, IMG_B, IMG_C = _image(0, 64, 64), _image(1, 40, 80), _image(2, 56, 48)

_BUILT: dict = {}


@pytest.fixture(params=FAMILIES)
def built(request):
    """(adapter, model, processor, [text-only, one image, two images] samples), once per family."""
    if request.param not in _BUILT:
        adapter = get_adapter(request.param)
        model, processor = adapter.build_tiny(seed=0)
        samples = [
            adapter.encode(processor, "Add 3 and 4.", []),
            adapter.encode(processor, "What color is the box?", [IMG_A]),
            adapter.encode(processor, "Which picture shows more?", [IMG_B, IMG_C]),
        ]
        _BUILT[request.param] = (adapter, model, processor, samples)
    return _BUILT[request.param]


def _completions(processor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded completions of different lengths: ``ids [n, C]``, ``mask [n, C]``."""
    tok = processor.tokenizer
    full = torch.tensor(tok.encode("The answer is 7.\nAnswer: 7", add_special_tokens=False) + [tok.eos_token_id])
    ids = torch.full((n, len(full)), tok.pad_token_id)
    mask = torch.zeros((n, len(full)), dtype=torch.long)
    for row in range(n):
        length = len(full) - 2 * (row % 3)
        ids[row, :length], mask[row, :length] = full[:length], 1
    return ids, mask


def _completion_logp(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Log-prob of each completion token ``[B, C]`` from full-sequence logits ``[B, T+C, V]``."""
    C = ids.shape[1]
    logp = torch.log_softmax(logits[:, -C - 1 : -1].float(), dim=-1)  # [B, C, V]
    return logp.gather(-1, ids[..., None]).squeeze(-1)  # [B, C]


def test_tiny_builds_offline_and_deterministic(built, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    adapter, model, processor, _ = built
    again, processor2 = adapter.build_tiny(seed=0)
    other, _ = adapter.build_tiny(seed=1)
    for (name, p), q, r in zip(model.state_dict().items(), again.state_dict().values(), other.state_dict().values()):
        assert torch.equal(p, q), name
    assert any(not torch.equal(p, r) for p, r in zip(model.parameters(), other.parameters()))
    tok = processor.tokenizer
    assert model.config.text_config.vocab_size == len(tok)
    assert model.config.image_token_id == processor.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert model.config.video_token_id == tok.convert_tokens_to_ids("<|video_pad|>")
    assert model.config.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert type(processor).__name__.startswith("Qwen") and type(model).__name__.startswith("Qwen")
    assert sum(p.numel() for p in model.parameters()) < 1_000_000


def test_presets_are_real_checkpoints(built) -> None:
    adapter = built[0]
    assert adapter.presets and get_adapter(adapter.family).family == adapter.family
    for preset in adapter.presets:
        assert preset.hub_id.startswith("Qwen/") and preset.hub_id.endswith("-Instruct")
        assert preset.dtype == "bfloat16" and preset.attn_implementation == "flash_attention_2"
        assert "GB" in preset.notes


def test_chat_template_renders_image_placeholders(built) -> None:
    adapter, model, processor, samples = built
    messages = adapter.messages("Describe.", 2)
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.count("<|vision_start|><|image_pad|><|vision_end|>") == 2
    assert text.startswith("<|im_start|>") and text.endswith("<|im_start|>assistant\n")
    assert ("You are a helpful assistant." in text) == (adapter.family != "qwen3-vl")
    # The processor expands each placeholder to t*h*w / merge**2 tokens.
    enc = samples[2]
    merge = processor.image_processor.merge_size
    expected = int(enc.image_inputs["image_grid_thw"].prod(-1).sum()) // merge**2
    assert int((enc.input_ids == model.config.image_token_id).sum()) == expected
    assert torch.equal(enc.token_inputs["mm_token_type_ids"], (enc.input_ids == model.config.image_token_id).long())
    assert enc.n_images == 2 and len(set(enc.image_keys)) == 2
    assert samples[0].n_images == 0 and samples[0].image_inputs == {}


def test_collate_left_pads_and_concatenates_images(built) -> None:
    adapter, _, processor, samples = built
    batch = adapter.collate(samples, processor.tokenizer.pad_token_id)
    ids, mask = left_pad_ids([s.input_ids for s in samples], processor.tokenizer.pad_token_id)
    assert torch.equal(batch["input_ids"], ids) and torch.equal(batch["attention_mask"], mask)
    assert batch["image_grid_thw"].shape == (3, 3)
    assert torch.equal(batch["pixel_values"], torch.cat([samples[1].image_inputs["pixel_values"], samples[2].image_inputs["pixel_values"]]))
    assert set(adapter.collate(samples[:1], 0)) == {"input_ids", "attention_mask", "mm_token_type_ids"}


def test_mixed_padded_batch_equals_single_samples(built) -> None:
    adapter, model, processor, samples = built
    pad = processor.tokenizer.pad_token_id
    comp, comp_mask = _completions(processor, len(samples))
    batch = adapter.append_completion(adapter.collate(samples, pad), comp, comp_mask)
    with torch.no_grad():
        batched = _completion_logp(adapter.forward_logits(model, batch), comp)  # [3, C]
        plain = _completion_logp(model(**batch).logits, comp)  # the model's own positions
        positions = adapter.position_ids(model, batch)  # [3, B, T]
        for row, sample in enumerate(samples):
            alone_batch = adapter.append_completion(adapter.collate([sample], pad), comp[row : row + 1], comp_mask[row : row + 1])
            alone = _completion_logp(adapter.forward_logits(model, alone_batch), comp[row : row + 1])[0]
            keep = comp_mask[row].bool()
            # Padding noise is ~5e-7; wrong mRoPE positions shift these by >= 8e-4 on the tiny models.
            torch.testing.assert_close(batched[row][keep], alone[keep], atol=1e-5, rtol=0)
            torch.testing.assert_close(plain[row][keep], alone[keep], atol=1e-5, rtol=0)
            # mRoPE positions of the real tokens do not depend on the left padding.
            real = batch["attention_mask"][row].bool()
            alone_pos = adapter.position_ids(model, alone_batch)[:, 0]
            assert torch.equal(positions[:, row, real], alone_pos[:, alone_batch["attention_mask"][0].bool()])
    # Images do shift the positions: the completion starts past the image grid, not at T.
    assert int(positions[0, 2].max()) < batch["attention_mask"][2].sum() - 1


def test_dedupe_forward_equals_plain_and_encodes_each_image_once(built) -> None:
    adapter, model, processor, samples = built
    rows = [samples[1]] * 4 + [samples[2]] * 2  # 4 leaves of the one-image prompt, 2 of the two-image one
    comp, comp_mask = _completions(processor, len(rows))
    batch = adapter.append_completion(adapter.collate(rows, processor.tokenizer.pad_token_id), comp, comp_mask)
    seen: list[int] = []

    def count(module, args, kwargs, output):
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        seen.append(len(grid))

    handle = adapter.vision_tower(model).register_forward_hook(count, with_kwargs=True)
    try:
        plain = adapter.forward_logits(model, batch, dedupe_images=False)
        assert seen == [4 + 2 * 2]  # one call over all 8 image copies
        seen.clear()
        deduped = adapter.forward_logits(model, batch, image_keys=flat_image_keys(rows))
        assert seen == [3]  # one call, each of the 3 distinct images once
        seen.clear()
        by_content = adapter.forward_logits(model, batch)  # no keys: equal pixels are detected
        assert seen == [3]
    finally:
        handle.remove()
    torch.testing.assert_close(deduped, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(by_content, deduped, atol=0, rtol=0)
    # Gradients reach the vision tower the same way (summed over the copies).
    grads = []
    for dedupe in (False, True):
        model.zero_grad(set_to_none=True)
        logp = _completion_logp(adapter.forward_logits(model, batch, dedupe_images=dedupe), comp)
        (logp * comp_mask).sum().backward()
        grads.append([p.grad.clone() for p in adapter.vision_tower(model).parameters() if p.grad is not None])
    model.zero_grad(set_to_none=True)
    assert grads[0] and len(grads[0]) == len(grads[1])
    for g_plain, g_dedupe in zip(*grads):
        torch.testing.assert_close(g_dedupe, g_plain, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="image keys"):
        adapter.forward_logits(model, batch, image_keys=("a",))


def test_greedy_generate_on_left_padded_batch_matches_single(built) -> None:
    adapter, model, processor, samples = built
    pad = processor.tokenizer.pad_token_id
    kwargs = dict(max_new_tokens=4, do_sample=False)
    with torch.no_grad():
        batch = adapter.collate(samples, pad)
        out = model.generate(**batch, **kwargs)[:, batch["input_ids"].shape[1] :]  # [3, <=4]
        assert out.shape[1] >= 1
        for row, sample in enumerate(samples):
            alone_batch = adapter.collate([sample], pad)
            alone = model.generate(**alone_batch, **kwargs)[0, alone_batch["input_ids"].shape[1] :]
            assert torch.equal(out[row, : len(alone)], alone), (row, out[row], alone)
