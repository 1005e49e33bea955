"""miniImageNet: 100 ImageNet classes of 600 colour images, 84x84, in the split of Ravi & Larochelle.

miniImageNet was introduced by Vinyals et al. (2016); the split used by most papers since (MAML,
Prototypical Networks, ...) is the one of Ravi & Larochelle (2017): 64 / 16 / 20 classes for
train / val / test, 600 images each. That split ships with the package as a versioned JSON file
(``splits/miniimagenet-ravi-v1.json``), a compact encoding of their three CSV files together
with the CSVs' SHA-256 and MD5; its own SHA-256 is checked on every load.

No images ship with metaopt (they come from ILSVRC-2012). ``root`` (default
``$METAOPT_DATA/miniimagenet``) holds either of two layouts:

* the pickle caches ``mini-imagenet-cache-{train,val,test}.pkl``: a dict with ``image_data``
  (uint8 ``[N, 84, 84, 3]``) and ``class_dict`` (``{wnid: [row, ...]}``). They are read with a
  restricted unpickler that builds numpy arrays, dicts, lists and strings and nothing else, so
  a tampered file cannot run code;
* Ravi's ``images/`` folder of JPEGs named as in the split's CSVs (``n0153282900000005.jpg``),
  resized to 84x84 with Lanczos filtering where they are not already.

The pickle is used when both are present. Images are decoded once and cached as uint8 under
``$METAOPT_CACHE``, keyed by the sources' sizes and modification times, so a second start takes
seconds. Usage, once the data are in place::

    sampler = EpisodeSampler(MiniImageNet(split="test"), ways=5, shots=1, query=15, batch_size=4)

References:
    Vinyals et al., 2016. Matching Networks for One Shot Learning. https://arxiv.org/abs/1606.04080
    Ravi & Larochelle, 2017. Optimization as a Model for Few-Shot Learning.
    https://openreview.net/forum?id=rJY0-Kcll

Example:
    >>> {split: len(miniimagenet_split(split).classes) for split in ("train", "val", "test")}
    {'train': 64, 'val': 16, 'test': 20}
    >>> test = miniimagenet_split("test")
    >>> test.classes[0], len(test.filenames[0]), test.filenames[0][0]
    ('n01930112', 600, 'n0193011200000001.jpg')
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from metaopt.datasets._common import TensorClassDataset, cache_dir, dataset_root, load_cached, put_into, save_cached
from metaopt.problems.sampling import EpisodeOptions, EpisodeSampler, episode_sampler
from metaopt.registry import register_dataset
from metaopt.training.logging import note

__all__ = ["MiniImageNet", "MiniImageNetOptions", "MiniImageNetSplit", "UnsafePickleError", "build_miniimagenet",
           "miniimagenet_split"]

IMAGE_SIZE = 84
IMAGES_PER_CLASS = 600
_SPLIT_FILE = resources.files("metaopt.datasets") / "splits" / "miniimagenet-ravi-v1.json"
_SPLIT_SHA256 = "b5fbbf95c2b720da2ee344c2fe4b042265bfdb10e04a053b8a339b61e1f86cbd"
_CACHE_VERSION = 1


@dataclass(frozen=True)
class MiniImageNetSplit:
    """One split of the shipped table, exactly as in Ravi & Larochelle's CSV file.

    Attributes:
        name: ``"train"``, ``"val"`` or ``"test"``.
        classes: the WordNet ids of the classes, in CSV order.
        filenames: for each class, its 600 image file names, in CSV order.
        csv_sha256, csv_md5: checksums of the original CSV file the table encodes.
    """

    name: str
    classes: tuple[str, ...]
    filenames: tuple[tuple[str, ...], ...]
    csv_sha256: str
    csv_md5: str


def miniimagenet_split(split: str) -> MiniImageNetSplit:
    """The classes and image file names of ``split`` (``"train"``, ``"val"`` or ``"test"``).

    Raises:
        ValueError: for an unknown split.
        RuntimeError: if the shipped split file does not match its recorded SHA-256.
    """
    raw = _SPLIT_FILE.read_bytes()
    if hashlib.sha256(raw).hexdigest() != _SPLIT_SHA256:
        raise RuntimeError(f"the shipped split file {_SPLIT_FILE} does not match its recorded SHA-256; "
                           "it was edited: reinstall metaopt or restore the file")
    splits = json.loads(raw)["splits"]
    if split not in splits:
        raise ValueError(f"unknown miniImageNet split {split!r}; choose one of {sorted(splits)}")
    entry = splits[split]
    filenames = []
    for wnid, numbers in entry["classes"]:
        mask = int(numbers, 16)
        filenames.append(tuple(f"{wnid}{n:08d}.jpg" for n in range(1, mask.bit_length() + 1) if mask >> (n - 1) & 1))
    return MiniImageNetSplit(split, tuple(w for w, _ in entry["classes"]), tuple(filenames),
                             entry["csv"]["sha256"], entry["csv"]["md5"])


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle asks for something a miniImageNet cache never holds (a global other than numpy's, a codec)."""


