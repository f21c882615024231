"""`twinquant-quantize`: a dense Hugging Face checkpoint -> a TwinQuant checkpoint.

    twinquant-quantize --model DENSE --output OUT --calib calib.jsonl --recipe twinquant-w4a16

A thin wrapper over `offline_quantizer.quantize()` (pipeline.py): the recipe (a preset name or a
YAML file, `--list-recipes`) says what is done, a few options override it. The checkpoint is
written only when the run finishes and passes the end-to-end check against the dense model;
an interrupted run resumes from its last finished block when started again the same way.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys

import yaml

from offline_quantizer import recipe as rcp

EXIT_ERROR, EXIT_REFUSED, EXIT_INTERRUPTED = 2, 3, 130


def _set(item: str) -> tuple[str, object]:
    key, sep, value = item.partition("=")
    if not sep or "." not in key:
        raise argparse.ArgumentTypeError(f"{item!r}: expected STAGE.KEY=VALUE, e.g. split.rank=8")
    return key, yaml.safe_load(value)


def build_recipe(args) -> rcp.Recipe:
    """The recipe named by --recipe with the command line's overrides applied."""
    recipe = rcp.load_recipe(args.recipe)
    over: dict = dict(args.set or [])
    if args.rank is not None:
        over["split.rank"] = args.rank
    if args.group_size is not None:
        over["residual.group_size"] = args.group_size
    for key in ("nsamples", "seqlen", "batch_size"):
        if getattr(args, key) is not None:
            over[f"calibration.{key}"] = getattr(args, key)
    return rcp.with_overrides(recipe, over) if over else recipe


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="twinquant-quantize", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="dense Hugging Face checkpoint folder (safetensors) (required)")
    ap.add_argument("--output", help="folder to create for the TwinQuant checkpoint (required)")
    ap.add_argument("--calib", metavar="FILE",
                    help="calibration text (required): .jsonl with a 'text' field per line, .txt with one document a "
                         "line, or 'random' for random token ids (speed tests only)")
    ap.add_argument("--recipe", default="twinquant-w4a16",
                    help="preset name or YAML file (default: %(default)s; see --list-recipes)")
    ap.add_argument("--rank", type=int, help="override split.rank: low-rank width (0: residual only)")
    ap.add_argument("--group-size", type=int, help="override residual.group_size: 32, 64 or 128 (must divide "
                                                   "every quantized layer's input width)")
    ap.add_argument("--nsamples", type=int, help="override calibration.nsamples: calibration windows")
    ap.add_argument("--seqlen", type=int, help="override calibration.seqlen: tokens per window")
    ap.add_argument("--batch-size", type=int, help="override calibration.batch_size: windows per forward pass")
    ap.add_argument("--set", type=_set, action="append", metavar="STAGE.KEY=VALUE",
                    help="override any recipe value, e.g. --set rotation.steps=30 --set block_tuning.epochs=2")
    ap.add_argument("--device", help="where the blocks run (default: cuda when available, else cpu)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the calibration windows and random starts "
                                                         "(default: %(default)s)")
    ap.add_argument("--max-kl", type=float, default=1.0,
                    help="refuse the checkpoint when the mean next-token KL against the dense model on held-out text "
                         "exceeds this many nats (default: %(default)s; 'inf' never refuses on KL, non-finite "
                         "logits always are)")
    ap.add_argument("--no-resume", action="store_true",
                    help="refuse to continue an interrupted run's work folder instead of resuming it")
    ap.add_argument("--list-recipes", action="store_true", help="print the preset recipes and exit")
    ap.add_argument("--print-recipe", action="store_true", help="print the recipe with overrides as YAML and exit")
    return ap


def main(argv=None) -> None:
    ap = parser()
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.list_recipes:
            for name in rcp.presets():
                r = rcp.load_recipe(name)
                print(f"{name:24s} {r.description}")
            return
        recipe = build_recipe(args)
        if args.print_recipe:
            print(yaml.safe_dump(recipe.to_dict(), sort_keys=False), end="")
            return
        missing = [f"--{k}" for k in ("model", "output", "calib") if getattr(args, k) is None]
        if missing:
            ap.error(f"the following arguments are required: {', '.join(missing)}")
        from offline_quantizer.pipeline import CheckpointRefused, quantize

        max_kl = None if math.isinf(args.max_kl) else args.max_kl
        try:
            result = quantize(args.model, recipe, args.calib, args.output, device=args.device, seed=args.seed,
                              max_kl=max_kl, resume=not args.no_resume)
        except CheckpointRefused as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(EXIT_REFUSED)
    except KeyboardInterrupt as e:
        print(f"{e or 'interrupted'}", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except (ValueError, FileExistsError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_ERROR)
    summary = result.to_dict()
    summary.pop("blocks")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
