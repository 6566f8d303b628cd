"""Image-folder datasets: a directory with one sub-folder per class, used by its path.

`sources.get_builder("/data/pets")` (and so every function of the input pipeline) accepts
a directory as the dataset name; `FolderOptions` (from the run's config, through
`sources.DatasetSpec`) say how it becomes a dataset. The folder is prepared once into the TFDS data dir as an
ordinary TFDS dataset, so sharding, cardinality, decoding and the train/eval streams are
the ones used for TFDS datasets. Two layouts:

- Split folders: ROOT/train/<class>/..., ROOT/val/<class>/..., and/or ROOT/validation/...,
  ROOT/test/... The split names are the folder names ("val" stays "val"). A class folder
  may be missing from a split; a class folder in val/validation/test with no train folder
  of the same name is an error (when ROOT/train exists).
- Class folders only: ROOT/<class>/... A seeded split, stratified by class, makes the
  splits "train" and "validation" (`val_fraction` of the images, 0.1 by default).

Class names are the sorted class-folder names (the same labels in every split; an empty
class folder still gets a label). Images are files with the extensions jpg, jpeg, png, bmp,
gif or webp (any case), anywhere below their class folder. Hidden files and folders (names
starting with ".", e.g. .DS_Store) are ignored; files directly in ROOT or in a split folder
belong to no class and are ignored too.

Bad files: every image is read and decoded with `tf.io.decode_image`, the decoder of the
train and eval pipelines, while the dataset is prepared. A file it cannot decode (truncated,
not an image), a non-image file in a class folder (notes.txt) and anything that is not a
regular file (a broken link, a pipe) is a bad file: with on_bad_file="skip" it is left out,
logged as a warning, and recorded by relative path in the prepared dataset's metadata
(`skipped_files`); with on_bad_file="error" preparing fails naming the file.

Images are stored as their original bytes. A JPEG stays a JPEG, so the train pipeline's
fused decode-and-crop applies to it (re-encoding to PNG would lose that path and enlarge the
dataset; re-encoding to JPEG would lose quality); every accepted file is known to decode
with the pipeline's decoder, which reads all six formats.

The prepared dataset is named folder_<folder name>_<8 hex digits>; the digits hash the
folder's absolute path, the options that change its content (on_bad_file, and for a class-
folders-only layout val_fraction and seed) and the sorted list of (relative path, size,
mtime) of its files. Adding, removing or touching a file therefore prepares a new copy on
next use; earlier copies stay in the data dir until deleted by hand. Within a process the
file list is read once and read again only when one of its folders changes (a file added,
removed or renamed); an image rewritten in place keeps the old copy until the next process.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
import stat
from typing import Callable, ClassVar, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from mvit2_jax.errors import ConfigError, DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
SPLIT_FOLDERS = ("train", "val", "validation", "test")
BAD_FILE_POLICIES = ("skip", "error")
NAME_PREFIX = "folder_"
FORMAT = 1  # part of every name hash: bump when a change to this module changes what is stored

_EXTENSIONS_TEXT = ", ".join(e[1:] for e in IMAGE_EXTENSIONS)
_CHECK_WINDOW = 256  # files read and decoded ahead of the TFDS writer


class FolderError(DataError):
    """A folder dataset's path or layout is unusable (one line, says what to change)."""


class BadImageError(DataError):
    """A bad file in a folder dataset prepared with on_bad_file="error"."""


