"""Regenerate the shipped Omniglot split files (provenance only: the files are versioned data).

    python scripts/make_omniglot_splits.py $METAOPT_DATA/omniglot datasets/splits

* maml-v1: the 1623 characters in sorted order ("<set>/<alphabet>/<character>"), permuted by
  numpy's default_rng(1623); the first 1200 are meta-training ("irrespective of alphabet",
  Finn et al. 2017), the rest meta-test; "val" is the last 100 of the 1200 (as cbfinn/maml).
* vinyals-v1: the Vinyals et al. (2016) split as distributed by torchmeta: validation = five
  background alphabets, test = the last 423 characters in sorted order (from
  Gurmukhi/character42), training = the rest.
"""

import json
import sys
from pathlib import Path

import numpy as np

from metaopt.datasets.omniglot import EVALUATION, _Source

VINYALS_VAL = ["Armenian", "Bengali", "Early_Aramaic", "Hebrew", "Mkhedruli_(Georgian)"]


def main(root: str, out: str) -> None:
    names = list(_Source(Path(root)).characters())
    perm = [names[i] for i in np.random.default_rng(1623).permutation(len(names))]
    maml = {"train": sorted(perm[:1200]), "val": sorted(perm[1100:1200]), "test": sorted(perm[1200:])}
    first_test = names.index(f"{EVALUATION}/Gurmukhi/character42")
    val = [n for n in names if n.split("/")[1] in VINYALS_VAL]
    test = names[first_test:]
    vinyals = {"train": [n for n in names if n not in set(val) | set(test)], "val": val, "test": test}
    for protocol, splits in (("maml", maml), ("vinyals", vinyals)):
        doc = {"dataset": "omniglot", "protocol": protocol, "version": 1, "splits": splits}
        (Path(out) / f"omniglot-{protocol}-v1.json").write_text(json.dumps(doc, indent=0) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:3])
