"""Omniglot (Lake et al. 2015): 1623 handwritten characters from 50 alphabets, 20 drawings each.

Read from ``images_background.zip`` and ``images_evaluation.zip`` (or the same folders extracted)
in ``root`` (default ``$METAOPT_DATA/omniglot``). Images are decoded once, converted to
grayscale, resized to 28x28 with LANCZOS and inverted so that ink is 1 (MAML's preprocessing,
Finn et al. 2017, §5.2), and cached as uint8 so that a second start takes seconds.

Class splits are versioned JSON files shipped with the package and checked against their
SHA-256 on load; nothing is reshuffled at run time:

* ``protocol="maml"``: 1200 characters for meta-training irrespective of alphabet, the other
  423 for meta-test (Finn et al. 2017, §5.2); ``split="val"`` is 100 of the 1200 training
  characters, held out for validation as in cbfinn/maml (use it only to pick checkpoints).
* ``protocol="vinyals"``: 1028 / 172 / 423 characters for train / val / test, the split of
  Vinyals et al. (2016) as distributed with torchmeta (validation: 5 background alphabets).

Meta-training classes are augmented with rotations by 90, 180 and 270 degrees, each a class of
its own (Santoro et al. 2016): 1200 characters give 4800 classes.

Example:
    >>> sorted(split_names("maml").items())
    [('test', 423), ('train', 1200), ('val', 100)]
    >>> sorted(split_names("vinyals").items())
    [('test', 423), ('train', 1028), ('val', 172)]
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import shutil
import tempfile
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Literal

import numpy as np
import torch
from PIL import Image

from metaopt.datasets._common import (
    TensorClassDataset,
    cache_dir,
    dataset_root,
    load_cached,
    put_into,
    save_cached,
)
from metaopt.problems.sampling import EpisodeOptions, EpisodeSampler, episode_sampler
from metaopt.registry import register_dataset
from metaopt.training.logging import note

__all__ = ["Omniglot", "OmniglotOptions", "build_omniglot", "download_omniglot", "safe_extract", "split_names"]

BACKGROUND, EVALUATION = "images_background", "images_evaluation"
#: alphabets, characters of each source set (every character has 20 drawings)
EXPECTED = {BACKGROUND: (30, 964), EVALUATION: (20, 659)}
DRAWINGS = 20
#: MD5 of the archives: the originals (brendenlake/omniglot) and the pixel-identical rebuild
KNOWN_MD5 = {
    BACKGROUND: {"68d2efa1b9178cc56df9314c21c6e718": "original", "bb0b98332460aa18e593f0bfce6adea7": "rebuilt"},
    EVALUATION: {"6b91aef0f799c5bb55b94e3f2daec811": "original", "640dfdfb03a8e5175c8bc27448f624e0": "rebuilt"},
}
URL = "https://github.com/brendenlake/omniglot/raw/master/python/{name}.zip"
SOURCE = "github.com/brendenlake/omniglot (python/ folder)"
SPLIT_FILES = {
    "maml": ("omniglot-maml-v1.json", "ed55510ea0892bb3604a69dc87c7324c79cbfe8c0d1489dd0dac591a14e304ee"),
    "vinyals": ("omniglot-vinyals-v1.json", "0a79e0177db1fb22222b80604a3a5e71e41bf1fb13894af6654a573f4ab07cfa"),
}
_CACHE_VERSION = 1


def _split_table(protocol: str) -> dict[str, list[str]]:
    if protocol not in SPLIT_FILES:
        raise ValueError(f"unknown Omniglot protocol {protocol!r}; choose one of {sorted(SPLIT_FILES)}")
    name, sha256 = SPLIT_FILES[protocol]
    raw = resources.files("metaopt.datasets").joinpath("splits", name).read_bytes()
    if hashlib.sha256(raw).hexdigest() != sha256:
        raise RuntimeError(f"the shipped split file {name} does not match its recorded SHA-256; "
                           "it was edited: reinstall metaopt or restore the file")
    return json.loads(raw)["splits"]


def split_names(protocol: str) -> dict[str, int]:
    """Number of characters in each split of ``protocol``."""
    return {split: len(chars) for split, chars in _split_table(protocol).items()}


def _replace(name: str, root: Path) -> str:
    """How to replace a damaged archive ``name``.zip of ``root``."""
    return (f"replace it with a complete {name}.zip from {SOURCE} and put it {put_into('omniglot', root)}; from "
            "Python, delete it and call Omniglot(..., download=True) to fetch it again")


class _Source:
    """The two image sets in ``root``, as zip archives or extracted folders."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.parts: dict[str, Path] = {}
        missing = []
        for name in EXPECTED:
            archive, folder = root / f"{name}.zip", root / name
            if folder.is_dir():
                self.parts[name] = folder
            elif archive.is_file():
                self.parts[name] = archive
            else:
                missing.append(name)
        if missing:
            raise FileNotFoundError(
                f"Omniglot not found in {root}: missing {', '.join(f'{m}.zip (or folder {m}/)' for m in missing)}. "
                f"Fetch images_background.zip and images_evaluation.zip from {SOURCE} and put them "
                f"{put_into('omniglot', root)}; from Python, Omniglot(..., download=True) fetches them when online")
        for name, path in self.parts.items():
            if path.is_file() and not zipfile.is_zipfile(path):
                raise ValueError(f"{path} is not a complete zip archive ({path.stat().st_size} bytes, no zip "
                                 f"directory: truncated or corrupt); {_replace(name, root)}")

    @functools.cached_property
    def _digests(self) -> dict[str, tuple[str, str]]:
        """``(sha256, md5)`` of each archive, read once; a folder gets a digest of its file list."""
        digests = {}
        for name, path in sorted(self.parts.items()):
            if path.is_file():
                sha256, md5 = hashlib.sha256(), hashlib.md5()
                with open(path, "rb") as f:
                    while block := f.read(1 << 20):
                        sha256.update(block)
                        md5.update(block)
                digests[name] = (sha256.hexdigest(), md5.hexdigest())
            else:
                stats = sorted((str(p.relative_to(path)), p.stat().st_size) for p in path.rglob("*.png"))
                digests[name] = (hashlib.sha256(repr(stats).encode()).hexdigest(), "")
        return digests

    def identity(self) -> str:
        """A key that changes whenever the source files change."""
        parts = "|".join(f"{name}:{sha256}" for name, (sha256, _) in self._digests.items())
        return hashlib.sha256(f"{_CACHE_VERSION}|{parts}".encode()).hexdigest()

    def checksums(self) -> dict[str, str]:
        """For each archive, whether its MD5 is the original's, the rebuild's, or unknown."""
        return {name: KNOWN_MD5[name].get(md5, "unknown") if self.parts[name].is_file() else "folder"
                for name, (_, md5) in self._digests.items()}

    def characters(self) -> dict[str, list[str]]:
        """``"<set>/<alphabet>/<character>" -> sorted image paths``, checked for completeness."""
        found: dict[str, list[str]] = {}
        for name, path in self.parts.items():
            if path.is_file():
                with zipfile.ZipFile(path) as z:
                    files = [n for n in z.namelist() if n.endswith(".png")]
            else:
                files = [f"{name}/{p.relative_to(path).as_posix()}" for p in path.rglob("*.png")]
            chars: dict[str, list[str]] = {}
            for f in files:
                parts = PurePosixPath(f).parts
                if len(parts) == 4 and parts[0] == name:
                    chars.setdefault("/".join(parts[:3]), []).append(f)
            alphabets = {c.split("/")[1] for c in chars}
            want_alphabets, want_chars = EXPECTED[name]
            short = {c: len(v) for c, v in chars.items() if len(v) != DRAWINGS}
            if len(alphabets) != want_alphabets or len(chars) != want_chars or short:
                detail = f"; e.g. {next(iter(short))} has {next(iter(short.values()))} drawings" if short else ""
                raise FileNotFoundError(
                    f"incomplete Omniglot set {name} in {path}: {len(alphabets)} alphabets and {len(chars)} "
                    f"characters, expected {want_alphabets} and {want_chars} with {DRAWINGS} drawings each{detail}; "
                    f"replace it with the complete {name}.zip from {SOURCE}")
            found.update({c: sorted(v) for c, v in chars.items()})
        return dict(sorted(found.items()))

    @contextlib.contextmanager
    def reader(self) -> Iterator[Callable[[str], bytes]]:
        """A function reading a member (``"<set>/<alphabet>/<character>/<file>"``), archives opened once."""
        archives = {n: zipfile.ZipFile(p) for n, p in self.parts.items() if p.is_file()}

        def read(member: str) -> bytes:
            name, rest = member.split("/", 1)
            if name not in archives:
                return (self.parts[name] / rest).read_bytes()
            try:
                return archives[name].read(member)
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as error:
                raise ValueError(f"{self.parts[name]}: member {member} cannot be read ({error}); the archive is "
                                 f"corrupt: {_replace(name, self.root)}") from error

        try:
            yield read
        finally:
            for z in archives.values():
                z.close()


