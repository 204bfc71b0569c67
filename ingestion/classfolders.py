"""Class-folder trees (the ImageFolder layout: ``root/<class>/<image>``): captions and labels from folder names.

``reco ingest DIR --caption-template "a photo of a {folder}."`` captions every image that has no caption of
its own from the name of the folder it lies in (``_`` read as a space) and labels it with that folder's
index among the tree's class folders (sorted by name, as torchvision's ImageFolder does). The class names
are written to ``<data dir>/datasets/<dataset>/classes.txt``: the items' labels get their names back, and
the dataset becomes a class set on the Predict page.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from app.config import Settings
from app.manifest import InputRow, printable

PLACEHOLDER = "{folder}"
MAX_TEMPLATE = 200


class TemplateError(ValueError):
    """A caption template that is not usable."""


def check_template(template: str) -> str:
    """The template must hold ``{folder}`` and no other braces (it is filled by replacement, never format())."""
    if len(template) > MAX_TEMPLATE:
        raise TemplateError(f"the caption template is longer than {MAX_TEMPLATE} characters")
    if PLACEHOLDER not in template:
        raise TemplateError(f"the caption template must contain {PLACEHOLDER}, e.g. 'a photo of a {{folder}}.'")
    if re.search(r"[{}]", template.replace(PLACEHOLDER, "")):
        raise TemplateError(f"the caption template may hold no braces other than {PLACEHOLDER}")
    return template


def class_name(folder: str) -> str:
    return printable(folder).replace("_", " ").strip()


def class_folders(root: Path, suffixes: frozenset[str] | None = None) -> list[str]:
    """The names of the folders that hold images directly, sorted (names only: no image is read)."""
    from ingestion.sources import IMAGE_SUFFIXES

    wanted = suffixes or IMAGE_SUFFIXES
    found: set[str] = set()
    for directory, _, files in os.walk(root):
        if Path(directory) != root and any(os.path.splitext(f)[1].lower() in wanted for f in files):
            found.add(Path(directory).name)
    return sorted(found)


def write_classes(settings: Settings, dataset: str, names: list[str]) -> Path:
    folder = Path(settings.data_dir) / "datasets" / re.sub(r"[^A-Za-z0-9_.-]+", "_", dataset).strip("._")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "classes.txt"
    path.write_text("\n".join(names) + "\n", encoding="utf-8")
    return path


def caption_from_folders(rows: Iterator[InputRow], root: Path, settings: Settings, template: str, *,
                         dataset: str | None = None) -> Iterator[InputRow]:
    """``rows`` with an empty caption captioned (and labelled) from their folder; others pass unchanged."""
    check_template(template)
    folders = class_folders(root) if root.is_dir() else []
    index = {name: i for i, name in enumerate(folders)}
    if folders:
        write_classes(settings, dataset or printable(root.resolve().name), [class_name(f) for f in folders])
    for row in rows:
        if row.problem is None and row.path is not None and not row.caption.strip():
            folder = Path(row.source).parent.name
            label = row.label if row.label is not None else index.get(folder)
            row = replace(row, caption=template.replace(PLACEHOLDER, class_name(folder)), label=label)
        yield row
