"""`xfast` console script: dispatches to the subcommands' own argument parsers."""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": ("xfast.train", "train a CLIP/CLAP-style model (same as `python -m xfast.train`)"),
    "eval": ("xfast.eval.cli", "evaluate a checkpoint: zero-shot, retrieval, STS, geometry"),
    "shards": ("xfast.data.shards", "write WebDataset shards from a media folder, or --check them"),
    "study": ("xfast.study.cli", "train and compare the arms of a sentence-embedding study, one report"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = ["usage: xfast COMMAND [options]   (xfast COMMAND --help for its options)", "", "commands:"]
        lines += [f"  {name:<8} {text}" for name, (_, text) in COMMANDS.items()]
        print("\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nxfast: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
