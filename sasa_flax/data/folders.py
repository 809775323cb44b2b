"""The ``"folder"`` source: ``data_dir/<class>/*.{jpg,png,...}``, or
``data_dir/train/<class>`` with ``data_dir/val`` (or ``valid``/``validation``/``test``)
beside it. ``data_dir`` is local, gs:// (scanned in one object listing, sizes included) or
any URL tf.io.gfile reads. Without an evaluation folder a fixed 10% is held out.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os

import numpy as np

from sasa_flax.data.sources import register_source, tuning_holdout
from sasa_flax.data.splits import Dataset, DatasetError, file_split
from sasa_flax.paths import local_path_made_absolute
from sasa_flax.quiet_tensorflow import tf

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif"}
# Folder names of the evaluation split, beside train/ (the first found).
EVAL_FOLDERS = ("val", "valid", "validation", "test")


@dataclasses.dataclass(frozen=True)
class FolderTree:
    """Every file under a folder with its size, from one scan: ``files`` maps the path
    relative to the root ("cat/1.jpg") to bytes; ``dirs`` holds every directory's
    relative path ("cat", "train/cat"), the root excluded."""

    root: str
    files: dict[str, int]
    dirs: frozenset[str]

    def subfolders(self, folder: str = "") -> list[str]:
        """Names of ``folder``'s immediate subfolders, sorted."""
        prefix = f"{folder}/" if folder else ""
        return sorted(
            d[len(prefix) :]
            for d in self.dirs
            if d.startswith(prefix) and "/" not in d[len(prefix) :]
        )

    def files_under(self, folder: str) -> list[str]:
        """Relative paths of every file under ``folder`` (any depth), sorted."""
        return sorted(f for f in self.files if f.startswith(f"{folder}/"))

    def path(self, relative: str) -> str:
        return f"{self.root.rstrip('/')}/{relative}" if relative else self.root


def _with_parents(files, dirs=()) -> frozenset[str]:
    found = set(dirs)
    for f in files:
        parts = f.split("/")[:-1]
        found.update("/".join(parts[: i + 1]) for i in range(len(parts)))
    return frozenset(found)


def scan_folder(root: str) -> FolderTree | None:
    """The tree under ``root`` (a local path, gs:// or any URL tf.io.gfile reads), or
    None if it is not a directory. gs:// is one object listing (sizes included: a
    request per 1,000 objects, not one per file); a local folder is walked; any other
    URL is walked by tf.io.gfile with one size request per file."""
    if root.startswith("gs://"):
        listed = _list_gcs(root)
        if listed is not None:
            return FolderTree(root, listed, _with_parents(listed)) if listed else None
    if "://" not in root:
        if not os.path.isdir(root):
            return None
        files, dirs = {}, []
        for here, subdirs, names in os.walk(root, followlinks=True):
            rel = os.path.relpath(here, root)
            base = "" if rel == "." else rel.replace(os.sep, "/") + "/"
            dirs += [base + d for d in subdirs]
            for name in names:
                files[base + name] = os.path.getsize(os.path.join(here, name))
        return FolderTree(root, files, _with_parents(files, dirs))
    if not tf.io.gfile.isdir(root):
        return None
    files, dirs = {}, []
    for here, subdirs, names in tf.io.gfile.walk(root):
        rel = here[len(root.rstrip("/")) :].strip("/")
        base = f"{rel}/" if rel else ""
        dirs += [base + d.rstrip("/") for d in subdirs]
        for name in names:
            files[base + name] = tf.io.gfile.stat(f"{here.rstrip('/')}/{name}").length
    return FolderTree(root, files, _with_parents(files, dirs))