def _latin1_encode(text: str, encoding: str) -> bytes:
    """``_codecs.encode`` as pickle protocols 0-2 use it for bytes, limited to latin-1."""
    if encoding != "latin1":
        raise UnsafePickleError(f"refusing _codecs.encode with encoding {encoding!r} (only 'latin1')")
    return text.encode("latin1")


# The functions numpy's own array pickles call, taken from numpy itself (whatever its version) so
# that the numpy 1.x module names (numpy.core) and the 2.x ones (numpy._core) both resolve to them.
_NUMPY_PICKLE_FUNCTIONS = {
    ("multiarray", "_reconstruct"): np.empty(0).__reduce__()[0],
    ("multiarray", "scalar"): np.float64(0).__reduce__()[0],
    ("numeric", "_frombuffer"): np.empty(0).__reduce_ex__(5)[0],
}
_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
    **{(f"{core}.{module}", name): function for core in ("numpy.core", "numpy._core")
       for (module, name), function in _NUMPY_PICKLE_FUNCTIONS.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, numpy scalars, dicts, lists and strings; refuses every other global."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise UnsafePickleError(f"refusing to load global {module}.{name}: a miniImageNet cache holds "
                                         "only numpy arrays, dicts, lists and strings")
        return _ALLOWED_GLOBALS[module, name]


def _read_pickle(path: Path, split: MiniImageNetSplit, classes: Sequence[str], count: int) -> np.ndarray:
    """The first ``count`` images of each of ``classes`` from a pickle cache, ``[N, 84, 84, 3]``."""
    try:
        with open(path, "rb") as f:
            data = _RestrictedUnpickler(f, encoding="latin1").load()  # latin1: pickles written by Python 2
    except UnsafePickleError:
        raise
    except (EOFError, pickle.UnpicklingError, ValueError, TypeError, IndexError, KeyError, AttributeError,
            MemoryError) as error:
        raise ValueError(f"{path} is truncated or corrupt ({type(error).__name__}: {error}); it cannot be unpickled: "
                         f"replace it with a complete {path.name} and put it {put_into('miniimagenet', path.parent)}, "
                         "or use Ravi's images/ folder of JPEGs instead") from error
    if not (isinstance(data, dict) and {"image_data", "class_dict"} <= data.keys()
            and isinstance(data["class_dict"], dict)):
        found = {k: type(v).__name__ for k, v in data.items()} if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path} is not a miniImageNet cache: expected a dict with 'image_data' (an array) and "
                         f"'class_dict' (a dict), found {found}")
    images, class_dict = data["image_data"], data["class_dict"]
    if not (isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 4
            and images.shape[1:] == (IMAGE_SIZE, IMAGE_SIZE, 3)):
        raise ValueError(f"{path}: image_data must be a uint8 array [N, {IMAGE_SIZE}, {IMAGE_SIZE}, 3], found "
                         f"{getattr(images, 'dtype', type(images).__name__)} {getattr(images, 'shape', '')}")
    foreign = sorted(set(class_dict) - set(split.classes))
    missing = [c for c in classes if c not in class_dict]
    if foreign or missing:
        raise ValueError(f"{path} does not hold the classes of the miniImageNet {split.name} split: "
                         f"{len(foreign)} unexpected (e.g. {foreign[:3]}), {len(missing)} missing (e.g. "
                         f"{missing[:3]}); is it the cache of another split?")
    rows = []
    for wnid in classes:
        index = np.asarray(class_dict[wnid], dtype=np.int64)[:count]
        if len(index) < count or (index < 0).any() or (index >= len(images)).any():
            raise ValueError(f"{path}: class {wnid} needs {count} row indices into the {len(images)} images, got "
                             f"{len(class_dict[wnid])} (range {index.min(initial=0)}..{index.max(initial=0)})")
        rows.append(index)
    return images[np.concatenate(rows)]


