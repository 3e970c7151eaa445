"""`python -m editor.eval`: build the easy-VQA development file or operation stream, or convert MMEdit / OKEDIT records.

python -m editor.eval build-easyvqa --out bench/dev [--seed 0] [--pool-size 200]
python -m editor.eval build-stream --ops 1000 --seed 0 --out bench/stream [--checkpoints 10,100,300,1000]
python -m editor.eval convert-mmedit RECORDS.json --image-root COCO --out cases/evqa.jsonl
python -m editor.eval convert-okedit RECORDS.json --image-root DIR --out cases/okedit.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from editor.errors import EditorError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m editor.eval", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build-easyvqa", help="cases + reference pool from the easy-VQA TRAIN split")
    build.add_argument(
        "--out", type=Path, required=True, help="folder for cases.jsonl, reference_pool.jsonl, img/"
    )
    from editor.eval.easyvqa import BuildConfig

    for field in dataclasses.fields(BuildConfig):
        build.add_argument("--" + field.name.replace("_", "-"), type=int, default=field.default)
    stream = commands.add_parser(
        "build-stream",
        help="a stream of new / supersede / retract operations from the easy-VQA TRAIN split",
        description="Write stream.jsonl (operations in order, and at each checkpoint every probe with "
        "what it expects), reference_pool.jsonl, img/ and build.json (the realised mix) into --out. "
        "Live facts of one question type cover disjoint scopes (at most 34 at once: one shape and two "
        "colours are kept for the untouched probes), so once the space fills a drawn new fact becomes a "
        "retraction; build.json gives the realised mix (seed 0, 1,000 operations: 423 new, 249 supersede, "
        "328 retract). Score it with `kbctl eval-stream OUT/stream.jsonl`. See editor/eval/stream.py for "
        "the design.",
        epilog="Example: python -m editor.eval build-stream --ops 1000 --seed 0 --out bench/stream",
    )
    stream.add_argument("--out", type=Path, required=True, help="folder for stream.jsonl, reference_pool.jsonl, img/")
    stream.add_argument("--ops", type=int, default=1000, help="number of operations (default 1000)")
    stream.add_argument("--seed", type=int, default=0, help="everything is a function of it (default 0)")
    stream.add_argument(
        "--checkpoints",
        default="10,100,300,1000",
        help="comma-separated operation counts to score after; those above --ops are dropped and "
        "--ops itself is always one (default 10,100,300,1000)",
    )
    stream.add_argument(
        "--mix", default="0.75,0.15,0.10", help="weights of new, supersede, retract (default 0.75,0.15,0.10)"
    )
    stream.add_argument("--pool-size", type=int, default=200, help="reference-pool items (default 200)")
    for name in ("mmedit", "okedit"):
        convert = commands.add_parser(f"convert-{name}", help=f"{name} records -> the case format")
        convert.add_argument("records", type=Path)
        convert.add_argument(
            "--image-root", type=Path, required=True, help="folder the records' image paths start from"
        )
        convert.add_argument(
            "--rephrase-root", type=Path, help="folder of the rephrased images (default: image root)"
        )
        convert.add_argument("--out", type=Path, required=True)
        convert.add_argument(
            "--text-loc", action="store_true", help="keep text-only loc probes (text models)"
        )
    args = parser.parse_args(argv)
    try:
        if args.command == "build-easyvqa":
            from editor.eval.easyvqa import build_case_files

            config = BuildConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(BuildConfig)})
            summary = build_case_files(args.out, config)
            print(json.dumps({k: v for k, v in summary.items() if k != "facts"}, indent=2))
            return 0
        if args.command == "build-stream":
            from editor.eval.errors import EvalError
            from editor.eval.stream import StreamConfig, build_stream

            try:
                checkpoints = tuple(int(c) for c in args.checkpoints.split(",") if c.strip())
                mix = tuple(float(w) for w in args.mix.split(","))
            except ValueError as exc:
                raise EvalError(f"--checkpoints and --mix take comma-separated numbers: {exc}") from exc
            stream_config = StreamConfig(
                seed=args.seed,
                ops=args.ops,
                checkpoints=checkpoints,
                mix=mix,  # type: ignore[arg-type]
                pool_size=args.pool_size,
            )
            print(json.dumps(build_stream(args.out, stream_config), indent=2))
            return 0
        from editor.eval.cases import write_cases
        from editor.eval.readers import read_mmedit_evqa, read_okedit

        reader = read_mmedit_evqa if args.command == "convert-mmedit" else read_okedit
        cases = reader(
            args.records, args.image_root, rephrase_root=args.rephrase_root, text_loc=args.text_loc
        )
        write_cases(cases, args.out)
        print(f"{len(cases)} cases -> {args.out}")
        return 0
    except EditorError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
