"""Artifact directories: written into a temporary sibling and renamed into place, never half-done."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import lzma
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from slimgraph.errors import OutputExistsError, OutputPathError

VERSIONED_PACKAGES = ("slimgraph", "onnx", "onnx-ir", "onnxscript", "onnxruntime", "numpy", "torch")

MANIFEST = "manifest.json"


@contextlib.contextmanager
def staged_dir(out: Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``out``; on success it replaces ``out``, on error it vanishes.

    A killed process leaves only a dot-prefixed ``.<name>.tmp-*`` sibling, never a partial ``out``.
    """
    out = check_output_path(out, force=force, kind="output directory")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the artifact is an ordinary dir
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "replaced")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def check_output_path(out: str | Path, *, force: bool = False, kind: str = "output") -> Path:
    """``out`` as a Path whose parent exists (created if missing) as a directory, refused with one
    line when it cannot be written: it exists (without ``force``), is a dangling symlink, has no
    name, or a component of its parent is a file."""
    out = Path(out)
    if out.name in ("", ".", ".."):
        raise OutputPathError(f"{out}: not a usable {kind} path")
    if out.is_symlink() and not out.exists():
        raise OutputPathError(f"{out}: {kind} is a dangling symlink; remove it or choose another path")
    if out.exists() and not force:
        raise OutputExistsError(f"{out}: {kind} exists; pass --force to replace it")
    if out.exists() and out.is_dir() != (kind == "output directory"):
        raise OutputPathError(f"{out}: exists and is {'a folder' if out.is_dir() else 'a file'}; "
                              f"--force replaces an {kind} only")
    for parent in (out.parent, *out.parent.parents):
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise OutputPathError(f"{out}: {parent} is not a directory")
            break
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputPathError(f"{out}: cannot create its folder ({exc.strerror})") from exc
    return out


@contextlib.contextmanager
def staged_file(out: str | Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling path of the file ``out``; on success it is renamed onto ``out``,
    on error it vanishes (the one-file twin of ``staged_dir``)."""
    out = check_output_path(out, force=force, kind="output file")
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", suffix=out.suffix, dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_hashes(root: Path, exclude: tuple[str, ...] = (MANIFEST,)) -> dict[str, str]:
    """sha256 of every file under ``root`` (relative POSIX paths, sorted)."""
    return {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.relative_to(root).as_posix() not in exclude
    }


def write_json(path: Path, data: Any, indent: int = 2) -> None:
    """Deterministic JSON: sorted keys, fixed indent, trailing newline. Every JSON file slimgraph
    writes goes through here."""
    path.write_text(json.dumps(data, indent=indent, sort_keys=True, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return obj.as_posix()
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


PACKED = "model.onnx.xz"
UNPACK = "xz -dk model.onnx.xz"
PACK_PRESET = 9 | lzma.PRESET_EXTREME  # xz preset 9, extreme


def pack_model(root: Path, model_file: str, stored_weights: bytes,
               dense_weight_bytes: int) -> dict[str, Any]:
    """Write ``model_file`` entropy-coded as ``model.onnx.xz`` and return the size facts.

    xz (LZMA2 at preset 9, extreme): it is in Python's standard library and on every system
    (``xz -dk`` unpacks it), and for a file compressed once and unpacked once its ratio beats
    zstd's. ``stored_weights`` (the initializers' bytes as stored) are compressed alone with the
    same settings to give the bytes the weights take packed, as Deep Compression counts them.
    """
    preset = PACK_PRESET
    data = (root / model_file).read_bytes()
    packed = lzma.compress(data, preset=preset)
    (root / PACKED).write_bytes(packed)
    packed_weights = len(lzma.compress(stored_weights, preset=preset))
    return {
        "file": PACKED, "codec": "xz (LZMA2, preset 9e)", "unpack": UNPACK,
        "dense_fp32_weight_bytes": dense_weight_bytes,
        "stored_weight_bytes": len(stored_weights),
        "graph_overhead_bytes": len(data) - len(stored_weights),
        "model_onnx_bytes": len(data),
        "packed_bytes": len(packed),
        "packed_weight_bytes": packed_weights,
        "weight_compression": round(dense_weight_bytes / max(packed_weights, 1), 2),
        "file_compression": round(dense_weight_bytes / max(len(packed), 1), 2),
    }


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions
