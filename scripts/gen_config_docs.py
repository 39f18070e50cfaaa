"""Write docs/configuration.md from the config dataclasses' field docstrings.

    python scripts/gen_config_docs.py          # (re)write it
    python scripts/gen_config_docs.py --check  # exit 1 when it is stale

The text comes from :func:`vlm_treegrpo.config_fields.format_markdown`, which
``vlm-treegrpo config --show`` shares.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vlm_treegrpo.config_fields import format_markdown

DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the file differs from the dataclasses")
    parser.add_argument("--out", type=Path, default=DOC, help="where to write (default: docs/configuration.md)")
    args = parser.parse_args(argv)
    text = format_markdown()
    if args.check:
        if not args.out.is_file() or args.out.read_text() != text:
            print(f"{args.out} is stale: run python scripts/gen_config_docs.py", file=sys.stderr)
            return 1
        return 0
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
