"""Export a trained l2l run as a pretrained optimizer shipped with the package: ``algorithms/pretrained/NAME.pt``.

The file holds the rule's settings and weights and where they come from (preset, iterations,
best validation loss, metaopt version; format: ``metaopt.algorithms.pretrained_optimizers``).
Once shipped, ``LearnedOptimizer(params, pretrained=NAME)`` loads it offline.

Examples::

    python scripts/export_pretrained.py runs/l2l-mnist-20240131-142502 l2l-mnist
    python scripts/export_pretrained.py runs/try l2l-try --checkpoint last --dir /tmp/pretrained --force
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from metaopt.algorithms.lstm_optimizer import export_pretrained
from metaopt.algorithms.pretrained_optimizers import check_name
from metaopt.training.checkpoint import CheckpointError

#: The package-data folder of the source tree this script belongs to.
DEFAULT_DIR = Path(__file__).resolve().parents[1] / "algorithms" / "pretrained"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="export_pretrained.py", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="the folder of a trained l2l run (holding best.pt)")
    parser.add_argument("name", help="the pretrained optimizer's name, e.g. l2l-mnist")
    parser.add_argument("--checkpoint", choices=("best", "last"), default="best",
                        help="the run's checkpoint to export (default: best, the best validation loss)")
    parser.add_argument("--preset", help="the preset the run started from (default: the preset of the run's "
                                         "algorithm and dataset)")
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help=f"folder to write NAME.pt to (default: "
                                                                      f"{DEFAULT_DIR})")
    parser.add_argument("--force", action="store_true", help="overwrite an existing NAME.pt")
    args = parser.parse_args(argv)
    try:
        path = args.dir / f"{check_name(args.name)}.pt"
        if path.exists() and not args.force:
            raise ValueError(f"{path} exists; pass --force to overwrite it, or choose another name")
        provenance = export_pretrained(args.run_dir / f"{args.checkpoint}.pt", path, preset=args.preset)
    except (CheckpointError, ValueError) as err:
        print(f"export_pretrained.py: error: {err}", file=sys.stderr)
        return 2
    shown = {k: v for k, v in provenance.items() if k != "config"}
    print(f"wrote {path} ({path.stat().st_size} bytes): {shown}")
    print(f"load it with LearnedOptimizer(params, pretrained={args.name!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
