"""Our trainer against TRL's GRPOTrainer on identical work; same as ``vlm-treegrpo bench``.

    python scripts/bench.py --quick            # tiny-llama smoke run
    python scripts/bench.py --workload text    # SmolLM2-135M-Instruct, arithmetic
    python scripts/bench.py --scaling          # our step time against K, M, tokens

The logic lives in :mod:`vlm_treegrpo.bench.run`.
"""
import sys

from vlm_treegrpo.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