def _decode(source: _Source, characters: dict[str, list[str]], size: int) -> torch.Tensor:
    images = np.empty((len(characters), DRAWINGS, size, size), dtype=np.uint8)
    with source.reader() as read:
        for i, files in enumerate(characters.values()):
            for j, member in enumerate(files):
                try:
                    image = Image.open(io.BytesIO(read(member))).convert("L")
                except OSError as error:  # PIL's UnidentifiedImageError, a truncated PNG
                    raise ValueError(f"{member} in {source.parts[member.split('/', 1)[0]]} is not a readable PNG "
                                     f"({error}); {_replace(member.split('/', 1)[0], source.root)}") from error
                images[i, j] = 255 - np.asarray(image.resize((size, size), Image.Resampling.LANCZOS))
    return torch.from_numpy(images)


def _load_images(root: Path, size: int) -> tuple[torch.Tensor, list[str], dict[str, str]]:
    source = _Source(root)
    key = f"{source.identity()}|{size}"
    cache = cache_dir() / f"omniglot-{size}px-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"
    payload = load_cached(cache, key)
    if payload is None:
        sources = ", ".join(path.name for _, path in sorted(source.parts.items()))
        note(f"decoding Omniglot {sources} (first time, about 15 s; cached in {cache})")
        characters = source.characters()
        payload = {"key": key, "images": _decode(source, characters, size), "names": list(characters)}
        save_cached(cache, payload)
    return payload["images"], payload["names"], source.checksums()


