"""Ablation for a proposed editor change: drop the black-image negative when it is not a negative.

BalancEdit's automatic negative is the fact's question on an all-black image. On the demo model
an all-black 64x64 image *is* a gray/black rectangle ("what shape is in the image?" -> rectangle,
"what color is the shape?" -> gray), so for rectangle and gray facts the black image lies inside
the fact's class and sets a tiny radius. The proposed rule: keep the black-image negative only if
the unedited model answers it differently from the fact's own input.

This script patches `Editor._negative_queries` (in this process only) and compares both rules:

    python bench/eval_ablation_black_negative.py --cases bench/dev/cases.jsonl [--model demo] \
        [--hparam alpha=0.4 ...] [--sequential]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from editor.backbones import load_backbone
from editor.editor import Editor
from editor.eval.hparams import parse_hparams
from editor.eval.runner import run_eval
from editor.fact import normalise_answer

_original = Editor._negative_queries


def _filtered(self, fact, query):  # type: ignore[no-untyped-def]
    negatives = _original(self, fact, query)
    if not (self.config.black_image_negative and query.image is not None and negatives):
        return negatives
    black = negatives[-1]  # `_negative_queries` appends the black image last
    own, on_black = (normalise_answer(a.text) for a in self._generate([query, black], "off"))
    return negatives if own != on_black else negatives[:-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=Path, required=True)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--hparam", action="append", default=[])
    parser.add_argument("--sequential", action="store_true")
    args = parser.parse_args(argv)
    backbone = load_backbone(args.model)
    hparams = parse_hparams(args.hparam)
    for name, rule in (
        ("always black negative (current)", _original),
        ("black negative only if answered differently", _filtered),
    ):
        Editor._negative_queries = rule  # type: ignore[method-assign]
        report = run_eval(args.cases, "balancedit", args.sequential, backbone, hparams=hparams)
        cells = " ".join(f"{k}={report['exact'][k]:.1f}" for k in ("acc", "t_gen", "i_gen", "loc", "hm"))
        print(f"{name}: exact {cells} | token hm={report['token']['hm']:.1f}", flush=True)
    Editor._negative_queries = _original  # type: ignore[method-assign]
    return 0


if __name__ == "__main__":
    sys.exit(main())
