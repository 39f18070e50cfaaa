"""``smolvlm-smollm2``: the SmolVLM architecture on the real SmolLM2-135M-Instruct, built offline.

The published SmolVLM-256M is SmolLM2-135M behind a SigLIP image encoder and a pixel-shuffle
connector (the Idefics3 classes of transformers). This builds the same architecture with the
pieces this machine has:

* **language model** (pretrained): SmolLM2-135M-Instruct, from the offline copy that
  :mod:`vlm_treegrpo.models.smollm2` prepares, its token embeddings extended by the four
  Idefics3 image tokens (new rows = the mean embedding; ``<image>`` rows are replaced by image
  features anyway), its own ChatML chat template (``<image>`` where the image goes);
* **image encoder and connector** (trained here): a small random-init SigLIP tower
  (:data:`VISION`, 64 x 64 images, 8-pixel patches) and the Idefics3 connector (2 x 2 pixel
  shuffle, then one linear map to the language model's width): 16 image tokens per image;
* **alignment** (:func:`vlm_treegrpo.train.align.align`): with the language model frozen, the
  encoder and connector learn to make it describe synthetic images (digits on cards, counts of
  shapes, bar heights; :func:`vlm_treegrpo.data.visual_math.description_examples`).

:func:`vlm_treegrpo.train.align.prepare` aligns once and caches the model and processor in
:func:`model_dir` (about 0.5 GB); later loads are an ordinary ``from_pretrained`` that takes
seconds.
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessor,
    Idefics3Processor,
)
from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig

from vlm_treegrpo.models import smollm2
from vlm_treegrpo.vlm.registry import ALIGNED_NAME

NAME = ALIGNED_NAME
IMAGE_SIZE = 64
PATCH = 8
SCALE = 2
IMAGE_SEQ_LEN = (IMAGE_SIZE // PATCH) ** 2 // SCALE**2
"""Image tokens per image (16)."""
VISION = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
              image_size=IMAGE_SIZE, patch_size=PATCH)
"""The SigLIP tower trained here (SmolVLM-256M's is 768 wide, 12 layers, 512 px images)."""
IMAGE_TOKENS = ("<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>")

# SmolLM2's ChatML, without its default system prompt, with list contents and <image> markers.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>' }}"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}{{'<|im_end|>\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def model_dir() -> Path:
    return smollm2.cache_root() / "models" / NAME


def is_prepared() -> bool:
    out = model_dir()
    return (out / "model.safetensors").exists() and (out / "processor_config.json").exists()


def build_processor(tokenizer) -> Idefics3Processor:
    """The Idefics3 processor over ``tokenizer`` (image tokens added, left padding): one 64 x 64
    view per image, no tiling, :data:`IMAGE_SEQ_LEN` image tokens."""
    tokenizer.add_special_tokens({"additional_special_tokens": list(IMAGE_TOKENS)})
    tokenizer.padding_side = "left"
    image_processor = Idefics3ImageProcessor(
        size={"longest_edge": IMAGE_SIZE}, max_image_size={"longest_edge": IMAGE_SIZE}, do_image_splitting=False
    )
    return Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=IMAGE_SEQ_LEN,
                             chat_template=CHAT_TEMPLATE)


def assemble(lm, tokenizer, vision: dict = VISION, seed: int = 0) -> tuple[Idefics3ForConditionalGeneration, Idefics3Processor]:
    """``(model, processor)``: the causal LM ``lm`` (a Llama) inside an Idefics3 model behind a
    seeded random-init SigLIP tower ``vision`` and connector; fp32, eval mode. The tests pass a
    tiny Llama here; :func:`build` the real SmolLM2."""
    processor = build_processor(tokenizer)
    text = lm.config
    text.vocab_size = len(tokenizer)
    config = Idefics3Config(
        text_config=text.to_dict(),
        vision_config=Idefics3VisionConfig(**vision).to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        scale_factor=SCALE,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Idefics3ForConditionalGeneration(config)
    state = {k.removeprefix("model."): v for k, v in lm.state_dict().items() if k.startswith("model.")}
    emb = state["embed_tokens.weight"]  # [V_lm, D]
    extra = len(tokenizer) - emb.shape[0]
    state["embed_tokens.weight"] = torch.cat([emb, emb.mean(0, keepdim=True).expand(extra, -1)])  # [V, D]
    model.model.text_model.load_state_dict(state)
    model.tie_weights()
    model = model.to(torch.float32).eval()
    model.generation_config = GenerationConfig(
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id
    )
    return model, processor


def build(seed: int = 0) -> tuple[Idefics3ForConditionalGeneration, Idefics3Processor]:
    """The unaligned model: the real SmolLM2-135M-Instruct (prepared offline) behind a random tower."""
    path = smollm2.prepare()
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return assemble(lm, AutoTokenizer.from_pretrained(path), seed=seed)