def _list_gcs(root: str) -> dict[str, int] | None:
    """{relative path: size} of every object under gs:// ``root`` in one listing, or
    None if google-cloud-storage cannot be used here (then tf.io.gfile walks it)."""
    try:
        from google.cloud import storage

        bucket, _, prefix = root[len("gs://") :].partition("/")
        prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        client = storage.Client(project=os.environ.get("GOOGLE_CLOUD_PROJECT") or "unused")
        blobs = client.list_blobs(bucket, prefix=prefix)
        return {b.name[len(prefix) :]: int(b.size or 0) for b in blobs if not b.name.endswith("/")}
    except Exception as e:  # noqa: BLE001 - no credentials, no package: the slow way
        logging.getLogger(__name__).warning(
            "listing %s with google-cloud-storage failed (%s: %s); walking it with "
            "tf.io.gfile, one request per file",
            root,
            type(e).__name__,
            e,
        )
        return None


# Folders that archive tools and operating systems leave beside the data: never classes.
STRAY_FOLDERS = ("__MACOSX",)


def _is_stray(folder: str) -> bool:
    """A hidden or archive folder (``STRAY_FOLDERS``): never a class, never data."""
    return folder.startswith(".") or folder in STRAY_FOLDERS


def _is_image(relative: str) -> bool:
    return os.path.splitext(relative)[1].lower() in IMAGE_EXTENSIONS


def _class_folders(tree: FolderTree, split_name: str) -> list[str]:
    """The class folders of a split folder, sorted: hidden folders and ``__MACOSX`` are
    skipped (said once); a class folder without one image is refused, naming it, since it
    would train a class that can never be seen."""
    found = tree.subfolders(split_name)
    stray = [n for n in found if _is_stray(n)]
    if stray:
        logging.getLogger(__name__).info(
            "%s: skipped %s (hidden or archive folders, not classes)",
            tree.path(split_name),
            ", ".join(stray),
        )
    classes = [n for n in found if n not in stray]
    prefix = f"{split_name}/" if split_name else ""
    with_images = {  # one pass over the scan (files_under per class would be classes ×)
        f[len(prefix) :].split("/", 1)[0]
        for f in tree.files
        if f.startswith(prefix) and _is_image(f) and "/" in f[len(prefix) :]
    }
    empty = [n for n in classes if n not in with_images]
    if empty and len(empty) < len(classes):  # none with images: "no images under" later
        raise DatasetError(
            f"{tree.path(split_name)} has class folder(s) without images "
            f"({', '.join(sorted(IMAGE_EXTENSIONS))}): {', '.join(empty)}. Remove them or "
            "add their images; every class folder is a class the model must predict."
        )
    return classes


def _say_what_is_left_out(tree: FolderTree, classes, train_name: str, eval_name) -> None:
    """One warning line for each thing the folder holds that the dataset leaves out, so
    that nothing is dropped silently: files that are not images (by extension), and
    classes the evaluation folder lacks or has beyond the training folder's."""
    log = logging.getLogger(__name__)
    ignored = sorted(
        f
        for f in tree.files
        if not _is_image(f) and not any(_is_stray(p) for p in f.split("/")[:-1])
    )
    if ignored:
        shown = ", ".join(ignored[:5]) + (
            f" and {len(ignored) - 5} more" if len(ignored) > 5 else ""
        )
        log.warning(
            "%s: ignored %d file(s) that are not images (%s): %s",
            tree.root,
            len(ignored),
            "/".join(sorted(IMAGE_EXTENSIONS)),
            shown,
        )
    if eval_name is None:
        return
    evaluated = {n for n in tree.subfolders(eval_name) if not _is_stray(n)}
    lacking = [n for n in classes if n not in evaluated]
    if lacking:
        log.warning(
            "%s has no folder for %d class(es) that %s has: %s; the evaluation never tests them",
            tree.path(eval_name),
            len(lacking),
            tree.path(train_name),
            ", ".join(lacking),
        )
    extra = sorted(evaluated - set(classes))
    if extra:
        log.warning(
            "%s has class folder(s) that %s lacks: %s; the model cannot predict them, so "
            "their images are left out of the evaluation",
            tree.path(eval_name),
            tree.path(train_name),
            ", ".join(extra),
        )