def _decode_jpegs(paths: Sequence[Path]) -> np.ndarray:
    """Decode JPEGs (in parallel threads) into ``[N, 84, 84, 3]`` uint8, resizing where needed."""
    out = np.empty((len(paths), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)

    def decode(i: int) -> None:
        try:
            with Image.open(paths[i]) as image:
                rgb = image.convert("RGB")
        except OSError as error:  # PIL's UnidentifiedImageError, a truncated JPEG
            raise ValueError(f"{paths[i]} is not a readable image ({error}); it is truncated or corrupt: replace "
                             "it with the original file (an ILSVRC-2012 image named as in Ravi & Larochelle's CSVs)"
                             ) from error
        if rgb.size != (IMAGE_SIZE, IMAGE_SIZE):
            rgb = rgb.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
        out[i] = np.asarray(rgb)

    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        list(pool.map(decode, range(len(paths))))
    return out


def _image_paths(images_dir: Path, filenames: Sequence[str], split: str) -> list[Path]:
    """The paths of ``filenames`` in ``images_dir``, all of which must be there."""
    present = set(os.listdir(images_dir))
    missing = [name for name in filenames if name not in present]
    if missing:
        raise FileNotFoundError(
            f"{images_dir} is incomplete for the miniImageNet {split} split: {len(missing)} of {len(filenames)} "
            f"images are missing (e.g. {missing[0]}); copy them there or use mini-imagenet-cache-{split}.pkl")
    return [images_dir / name for name in filenames]


def _digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value).encode()).hexdigest()