@dataclasses.dataclass(frozen=True)
class FolderOptions:
    """How a folder becomes a dataset.

    val_fraction: share of each class that goes to "validation" when the folder has no split
        folders (ignored otherwise), in (0, 1).
    seed: which images the class-folders-only split puts into "validation".
    on_bad_file: "skip" (leave bad files out, log and record them) or "error" (fail).
    """

    val_fraction: float = 0.1
    seed: int = 0
    on_bad_file: str = "skip"

    def __post_init__(self):
        if (
            isinstance(self.val_fraction, bool)
            or not isinstance(self.val_fraction, (int, float))
            or not 0 < self.val_fraction < 1
        ):
            raise ConfigError(f"the folder validation fraction (config.data.folder_val_fraction) must be in (0, 1), e.g. 0.1, got {self.val_fraction!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"the folder split seed (config.data.folder_split_seed) must be an integer >= 0, got {self.seed!r}")
        if self.on_bad_file not in BAD_FILE_POLICIES:
            raise ConfigError(f"on_bad_file (config.data.bad_files) must be one of {', '.join(BAD_FILE_POLICIES)}, got {self.on_bad_file!r}")


def is_folder_dataset(name: str) -> bool:
    """Whether a dataset name is meant as a directory: it starts with "/", "~" or "." or
    names an existing directory through a path separator (TFDS names contain "/" too)."""
    if name.startswith(("/", "~", ".")):
        return True
    return ("/" in name or os.sep in name) and os.path.isdir(os.path.expanduser(name))


def resolve(path: str) -> str:
    """The absolute, symlink-free form of `path` that identifies a folder dataset."""
    return os.path.realpath(os.path.expanduser(os.fspath(path)))


_CLASSES: Dict[str, type] = {}  # one builder class per prepared-dataset name


def check(path: str, options: FolderOptions) -> None:
    """Raise the folder's path and layout errors now, before a run builds anything."""
    _source(_scan(_check_root(path)), options)


def builder(path: str, data_dir: Optional[str], options: FolderOptions) -> tfds.core.DatasetBuilder:
    """The TFDS builder of the folder dataset at `path` (prepared on first use by sources.load_split)."""
    root = _check_root(path)
    source = _source(_scan(root), options)
    cls = _CLASSES.get(source.name)
    if cls is None:
        cls = _CLASSES[source.name] = type(
            f"FolderImages_{source.name}",
            (FolderImages,),
            {"name": source.name, "SOURCE": source, "__module__": __name__},
            skip_registration=True,
        )
    return cls(data_dir=data_dir)


# ----------------------------------------------------------------------------- reading the folder


@dataclasses.dataclass(frozen=True)
class _Scan:
    """What is in a folder: classes, image files per split folder (or per class), other files."""

    root: str
    split_folders: bool  # ROOT/<split>/<class>/... rather than ROOT/<class>/...
    class_names: Tuple[str, ...]
    images: Mapping[str, Tuple[Tuple[str, int], ...]]  # split (or "" for no split folders) -> (path, label)
    other: Tuple[Tuple[str, str], ...]  # (path, reason): files in class folders that are not images
    fingerprint: str  # hash of the class names and every file's (path, size, mtime)
    folders: Tuple[Tuple[str, int], ...]  # every folder read, with its mtime: a change means read again


_SCANS: Dict[str, _Scan] = {}  # a cache of folder reads, refreshed when a folder changes


def _check_root(path: str) -> str:
    root = resolve(path)
    if not os.path.exists(root):
        raise FolderError(f"dataset folder {path} does not exist: give an existing directory or a TFDS dataset name")
    if not os.path.isdir(root):
        raise FolderError(
            f"dataset folder {path} is a file, not a directory: give the directory that holds one folder per class"
        )
    return root


def _hidden(name: str) -> bool:
    return name.startswith(".")


def _subfolders(path: str) -> Tuple[List[str], int]:
    """Sorted non-hidden sub-folder names and the folder's mtime."""
    with os.scandir(path) as it:
        names = sorted(e.name for e in it if not _hidden(e.name) and e.is_dir())
    return names, os.stat(path).st_mtime_ns


def _walk_class(root: str, class_dir: str, folders: List[Tuple[str, int]]) -> Iterator[Tuple[str, Optional[str], str]]:
    """(path relative to root, None or why it is not an image, stat line) for every file below
    `class_dir`, following links to folders once each; records the folders read."""
    seen = set()
    stack = [class_dir]
    while stack:
        folder = stack.pop()
        real = os.path.realpath(folder)
        if real in seen:  # a link back up the tree
            continue
        seen.add(real)
        folders.append((folder, os.stat(folder).st_mtime_ns))
        with os.scandir(folder) as it:
            entries = sorted((e for e in it if not _hidden(e.name)), key=lambda e: e.name)
        for entry in entries:
            rel = os.path.relpath(entry.path, root).replace(os.sep, "/")
            try:
                st = entry.stat()  # follows links
            except OSError:
                yield rel, "not a regular file (a broken link?)", f"{rel}\tbroken"
                continue
            if stat.S_ISDIR(st.st_mode):
                stack.append(entry.path)
            elif not stat.S_ISREG(st.st_mode):
                yield rel, "not a regular file", f"{rel}\tspecial"
            elif os.path.splitext(entry.name)[1].lower() not in IMAGE_EXTENSIONS:
                yield (
                    rel,
                    f"not an image file extension (images: {_EXTENSIONS_TEXT})",
                    f"{rel}\t{st.st_size}\t{st.st_mtime_ns}",
                )
            else:
                yield rel, None, f"{rel}\t{st.st_size}\t{st.st_mtime_ns}"


def _read_folder(root: str) -> _Scan:
    folders: List[Tuple[str, int]] = []
    top, mtime = _subfolders(root)
    folders.append((root, mtime))
    splits = [d for d in top if d in SPLIT_FOLDERS]
    if splits and len(splits) < len(top):
        others = ", ".join(d for d in top if d not in SPLIT_FOLDERS)
        raise FolderError(
            f"{root} mixes split folders ({', '.join(splits)}) with other folders ({others}): "
            f"move every class folder into a split folder, or rename classes called {'/'.join(SPLIT_FOLDERS)}"
        )
    if not top:
        raise FolderError(
            f"{root} has no class sub-folders: put images in {root}/<class>/ "
            f"(or in {root}/train/<class>/ and {root}/val/<class>/)"
        )
    classes_of: Dict[str, List[str]] = {}
    for split in splits or [""]:
        split_dir = os.path.join(root, split) if split else root
        if split:
            classes_of[split], mtime = _subfolders(split_dir)
            folders.append((split_dir, mtime))
            if not classes_of[split]:
                raise FolderError(
                    f"{split_dir} has no class sub-folders: put its images in {split_dir}/<class>/ or remove it"
                )
        else:
            classes_of[split] = top
    if "train" in classes_of:
        for split in splits:
            missing = sorted(set(classes_of[split]) - set(classes_of["train"]))
            if missing:
                raise FolderError(
                    f"{root}/{split}/{missing[0]} has no matching {root}/train/{missing[0]}: "
                    f"every class of {split} needs a train folder of the same name (rename or remove it)"
                )
        class_names = tuple(classes_of["train"])
    else:
        class_names = tuple(sorted(set().union(*classes_of.values())))
    label_of = {name: i for i, name in enumerate(class_names)}
    images: Dict[str, List[Tuple[str, int]]] = {}
    other: List[Tuple[str, str]] = []
    hasher = hashlib.sha256(json.dumps(class_names).encode())
    for split, classes in classes_of.items():
        images[split] = []
        for name in classes:
            for rel, problem, line in _walk_class(root, os.path.join(root, split, name), folders):
                hasher.update(line.encode() + b"\n")
                if problem:
                    other.append((rel, problem))
                else:
                    images[split].append((rel, label_of[name]))
        if not images[split]:
            where = f"{root}/{split}" if split else root
            raise FolderError(
                f"{where} has no images ({_EXTENSIONS_TEXT}) in its class folders: add images or remove it"
            )
    present = {label for files in images.values() for _, label in files}
    empty = [name for name in class_names if label_of[name] not in present]
    if empty:
        logging.warning(
            "Folder dataset %s: class folders with no images (they still get a label): %s", root, ", ".join(empty)
        )
    return _Scan(
        root=root,
        split_folders=bool(splits),
        class_names=class_names,
        images={k: tuple(v) for k, v in images.items()},
        other=tuple(sorted(other)),
        fingerprint=hasher.hexdigest(),
        folders=tuple(folders),
    )


def _unchanged(scan: _Scan) -> bool:
    try:
        return all(os.stat(path).st_mtime_ns == mtime for path, mtime in scan.folders)
    except OSError:
        return False


def _scan(root: str) -> _Scan:
    scan = _SCANS.get(root)
    if scan is None or not _unchanged(scan):
        scan = _SCANS[root] = _read_folder(root)
    return scan


# ----------------------------------------------------------------------------- splits


def _rank(seed: int, path: str) -> bytes:
    return hashlib.sha256(f"{seed}:{path}".encode()).digest()


def split_by_ratio(
    files: Sequence[Tuple[str, int]], num_classes: int, val_fraction: float, seed: int
) -> Dict[str, List[Tuple[str, int]]]:
    """Stratified {"train", "validation"} partition of (path, label) pairs.

    The validation split gets round(val_fraction * N) files: floor(val_fraction * n) of each
    class of n files, and one more for the classes with the largest remainders, never a
    class's last file. Within a class, the files with the smallest hash of (seed, path) go to
    validation, so a seed always gives the same split and adding a file moves at most one
    other file between the splits.
    """
    by_class: List[List[str]] = [[] for _ in range(num_classes)]
    for path, label in files:
        by_class[label].append(path)
    exact = [val_fraction * len(paths) for paths in by_class]
    counts = [math.floor(x) for x in exact]
    extra = math.floor(val_fraction * len(files) + 0.5) - sum(counts)
    candidates = sorted(
        (c for c in range(num_classes) if len(by_class[c]) - counts[c] >= 2), key=lambda c: (counts[c] - exact[c], c)
    )
    for c in candidates[: max(extra, 0)]:
        counts[c] += 1
    out: Dict[str, List[Tuple[str, int]]] = {"train": [], "validation": []}
    for label, paths in enumerate(by_class):
        ranked = sorted(paths, key=lambda p: _rank(seed, p))
        out["validation"] += [(p, label) for p in ranked[: counts[label]]]
        out["train"] += [(p, label) for p in ranked[counts[label] :]]
    return {split: sorted(pairs) for split, pairs in out.items()}


@dataclasses.dataclass(frozen=True)
class _Source:
    """Everything a folder builder needs: the files of each split, labels, options, name."""

    name: str
    root: str
    class_names: Tuple[str, ...]
    splits: Mapping[str, Tuple[Tuple[str, int], ...]]
    other: Tuple[Tuple[str, str], ...]
    options: FolderOptions
    fingerprint: str


def _slug(root: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "_", os.path.basename(root).lower()).strip("_")[:40]
    return slug + "_" if slug else ""


def _source(scan: _Scan, options: FolderOptions) -> _Source:
    if scan.split_folders:
        splits = dict(scan.images)
        identity = {"on_bad_file": options.on_bad_file}
    else:
        splits = split_by_ratio(scan.images[""], len(scan.class_names), options.val_fraction, options.seed)
        if not splits["validation"]:
            raise FolderError(
                f"{scan.root}: a validation fraction of {options.val_fraction} of {len(scan.images[''])} images "
                "leaves the validation split empty: raise the fraction or add images"
            )
        identity = dataclasses.asdict(options)
    identity.update(root=scan.root, fingerprint=scan.fingerprint, format=FORMAT)
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]
    return _Source(
        name=f"{NAME_PREFIX}{_slug(scan.root)}{digest}",
        root=scan.root,
        class_names=scan.class_names,
        splits={k: tuple(v) for k, v in splits.items()},
        other=scan.other,
        options=options,
        fingerprint=scan.fingerprint,
    )


