"""Build a random-init Qwen2-VL whose language model has SmolLM2-135M's shape, for benchmarks.

``tiny-qwen2-vl`` (0.18M parameters) makes every forward pure per-call overhead, so it cannot show
what costs compute. This model keeps the tiny build's offline tokenizer, real Qwen2-VL processor
and chat template, and gives the language model SmolLM2-135M's width and depth (576 wide, 30
layers, 9 query / 3 key-value heads, MLP 1536; mRoPE sections [8, 12, 12] for head_dim 64) and
a 4-layer vision tower. Random weights: a throughput model, not a capable one.

    .venv/bin/python scripts/build_small_vlm.py runs/small-qwen2-vl
    .venv/bin/vlm-treegrpo bench --workload vlm --model runs/small-qwen2-vl \\
        --reward vlm_treegrpo.bench.spec:length_signal_reward --lr 1e-12 --steps 2
"""
from __future__ import annotations

import argparse
import sys

import torch

TEXT = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
            rope_parameters={"rope_type": "default", "rope_theta": 100000.0, "mrope_section": [8, 12, 12]})
VISION = dict(depth=4, embed_dim=128, num_heads=4, hidden_size=576)


def build(out: str, seed: int = 0) -> int:
    from vlm_treegrpo.vlm.registry import get_adapter

    adapter = get_adapter("qwen2-vl")
    tiny_text, tiny_vision = adapter._tiny_text_config(), adapter._tiny_vision_config()
    adapter._tiny_text_config = lambda: {**tiny_text, **TEXT}  # the tiny build's sub-configs, resized
    adapter._tiny_vision_config = lambda: {**tiny_vision, **VISION}
    tokenizer = adapter.tiny_tokenizer()
    processor = adapter.tiny_processor(tokenizer)
    config = adapter.tiny_config(tokenizer)
    torch.manual_seed(seed)
    model = adapter.model_cls(config).to(torch.float32).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out)
    processor.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {out}: {n / 1e6:.1f}M parameters")
    return n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="output directory")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    build(args.out, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