class MiniImageNet(TensorClassDataset):
    """One split of miniImageNet as a class dataset for :class:`metaopt.EpisodeSampler`.

    Class ``c`` is ``class_names[c]`` (a WordNet id, in the split's order); image ``j`` of a class
    is its ``j``-th file name in the split (JPEGs) or its ``j``-th row in ``class_dict`` (pickle).
    :meth:`examples` returns floats in [0, 1], ``[k, 3, 84, 84]``.

    Args:
        root: folder with ``mini-imagenet-cache-<split>.pkl`` or ``images/`` (see the module
            docstring); default ``$METAOPT_DATA/miniimagenet``.
        split: ``"train"`` (64 classes), ``"val"`` (16) or ``"test"`` (20).
        classes: a subset of the split's WordNet ids to load, in this order (default: all). With
            ``images_per_class``, this loads a reduced dataset: small fixtures, quick experiments.
        images_per_class: load only the first this many images of each class (default: 600).

    Attributes:
        root: the data folder.
        split: the split loaded.
        source: ``"pickle"`` or ``"images"``, the layout the images were read from.

    Raises:
        FileNotFoundError: when neither layout is in ``root``, or ``images/`` lacks files.
        UnsafePickleError: (a ``pickle.UnpicklingError``) when the pickle refers to anything but
            numpy arrays and builtins.
        ValueError: for bad arguments, a truncated or corrupt pickle or JPEG, or a pickle whose
            classes are not the split's.
    """

    def __init__(self, root: str | os.PathLike | None = None, split: str = "train", *,
                 classes: Sequence[str] | None = None, images_per_class: int = IMAGES_PER_CLASS) -> None:
        table = miniimagenet_split(split)
        position = {wnid: i for i, wnid in enumerate(table.classes)}
        names = list(table.classes if classes is None else classes)
        unknown = [c for c in names if c not in position]
        if unknown or not names or len(set(names)) != len(names):
            raise ValueError(f"classes must be distinct WordNet ids of the {split} split (e.g. {table.classes[:3]}), "
                             f"got {len(names)} with {len(names) - len(set(names))} repeated and unknown {unknown[:3]}")
        if not 1 <= images_per_class <= IMAGES_PER_CLASS:
            raise ValueError(f"images_per_class must be in 1..{IMAGES_PER_CLASS}, got {images_per_class}")
        folder = dataset_root(root, "miniimagenet")
        pickle_path, images_dir = folder / f"mini-imagenet-cache-{split}.pkl", folder / "images"
        filenames = [name for c in names for name in table.filenames[position[c]][:images_per_class]]
        if pickle_path.is_file():
            self.source, sources = "pickle", [pickle_path]
        elif images_dir.is_dir():
            self.source, sources = "images", _image_paths(images_dir, filenames, split)
        else:
            raise FileNotFoundError(
                f"miniImageNet {split} split not found in {folder}: expected either the JPEGs "
                f"{images_dir / filenames[0]} ... ({len(filenames)} files named as in Ravi & Larochelle's "
                f"{split}.csv) or the pickle cache {pickle_path}; put either {put_into('miniimagenet', folder)} "
                "(no images ship with metaopt and it cannot download them: they come from ILSVRC-2012)")
        selection = [self.source, split, names, images_per_class]
        stats = [(p.name, st.st_size, st.st_mtime_ns) for p in sources for st in [p.stat()]]
        key = _digest([_CACHE_VERSION, _SPLIT_SHA256, *selection, stats])
        cache = cache_dir() / "miniimagenet" / f"{split}-{_digest([str(folder.resolve()), *selection])[:16]}.pt"
        payload = load_cached(cache, key)
        if payload is None:
            what = pickle_path.name if self.source == "pickle" else f"{len(sources)} JPEGs of {images_dir}"
            note(f"decoding miniImageNet {split}: {what} (first time; cached in {cache})")
            array = (_read_pickle(pickle_path, table, names, images_per_class) if self.source == "pickle"
                     else _decode_jpegs(sources))
            payload = {"key": key, "images": torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()}
            save_cached(cache, payload)
        self.root, self.split = folder, split
        index = torch.arange(len(names) * images_per_class).reshape(len(names), images_per_class)
        super().__init__(payload["images"], list(index), names)


@dataclass(frozen=True)
class MiniImageNetOptions(EpisodeOptions):
    """miniImageNet few-shot tasks of the Ravi & Larochelle split (64/16/20 classes of 600 images).

    Args:
        data_root: folder holding the datasets, one sub-folder each (data_root/miniimagenet);
            None: $METAOPT_DATA.
    """

    data_root: str | None = None


@register_dataset("miniimagenet", MiniImageNetOptions)
def build_miniimagenet(options: MiniImageNetOptions, split: str, seed: int) -> EpisodeSampler:
    """miniImageNet (Vinyals et al. 2016) with the class split of Ravi & Larochelle (2017)."""
    root = None if options.data_root is None else Path(options.data_root) / "miniimagenet"
    return episode_sampler(MiniImageNet(root, split=split), options, split, seed)