# ----------------------------------------------------------------------------- checking images


def _check_image(root: str, path: str) -> Tuple[Optional[bytes], Optional[str]]:
    """(the file's bytes, None) when the pipeline's decoder reads it, else (None, why not)."""
    try:
        with open(os.path.join(root, path), "rb") as f:
            data = f.read()
    except OSError as e:
        return None, f"unreadable ({e.strerror or e})"
    if not data:
        return None, "empty file"
    try:
        tf.io.decode_image(data, channels=3, expand_animations=False)
    except (tf.errors.OpError, ValueError) as e:
        message = re.sub(r"\{\{.*?\}\}|\[Op:\w+\]", "", getattr(e, "message", str(e))).strip().splitlines()
        return None, f"not a decodable image ({message[0] if message else type(e).__name__})"
    return data, None


def _checked(root: str, items: Iterable, check: Callable = _check_image) -> Iterator:
    """`check(root, item)` of each item (by default `_check_image` of a path), in order, on a
    few threads (TF's decoders release the GIL)."""
    items = iter(items)
    with concurrent.futures.ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:
        pending = collections.deque(pool.submit(check, root, p) for p in itertools.islice(items, _CHECK_WINDOW))
        while pending:
            result = pending.popleft().result()
            for p in itertools.islice(items, 1):
                pending.append(pool.submit(check, root, p))
            yield result


