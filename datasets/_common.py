"""Shared plumbing of the image datasets: where data and caches live, and tensor class datasets.

Data are found through an explicit ``root`` or the ``METAOPT_DATA`` environment variable (a
folder holding one sub-folder per dataset, e.g. ``$METAOPT_DATA/omniglot``). Decoded, resized
images are cached as uint8 tensors under ``METAOPT_CACHE`` (default ``~/.cache/metaopt``),
so that a second start takes seconds; the data folder itself may be read-only.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from metaopt.training.checkpoint import save_atomic

__all__ = ["TensorClassDataset", "cache_dir", "dataset_root", "load_cached", "put_into", "save_cached"]


def dataset_root(root: str | os.PathLike | None, name: str) -> Path:
    """The folder of dataset ``name``: ``root`` if given, else ``$METAOPT_DATA/<name>``."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get("METAOPT_DATA")
    if not env:
        raise FileNotFoundError(f"no data folder given for {name}: set METAOPT_DATA to the folder that holds {name}/ "
                                "(e.g. export METAOPT_DATA=../shared/data), or name that folder with --data-root on "
                                f"the command line (root=<folder>/{name} in Python)")
    return Path(env).expanduser() / name


def put_into(name: str, folder: Path) -> str:
    """Where missing files go: ``folder``, and how that folder is found (``$METAOPT_DATA/<name>`` or ``--data-root``).

    Example:
        >>> put_into("mnist", Path("/data/mnist"))
        'into /data/mnist (the mnist/ folder under $METAOPT_DATA, or under --data-root / data_root when given)'
    """
    return f"into {folder} (the {name}/ folder under $METAOPT_DATA, or under --data-root / data_root when given)"


def cache_dir() -> Path:
    """Folder for decoded-image caches: ``$METAOPT_CACHE`` or ``~/.cache/metaopt``."""
    return Path(os.environ.get("METAOPT_CACHE", Path.home() / ".cache" / "metaopt")).expanduser()


def save_cached(path: Path, payload: dict) -> None:
    """Write a cache file atomically (temporary file + rename): a killed run never leaves half a cache."""
    save_atomic(path, payload)


def load_cached(path: Path, key: str) -> dict | None:
    """The cache at ``path`` if it exists, loads safely and was built from the same sources (``key``)."""
    if not path.exists():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001  (a corrupt cache is rebuilt, never trusted)
        return None
    return payload if isinstance(payload, dict) and payload.get("key") == key else None


class TensorClassDataset:
    """A :class:`metaopt.problems.sampling.ClassDataset` over a uint8 image tensor grouped by class.

    Its examples are checked once, here (one tensor: one shape; uint8, or else finite), so it is
    ``validated``: the sampler skips its per-episode checks.

    Args:
        images: ``[N, C, H, W]`` uint8 images.
        class_index: for each class, the indices of its images in ``images``.
        class_names: a name per class (for reports and split files).
    """

    validated = True

    def __init__(self, images: torch.Tensor, class_index: Sequence[torch.Tensor], class_names: Sequence[str]) -> None:
        if len(class_index) != len(class_names):
            raise ValueError(f"{len(class_index)} classes but {len(class_names)} class names")
        if images.is_floating_point() and not torch.isfinite(images).all():
            raise ValueError("the images hold NaN or infinite values; a TensorClassDataset takes uint8 images")
        self.images = images
        self.class_index = list(class_index)
        self.class_names = list(class_names)

    @property
    def num_classes(self) -> int:
        return len(self.class_index)

    def class_size(self, cls: int) -> int:
        return len(self.class_index[cls])

    def examples(self, cls: int, indices: Sequence[int]) -> torch.Tensor:
        """Images ``indices`` of class ``cls`` as floats in [0, 1]."""
        rows = self.class_index[cls][torch.as_tensor(indices, dtype=torch.long)]
        return self.images[rows].float().div_(255)