class Omniglot(TensorClassDataset):
    """Omniglot characters of one split as a class dataset for :class:`metaopt.problems.sampling.EpisodeSampler`.

    Args:
        root: folder with ``images_background.zip`` and ``images_evaluation.zip`` (or the
            extracted folders); default ``$METAOPT_DATA/omniglot``.
        split: ``"train"``, ``"val"`` or ``"test"``.
        protocol: ``"maml"`` or ``"vinyals"`` (see the module docstring).
        rotations: add the 90/180/270-degree rotations of every character as classes; default
            on for ``"train"`` only.
        image_size: side of the resized images (28 as in MAML).
        download: fetch the archives from the official repository when they are missing.

    Attributes:
        characters: the ``"<set>/<alphabet>/<character>"`` names of the split's characters.
        checksums: per archive, ``"original"``, ``"rebuilt"`` (the pixel-identical rebuild),
            ``"unknown"`` or ``"folder"``; the structure is checked in every case.
    """

    def __init__(self, root: str | os.PathLike | None = None, split: str = "train", protocol: str = "maml",
                 rotations: bool | None = None, image_size: int = 28, download: bool = False) -> None:
        table = _split_table(protocol)
        if split not in table:
            raise ValueError(f"protocol {protocol!r} has splits {sorted(table)}, not {split!r}")
        folder = dataset_root(root, "omniglot")
        if download:
            download_omniglot(folder)
        images, names, self.checksums = _load_images(folder, image_size)
        position = {name: i for i, name in enumerate(names)}
        self.characters = table[split]
        unknown = [c for c in self.characters if c not in position]
        if unknown:
            raise ValueError(f"split {protocol}/{split} names characters absent from the data, e.g. {unknown[0]}")
        self.split, self.protocol = split, protocol
        self.rotations = split == "train" if rotations is None else rotations
        chars = torch.tensor([position[c] for c in self.characters])
        index = [chars[i : i + 1] * DRAWINGS + torch.arange(DRAWINGS) for i in range(len(chars))]
        super().__init__(images.reshape(-1, 1, image_size, image_size), index, self.characters)

    @property
    def num_classes(self) -> int:
        return len(self.characters) * (4 if self.rotations else 1)

    def class_size(self, cls: int) -> int:
        return DRAWINGS

    def examples(self, cls: int, indices: Sequence[int]) -> torch.Tensor:
        """Drawings ``indices`` of class ``cls`` (rotated for the rotation classes), floats in [0, 1]."""
        if not 0 <= cls < self.num_classes:
            raise IndexError(f"class {cls} out of range for {self.num_classes} classes")
        turns = cls % 4 if self.rotations else 0
        images = super().examples(cls // 4 if self.rotations else cls, indices)
        return torch.rot90(images, turns, dims=(-2, -1)) if turns else images


def safe_extract(archive: str | os.PathLike, target: str | os.PathLike) -> list[Path]:
    """Extract a zip archive into ``target``, refusing any member that would land outside it.

    Absolute paths, ``..`` components and symbolic links are rejected before anything is written.
    """
    target = Path(target).resolve()
    with zipfile.ZipFile(archive) as z:
        members = z.infolist()
        for m in members:
            path = (target / m.filename).resolve()
            if (m.external_attr >> 16) & 0o170000 == 0o120000:
                raise ValueError(f"unsafe member {m.filename!r} in {archive}: a symbolic link (to "
                                 f"{z.read(m).decode(errors='replace')!r}), which could point outside {target}; "
                                 "nothing was extracted: remove the link from the archive")
            if PurePosixPath(m.filename).is_absolute() or not path.is_relative_to(target):
                raise ValueError(f"unsafe member {m.filename!r} in {archive}: it would be written outside {target}; "
                                 "nothing was extracted")
        z.extractall(target)
    return [target / m.filename for m in members]


def download_omniglot(root: str | os.PathLike, url: str = URL) -> None:
    """Download the two archives into ``root`` (skipping present ones), atomically and checked.

    ``url`` is a template with ``{name}``; the default is the official repository.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for name in EXPECTED:
        if (root / f"{name}.zip").is_file() or (root / name).is_dir():
            continue
        address = url.format(name=name)
        with tempfile.NamedTemporaryFile(dir=root, suffix=".part", delete=False) as tmp:
            try:
                with urllib.request.urlopen(address, timeout=60) as response:
                    shutil.copyfileobj(response, tmp)
            except OSError as error:
                Path(tmp.name).unlink(missing_ok=True)
                raise FileNotFoundError(f"could not download {address} ({error}); offline? put {name}.zip from "
                                        f"github.com/brendenlake/omniglot (python/ folder) into {root}") from error
        if not zipfile.is_zipfile(tmp.name):
            Path(tmp.name).unlink()
            raise ValueError(f"{address} did not return a zip archive")
        os.replace(tmp.name, root / f"{name}.zip")
    _Source(root).characters()


@dataclass(frozen=True)
class OmniglotOptions(EpisodeOptions):
    """Omniglot few-shot tasks.

    Args:
        protocol: the class split: "maml" (1200 training characters x 4 rotations, 423 test;
            Finn et al.) or "vinyals" (1028/172/423; Vinyals et al.).
        data_root: folder holding the datasets, one sub-folder each (data_root/omniglot); None:
            $METAOPT_DATA.
    """

    protocol: Literal["maml", "vinyals"] = "maml"
    data_root: str | None = None


@register_dataset("omniglot", OmniglotOptions)
def build_omniglot(options: OmniglotOptions, split: str, seed: int) -> EpisodeSampler:
    """Omniglot characters (Lake et al. 2015), MAML's or Vinyals' split, rotations as training classes."""
    root = None if options.data_root is None else Path(options.data_root) / "omniglot"
    return episode_sampler(Omniglot(root, split=split, protocol=options.protocol), options, split, seed)
