"""What differs between VLM families, behind one small interface.

The rollout and the trainer call only these methods; they never test ``model_type``. One
subclass per family lives in :mod:`vlm_treegrpo.vlm.families`, registered in
:data:`vlm_treegrpo.vlm.registry.ADAPTERS` by family name.

Per-sample tensors: :meth:`VLMAdapter.encode` runs the processor ONCE per prompt and returns
an unpadded :class:`Encoded` whose image tensors belong to that prompt only, so that K x M
branches, shuffles and micro-batches are built by repeating / selecting samples, never by
re-running the processor. :meth:`VLMAdapter.collate` left-pads a list of them into a batch.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from transformers import GenerationConfig

from vlm_treegrpo.models.shapes import Shape, truncate_config, widen_vocab
from vlm_treegrpo.rollout.kv_cache import RowState


@dataclass(frozen=True)
class Preset:
    """A real-size checkpoint users train."""

    name: str
    """Short preset name, e.g. 'qwen2.5-vl-3b'."""
    hub_id: str
    """Hugging Face hub id."""
    params: str
    """Parameter count, e.g. '3B'."""
    dtype: str = "bfloat16"
    """Recommended dtype."""
    attn_implementation: str = "flash_attention_2"
    """Recommended attention kernel on GPU."""
    notes: str = ""
    """Memory / usage notes."""


@dataclass
class Encoded:
    """One prompt after the processor: unpadded ids plus its own image tensors."""

    input_ids: Tensor  # [T] long
    image_inputs: dict[str, Tensor] = field(default_factory=dict)
    """Family-specific image tensors of THIS sample only (pixel_values, image_grid_thw, ...)."""
    n_images: int = 0
    """Images in this prompt (0 for text-only)."""
    image_keys: tuple = ()
    """Identity of each image (e.g. a hash of its pixels) so a batch can encode each once."""
    token_inputs: dict[str, Tensor] = field(default_factory=dict)
    """Per-token extras of THIS sample, each ``[T]`` like ``input_ids`` (e.g. ``mm_token_type_ids``,
    ``token_type_ids``); ``collate`` left-pads them with 0 (= text)."""


class VLMAdapter(ABC):
    """Family-specific glue. Subclasses are small: processor call, image bookkeeping, positions."""

    family: str = ""
    """Family name, e.g. 'qwen2-vl'."""
    presets: tuple[Preset, ...] = ()
    """Real-size checkpoints of this family."""
    token_keys: tuple[str, ...] = ("token_type_ids", "mm_token_type_ids")
    """Batch keys that are per-token ``[B, T]`` besides input_ids/attention_mask; completion
    tokens get 0 (= text) in them (see :meth:`append_completion`)."""
    flash_attention: bool = True
    tree_packing: bool = True
    """True where the training forward may pack a whole tree in one row under a custom 4-D tree
    mask (:mod:`vlm_treegrpo.vlm.tree_batch`); False where the forward builds its own non-causal
    mask (Gemma3's bidirectional image blocks): those train one row per leaf."""
    """False where flash-attention gives a different model (Gemma3: it drops the bidirectional
    mask over image tokens); ``attn_implementation: auto`` then picks sdpa."""

    @abstractmethod
    def build_tiny(self, seed: int = 0) -> tuple[Any, Any]:
        """A random-init tiny model of this family and its real processor class, built offline."""

    # Random weights at a released shape (``random:<preset>``, :mod:`vlm_treegrpo.models.shapes`).

    config_cls: type
    """The family's top-level transformers config class."""
    model_cls: type
    """The ``*ForConditionalGeneration`` class the random builds instantiate."""
    token_fields: dict[str, str] = {}
    """Config keys holding a special token's id -> that token: a random build takes the ids from
    its stand-in tokenizer, not from the released vocabulary."""

    def standin_tokenizer(self):
        """The family's offline tokenizer (special tokens, chat template), before widening."""
        raise NotImplementedError(f"{self.family}: no random build")

    def random_processor(self, tokenizer, spec: dict):
        """The family's real processor class over ``tokenizer`` with the released image limits
        ``spec`` (``{"image_processor": {...}, "processor": {...}}`` from the shape file)."""
        raise NotImplementedError(f"{self.family}: no random build")

    def stop_ids(self, tokenizer) -> list[int]:
        """Token ids that end a generation (the chat template's end of turn)."""
        return [tokenizer.eos_token_id]

    def post_init_random(self, model) -> None:
        """Re-initialise weights the family's ``_init_weights`` zeroes (random models only)."""

    def random_config(self, shape: Shape, layers: int | None = None, tokenizer=None):
        """The config object of ``shape`` truncated to ``layers`` blocks; with ``tokenizer`` the
        special-token ids (:attr:`token_fields`, the text model's pad/bos/eos) are its ids."""
        config = truncate_config(shape.config, layers)
        if tokenizer is not None:
            config.update({key: tokenizer.convert_tokens_to_ids(token) for key, token in self.token_fields.items()})
            config["text_config"].update(
                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id
            )
        return self.config_cls(**config)

    def build_random(self, shape: Shape, layers: int | None = None, seed: int = 0) -> tuple[Any, Any]:
        """``(model, processor)`` at ``shape``'s released architecture (depth cut to ``layers``):
        seeded random fp32 weights on the CPU in eval mode, the stand-in tokenizer of the real
        vocabulary size and the family's processor with the real image limits. Offline."""
        tokenizer = widen_vocab(self.standin_tokenizer(), shape.vocab_size)
        processor = self.random_processor(tokenizer, shape.processor)
        config = self.random_config(shape, layers, tokenizer)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = self.model_cls(config)
            self.post_init_random(model)
        model = model.to(torch.float32)
        stop = self.stop_ids(tokenizer)
        model.generation_config = GenerationConfig(
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=stop if len(stop) > 1 else stop[0]
        )
        model.eval()
        return model, processor

    def load(self, name_or_path: str, dtype: torch.dtype, attn_implementation: str, device: str) -> tuple[Any, Any]:
        """A real checkpoint from the hub or a local directory (needs network for hub ids)."""
        from transformers import AutoModelForImageTextToText, AutoProcessor

        model = AutoModelForImageTextToText.from_pretrained(name_or_path, dtype=dtype, attn_implementation=attn_implementation)
        processor = AutoProcessor.from_pretrained(name_or_path)
        processor.tokenizer.padding_side = "left"
        return model.to(device), processor

    @abstractmethod
    def encode(self, processor, text: str, images: list, system: str = "") -> Encoded:
        """Chat-format one user turn (text plus images; after a ``system`` turn when one is given)
        with the family's template and process it."""

    @abstractmethod
    def collate(self, samples: list[Encoded], pad_id: int) -> dict[str, Tensor]:
        """Left-pad samples into model kwargs (input_ids, attention_mask, image tensors, and
        position_ids where the family needs them, e.g. Qwen's 3-D mRoPE)."""

    @abstractmethod
    def vision_tower(self, model) -> torch.nn.Module:
        """The module that encodes pixels (used to count/cached image encodings)."""

    # Optional methods: generic defaults that families override where they need to.

    def limit_pixels(self, processor, min_pixels: int, max_pixels: int) -> None:
        """Have ``processor`` resize every image to at least ``min_pixels`` and at most
        ``max_pixels`` pixels (0 keeps the processor's own bound). Families whose processor
        resizes to its own fixed grid or tiles have no such bounds: ValueError by default."""
        raise ValueError(f"the {self.family} processor resizes images to its own fixed size and takes no pixel bounds "
                         "(the Qwen-VL families do)")

    def placeholder_token_ids(self, model) -> list[int]:
        """Ids of the tokens that stand for image/video features in ``input_ids`` (read from the
        model config). Generation must never emit them: a sampled placeholder has no features
        behind it and breaks every later forward on that completion."""
        config = model.config
        keys = ("image_token_id", "image_token_index", "video_token_id", "video_token_index")
        return sorted({i for i in (getattr(config, k, None) for k in keys) if isinstance(i, int)})

    def append_completion(self, batch: dict[str, Tensor], completion_ids: Tensor, completion_mask: Tensor) -> dict[str, Tensor]:
        """Model kwargs for prompt + completion: the left-padded prompt batch followed by
        ``completion_ids [B, C]`` (right-padded, ``completion_mask [B, C]``). Per-token keys
        (:attr:`token_keys`) get 0 on completion tokens; image tensors are unchanged."""
        out = dict(batch)
        out["input_ids"] = torch.cat([batch["input_ids"], completion_ids.to(batch["input_ids"])], dim=1)  # [B, T+C]
        mask = batch["attention_mask"]
        out["attention_mask"] = torch.cat([mask, completion_mask.to(mask)], dim=1)  # [B, T+C]
        for key in self.token_keys:
            if key in batch:
                out[key] = torch.cat([batch[key], torch.zeros_like(completion_ids, dtype=batch[key].dtype)], dim=1)
        return out

    def position_ids(self, model, batch: dict[str, Tensor]) -> Tensor | None:
        """Position ids for ``batch`` as the model's forward expects them, consistent with what
        ``model.generate`` uses under left padding; None lets the model derive them itself."""
        return None

    def row_state(self, model) -> RowState:
        """The per-row state ``model`` keeps between ``generate`` calls besides its KV cache,
        as a :class:`~vlm_treegrpo.rollout.kv_cache.RowState` that the sampler repeats, drops
        and resumes with the rows. None by default (the base class does nothing)."""
        return RowState()

    def encoder_outputs(self, model, batch: dict[str, Tensor], image_keys) -> dict | None:
        """``mm_encoder_outputs`` for ``batch`` with each distinct image encoded once (identity
        from ``image_keys``, one key per image in batch order, else from equal pixels); None when
        no image repeats or the family cannot precompute them."""
        return None

    def unique_image_inputs(self, model, batch: dict[str, Tensor], image_keys=None) -> dict:
        """``batch`` with ``pixel_values`` replaced by :meth:`encoder_outputs` (the transformers
        ``mm_encoder_outputs`` hook that both ``forward`` and ``generate`` accept), so the
        vision tower sees each distinct image once; ``batch`` itself when nothing repeats."""
        if "pixel_values" not in batch:
            return batch
        encoded = self.encoder_outputs(model, batch, image_keys)
        if encoded is None:
            return batch
        out = {k: v for k, v in batch.items() if k != "pixel_values"}
        out["mm_encoder_outputs"] = encoded
        return out

    def forward_logits(
        self, model, batch: dict[str, Tensor], image_keys=None, dedupe_images: bool = True, **model_kwargs
    ) -> Tensor:
        """Logits ``[B, T, V]`` of the training forward on ``batch`` (e.g. from
        :meth:`append_completion`), with :meth:`position_ids` unless given. With
        ``dedupe_images`` each distinct image goes through the vision tower once
        (:meth:`unique_image_inputs`); the result equals the plain forward."""
        kwargs = dict(batch)
        if "position_ids" not in kwargs and (pos := self.position_ids(model, batch)) is not None:
            kwargs["position_ids"] = pos
        if dedupe_images:
            kwargs = self.unique_image_inputs(model, kwargs, image_keys)
        model_kwargs.setdefault("use_cache", False)
        return model(**kwargs, **model_kwargs).logits