@register_source("folder")
def _folder(input_config, process_index, process_count) -> Dataset:
    root = local_path_made_absolute(str(input_config.data_dir))
    root = root.rstrip("/") or root
    tree = scan_folder(root)
    if tree is None:
        raise DatasetError(
            f"config.input.data_dir={root!r} is not a directory; point it at a folder "
            "with one subfolder of images per class (local, or gs://bucket/path)."
        )
    top = set(tree.subfolders())
    eval_name = next((n for n in EVAL_FOLDERS if n in top), None)
    train_name = "train" if eval_name is not None and "train" in top else ""
    train_dir = tree.path(train_name)
    classes = _class_folders(tree, train_name)
    split_like = sorted(set(classes) & {"train", *EVAL_FOLDERS})
    if split_like:
        raise DatasetError(
            f"{train_dir} has class folder(s) named like splits: {split_like}. Lay the data "
            "out as data_dir/<class>/<images>, or as data_dir/train/<class>/<images> beside "
            f"data_dir/<{'|'.join(EVAL_FOLDERS)}>/<class>/<images>."
        )
    if len(classes) < 2:
        raise DatasetError(
            f"{train_dir} has {len(classes)} class subfolder(s); a classifier needs at least "
            "two: data_dir/<class_name>/<image files>."
        )

    if process_index == 0:
        _say_what_is_left_out(tree, classes, train_name, eval_name)

    def listing(split_name):
        files, labels = [], []
        for label, name in enumerate(classes):
            folder = f"{split_name}/{name}" if split_name else name
            for f in tree.files_under(folder):
                if _is_image(f):
                    files.append(f)
                    labels.append(label)
        return np.array(files, dtype=object), np.array(labels, np.int32)

    def images_of(split_name):
        files, labels = listing(split_name)
        if len(files) == 0:
            where = tree.path(split_name)
            raise DatasetError(
                f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {where}/<class>/."
            )
        return files, labels

    def checked(files, labels, which):
        # Checked from the scan's sizes when the split is built (make_setup builds both
        # before any training): an empty file fails now, not when an evaluation reads it.
        empty = [tree.path(f) for f in files if tree.files[f] == 0]
        if empty and input_config.corrupt_images == "fail":
            raise DatasetError(
                f"{len(empty)} empty (0-byte) image file(s) under {root}: "
                f"{', '.join(empty[:5])}{', ...' if len(empty) > 5 else ''}. Replace or remove "
                "them, or set config.input.corrupt_images='skip' to skip them."
            )
        name = f"the {which} split of {root}"
        return file_split([tree.path(f) for f in files], labels, name)

    if eval_name is not None and not input_config.tuning_split:  # two folders, two splits
        return Dataset(
            lambda: checked(*images_of(train_name), "training"),
            lambda: checked(*images_of(eval_name), "evaluation"),
            len(classes),
        )

    @functools.cache
    def carved():  # the evaluation split is carved out of the training folder
        files, labels = images_of(train_name)
        eval_files = eval_labels = None
        if eval_name is None:  # the evaluation split: a fixed 10%
            order = np.random.default_rng(0).permutation(len(files))
            cut = len(files) - max(1, len(files) // 10)
            eval_files, eval_labels = files[order[cut:]], labels[order[cut:]]
            files, labels = files[order[:cut]], labels[order[:cut]]
        if input_config.tuning_split:  # the tuning split: 4% of what is left to train on
            kept, held = tuning_holdout(labels)
            eval_files, eval_labels = files[held], labels[held]
            files, labels = files[kept], labels[kept]
        return (
            checked(files, labels, "training"),
            checked(eval_files, eval_labels, "evaluation"),
        )

    return Dataset(lambda: carved()[0], lambda: carved()[1], len(classes))
