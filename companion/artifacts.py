"""Artifacts shared between notebooks, keyed by the config that made them.

A notebook that needs something an earlier section trains (a tokenizer, a vision encoder)
asks :func:`cached_artifact` for it. The artifact lives in ``cache_dir/NAME-HASH/`` where
HASH is a digest of the JSON-serialised config, so a smoke-sized artifact is never reused by
a default run. A folder is written under a temporary name and renamed into place only when
complete, with a manifest recording the config and a checksum of every file, so an
interrupted build never leaves something that looks finished. A folder whose files do not
match their manifest is reported, discarded and rebuilt, never loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

MANIFEST = "artifact.json"


def config_key(config: dict[str, Any]) -> str:
    """Short stable digest of a JSON-serialisable config (key order does not matter)."""
    try:
        text = json.dumps(config, sort_keys=True, separators=(",", ":"))
    except TypeError as exc:
        raise TypeError(f"artifact config must be JSON-serialisable: {exc}") from exc
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _file_digests(folder: Path) -> dict[str, str]:
    digests = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            digests[path.relative_to(folder).as_posix()] = hashlib.sha256(
                path.read_bytes()).hexdigest()
    return digests


def verify_artifact(folder: str | os.PathLike) -> str | None:
    """``None`` if ``folder`` is a complete, intact artifact, else a reason why not."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return f"{manifest} is missing (an interrupted build?)"
    try:
        recorded = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as exc:
        return f"{manifest} is unreadable ({exc})"
    actual = _file_digests(folder)
    if set(actual) != set(recorded):
        missing = sorted(set(recorded) - set(actual))
        extra = sorted(set(actual) - set(recorded))
        return f"{folder}: files differ from the manifest (missing {missing}, extra {extra})"
    for name, digest in recorded.items():
        if actual[name] != digest:
            return f"{folder / name}: checksum differs from the manifest (corrupted)"
    return None


def artifact_path(cache_dir: str | os.PathLike, name: str, config: dict[str, Any]) -> Path:
    return Path(cache_dir) / f"{name}-{config_key(config)}"


def cached_artifact(
    cache_dir: str | os.PathLike,
    name: str,
    config: dict[str, Any],
    build: Callable[[Path], None],
    *,
    log: Callable[[str], None] | None = print,
) -> Path:
    """Return the folder of artifact ``name`` for ``config``, building it if needed.

    ``build(folder)`` writes the artifact's files into an empty temporary folder; it is
    renamed into place with a manifest only after ``build`` returns.
    """
    final = artifact_path(cache_dir, name, config)
    if final.exists():
        problem = verify_artifact(final)
        if problem is None:
            if log:
                log(f"loaded {name} from the cache ({final.name})")
            return final
        warnings.warn(f"discarding a broken cached artifact: {problem}; rebuilding it",
                      stacklevel=2)
        shutil.rmtree(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        if log:
            log(f"building {name} (not in the cache yet)")
        build(tmp)
        manifest = {"name": name, "config": config, "files": _file_digests(tmp)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        try:
            os.replace(tmp, final)
        except OSError:
            # Another process finished the same artifact first: keep theirs if intact.
            if verify_artifact(final) is not None:
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
