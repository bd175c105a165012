"""Output paths: user-given names as safe file names, output folders checked before the work starts, and atomic
writes (a reader sees the whole new file or the old one, never half of it).

Light on purpose (standard library only): the commands call these before they import torch or load a model,
so that a bad ``--out`` fails in a second, not after minutes of fine-tuning or sampling.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import unicodedata
from collections.abc import Iterator
from pathlib import Path

TMP_PREFIX = ".tmp-"  # temp files of atomic writes; one left behind means a write was killed

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_filename(name: str, fallback: str = "model", max_length: int = 100) -> str:
    """``name`` as one file-name component that stays inside the folder it is joined to.

    Every run of characters other than ASCII letters, digits, ``.``, ``_`` and ``-`` becomes ``_`` (so path
    separators, ``..`` and control characters cannot survive), leading and trailing ``.``/``_``/``-`` are dropped
    (no hidden files, no ``..``), the result is cut to ``max_length`` characters, and an empty result becomes
    ``fallback``. ``"../escaped"`` -> ``"escaped"``, ``"SLA (95%)"`` -> ``"SLA_95"``.
    """
    text = unicodedata.normalize("NFKC", str(name))
    text = _UNSAFE.sub("_", text).strip("._-")[:max_length].strip("._-")
    return text or fallback


def unique_filenames(names, reserved=()) -> list[str]:
    """:func:`safe_filename` of each name, made distinct from each other and from ``reserved`` by a ``_2``,
    ``_3``, ... suffix (two rows called ``a/b`` and ``a_b`` must not overwrite each other's files)."""
    taken = {r.lower() for r in reserved}  # case-insensitive: macOS and Windows file systems are
    out = []
    for name in names:
        base = safe_filename(name)
        candidate, i = base, 1
        while candidate.lower() in taken:
            i += 1
            candidate = f"{base}_{i}"
        taken.add(candidate.lower())
        out.append(candidate)
    return out


def prepare_output_dir(path: str | os.PathLike, flag: str) -> Path:
    """Create the output folder ``path`` (with parents) and check that a file can be written in it.

    Call it before any heavy work. Raises ``ValueError`` naming ``flag`` (e.g. ``"--out"``) when ``path`` is
    a file, cannot be created, or is not writable. Returns the folder as a ``Path``.
    """
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{flag} {os.fspath(path)!r} is a file, not a folder; pass a folder path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{flag} {os.fspath(path)!r} cannot be created ({e.strerror or e}); pass a folder you can "
                         f"write to") from None
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".tmp-write-check-"):
            pass
    except OSError as e:
        raise ValueError(f"{flag} {os.fspath(path)!r} is not writable ({e.strerror or e}); pass a folder you can "
                         f"write to") from None
    return folder


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, tmp_name: str | None = None) -> Iterator[Path]:
    """``with atomic_path(path) as tmp: write(tmp)`` writes ``path`` atomically.

    ``tmp`` is a file beside ``path`` (same folder, so the rename cannot cross file systems), named
    ``.tmp-<pid>-<name>`` unless ``tmp_name`` is given. After the block the file is fsynced (its bytes must be on
    disk before the rename makes them visible) and renamed to ``path``; if the block raises, the temp file is
    removed and the error propagates. The folder must exist.
    """
    path = Path(path)
    tmp = path.with_name(tmp_name or f"{TMP_PREFIX}{os.getpid()}-{path.name}")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (:func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
