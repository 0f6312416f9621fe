"""An image folder laid out ``root/[split/]class/image`` (the split level, ``train``/``val``/``test``, is
optional); a sample's id is its path relative to the folder, its label the class folder's name."""

from __future__ import annotations

import os
from pathlib import Path

from ..data import IMAGE_EXTENSIONS, SPLITS, is_image_file
from ..errors import PipelineError
from . import Columns, ImageSource, register_source, source_name


@register_source("folder", "root/[split/]class/image", claims=lambda path: path.is_dir())
def list_folder(root: Path, allow_outside_root: bool) -> ImageSource:
    subdirs = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    has_splits = bool(subdirs) and all(d in SPLITS for d in subdirs)
    listing = Columns()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = Path(dirpath).relative_to(root).parts
        split = rel_dir[0] if has_splits and rel_dir else ""
        class_parts = rel_dir[1:] if has_splits else rel_dir
        label = class_parts[0] if class_parts else ""
        prefix = "/".join(rel_dir)
        for name in sorted(filenames):
            if is_image_file(Path(name)):
                listing.add(f"{prefix}/{name}" if prefix else name, label, split)
    if not len(listing):
        raise PipelineError(f"no images found under {root} (expected {root}/[split/]class/image with extensions "
                            f"{', '.join(sorted(IMAGE_EXTENSIONS))})")
    ids, labels, splits = listing.arrays()
    return ImageSource(source_name(root), root, ids, labels, splits, lambda i: root / ids[i])
