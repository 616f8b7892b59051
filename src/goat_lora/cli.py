"""The `goat` command line (train, eval, compare, bench, inspect): coming with the command-line issue."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="goat",
        description="GOAT (ICML 2025) LoRA mixture-of-experts fine-tuning. Subcommands are coming: "
        "train, eval, compare, bench, inspect.",
    )
    parser.add_argument("--version", action="store_true", help="print the goat-lora version")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.version:
        from . import __version__

        print(__version__)
        return 0
    build_parser().print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
