"""The on-disk cache of converted weights.

Dequantising a GGUF file takes tens of seconds; the converted float32 arrays
are stored once as safetensors, named by the SHA-256 of the source file, so a
later load of the same file takes seconds. Files are written to a temporary
name in the cache folder and renamed into place, so an interrupted write never
leaves a truncated cache entry.

The folder is `$GEMMA_LAB_CACHE`, else `$XDG_CACHE_HOME/gemma_lab`, else
`~/.cache/gemma_lab`.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import tempfile
from collections.abc import Mapping

import numpy as np
import safetensors.numpy


def cache_dir() -> pathlib.Path:
    """The folder holding converted weights (not created here)."""
    if "GEMMA_LAB_CACHE" in os.environ:
        return pathlib.Path(os.environ["GEMMA_LAB_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))
    return pathlib.Path(xdg) / "gemma_lab"


def file_digest(path: os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def chmod_as_new_file(path: os.PathLike) -> None:
    """Gives `path` the mode a plain `open` would: 0o666 less the umask.

    `tempfile.mkstemp` creates files readable by their owner only (0o600);
    an atomic write calls this before renaming the file into place.
    """
    umask = os.umask(0o022)  # reading the umask means setting it
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def atomic_write_bytes(data: bytes, path: os.PathLike) -> None:
    """Writes bytes through a temporary file and a rename.

    A reader sees either the old file or the complete new one, never a
    partial write, even when the process dies midway. The file gets the
    usual umask-respecting mode (e.g. 0o644), not mkstemp's 0o600.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        chmod_as_new_file(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_save(
    arrays: Mapping[str, np.ndarray],
    path: os.PathLike,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Writes a safetensors file through a temporary file and a rename."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        contiguous = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
        safetensors.numpy.save_file(
            contiguous, tmp, metadata=dict(metadata or {})
        )
        chmod_as_new_file(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_cached(
    digest: str, version: str
) -> tuple[dict[str, np.ndarray], dict] | None:
    """Returns (arrays, info) cached for a source digest, or None.

    A cache file that cannot be read is treated as absent.
    """
    path = cache_dir() / f"{digest}.safetensors"
    if not path.exists():
        return None
    try:
        with safetensors.safe_open(path, framework="numpy") as f:
            meta = f.metadata() or {}
            if meta.get("gemma_lab_cache") != version:
                return None
            arrays = {k: f.get_tensor(k) for k in f.keys()}
        return arrays, json.loads(meta.get("info", "{}"))
    except (OSError, ValueError, safetensors.SafetensorError):
        return None


def store_cached(
    digest: str, version: str, arrays: Mapping[str, np.ndarray], info: dict
) -> pathlib.Path:
    """Stores converted arrays for a source digest; returns the file path."""
    path = cache_dir() / f"{digest}.safetensors"
    meta = {"gemma_lab_cache": version, "info": json.dumps(info)}
    atomic_save(arrays, path, meta)
    return path