# ----------------------------------------------------------------------------- the TFDS builder


class FolderImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of the per-folder builders that `builder` makes; prepares offline, never downloads."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    PREPARES_OFFLINE = True  # read by mvit2_jax.data.sources: safe to prepare on first use
    SOURCE: ClassVar[_Source]

    def _info(self) -> tfds.core.DatasetInfo:
        s = self.SOURCE
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"Images in {s.root}, one label per class folder.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3)),  # the original file's bytes
                    "label": tfds.features.ClassLabel(names=list(s.class_names)),
                    "file_name": tfds.features.Text(),  # relative to the folder
                }
            ),
            supervised_keys=("image", "label"),
            metadata=tfds.core.MetadataDict(
                root=s.root,
                fingerprint=s.fingerprint,
                options=dataclasses.asdict(s.options),
                skipped={},
                num_skipped=0,
            ),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> Dict[str, Iterator]:
        del dl_manager  # nothing to download
        self._skipped: Dict[str, str] = {}
        for path, reason in self.SOURCE.other:
            self._bad(path, reason)
        self._record_skipped()
        return {split: self._generate_examples(split, files) for split, files in self.SOURCE.splits.items()}

    def _bad(self, path: str, reason: str) -> None:
        root = self.SOURCE.root
        if self.SOURCE.options.on_bad_file == "error":
            raise BadImageError(
                f"{os.path.join(root, path)}: {reason}; fix or remove it, or skip bad files (on_bad_file='skip')"
            )
        logging.warning("Folder dataset %s: skipping %s: %s", root, path, reason)
        self._skipped[path] = reason

    def _record_skipped(self) -> None:
        self.info.metadata["skipped"] = dict(sorted(self._skipped.items()))  # saved with the dataset info
        self.info.metadata["num_skipped"] = len(self._skipped)

    def _generate_examples(self, split: str, files: Sequence[Tuple[str, int]]) -> Iterator[Tuple[str, Dict]]:
        root = self.SOURCE.root
        kept = 0
        for (path, label), (data, problem) in zip(files, _checked(root, (p for p, _ in files))):
            if problem:
                self._bad(path, problem)
                continue
            kept += 1
            yield path, {"image": data, "label": label, "file_name": path}
        if not kept:
            raise FolderError(
                f"{root}: every image of split {split!r} is bad ({len(files)} skipped): fix or replace them"
            )
        self._record_skipped()
        skipped = len(files) - kept
        if skipped:
            logging.warning("Folder dataset %s[%s]: %d of %d images skipped as bad", root, split, skipped, len(files))


