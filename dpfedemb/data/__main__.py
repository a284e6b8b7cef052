"""CLI: ``python -m dpfedemb.data import {fashion-mnist,npz,folder,digits} --output DIR ...``."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from dpfedemb.config import ConfigError, SimulationConfig
from dpfedemb.data import importers
from dpfedemb.storage import StorageError


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()] if text else []


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dpfedemb.data")
    sub = p.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="import a public data set as schema TFRecords + card.json")
    kinds = imp.add_subparsers(dest="kind", required=True)

    def common(k: argparse.ArgumentParser, simulate: bool = True) -> None:
        k.add_argument("--output", required=True, help="output directory (local or gs://)")
        if simulate:
            k.add_argument("--mean-examples-per-user", type=float, default=20.0)
            k.add_argument("--dirichlet-alpha", type=float, default=0.5)
            k.add_argument("--seed", type=int, default=0)

    fm = kinds.add_parser("fashion-mnist", help="Fashion-MNIST IDX files (Debian dataset-fashion-mnist)")
    fm.add_argument("--source", default="/usr/share/datasets/fashion-mnist")
    fm.add_argument("--max-train", type=int, default=None)
    fm.add_argument("--max-test", type=int, default=None)
    fm.add_argument("--public", default="fashion-mnist", choices=["digits", "fashion-mnist", "none"])
    fm.add_argument("--public-examples", type=int, default=2000,
                    help="with --public fashion-mnist: train examples set apart as public")
    common(fm)
    nz = kinds.add_parser("npz", help="arrays in an .npz file")
    nz.add_argument("--path", required=True)
    nz.add_argument("--images-key", default="images")
    nz.add_argument("--labels-key", default="labels")
    nz.add_argument("--users-key", default=None, help="omit to simulate users")
    nz.add_argument("--holdout-classes", type=_ints, default=[],
                    help="comma-separated class ids held out for evaluation (never trained on)")
    nz.add_argument("--eval-fraction", type=float, default=0.0)
    nz.add_argument("--public-fraction", type=float, default=0.0)
    nz.add_argument("--invert", action="store_true", help="255 - pixels (ink-on-white data)")
    nz.add_argument("--licence", default="unknown")
    common(nz)
    fo = kinds.add_parser("folder", help="<root>/<user>/<label>/<file> or a CSV manifest")
    g = fo.add_mutually_exclusive_group(required=True)
    g.add_argument("--root")
    g.add_argument("--manifest")
    fo.add_argument("--split", default="private", choices=["private", "public", "eval"])
    common(fo, simulate=False)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.kind == "folder":
            card = importers.import_folder(args.output, root=args.root, manifest=args.manifest,
                                           split=args.split)
        else:
            sim = SimulationConfig(mean_examples_per_user=args.mean_examples_per_user,
                                   dirichlet_alpha=args.dirichlet_alpha, seed=args.seed)
            if args.kind == "fashion-mnist":
                card = importers.import_fashion_mnist(args.source, args.output, sim,
                                                      max_train=args.max_train,
                                                      max_test=args.max_test, public=args.public,
                                                      public_examples=args.public_examples)
            else:
                for name in ("eval_fraction", "public_fraction"):
                    v = getattr(args, name)
                    if not 0.0 <= v < 1.0:
                        raise ConfigError(f"invalid --{name.replace('_', '-')}={v}: must be in [0, 1)")
                x, y, u = importers.load_npz(args.path, args.images_key, args.labels_key,
                                             args.users_key)
                card = importers.import_arrays(x, y, u, args.output, sim, source=f"npz:{args.path}",
                                               licence=args.licence,
                                               holdout_classes=args.holdout_classes,
                                               eval_fraction=args.eval_fraction,
                                               public_fraction=args.public_fraction,
                                               invert=args.invert)
    except (importers.DataImportError, ConfigError, StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = {k: {"examples": v["examples"], "users": v["users"], "classes": v["num_classes"]}
               for k, v in card["splits"].items()}
    print(json.dumps({"output": args.output, "splits": summary,
                      "raw_pixel_recall_at_1": card["raw_pixel_recall_at_1"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
