"""Recipes: a spec and what re-running it needs, as one ``.recipe.tar.gz`` (``caspec pack`` / ``unpack``).

A recipe holds the spec, its lock, the review manifests beside it, and every file a step reads (root
images, asset folders named by path, a CLIP checkpoint), at their paths relative to the spec's folder, plus
``recipe.json``: the format version, the spec's file name, each file's sha256 and size, and the identities
of what it leaves out (the model's, from the lock). It never holds a store or model weights. The archive is
byte-for-byte reproducible (sorted members, zero times and owners).

Unpacking trusts nothing: an absolute path, a ``..`` part, any link, a device or other special file, a
member over :data:`MAX_MEMBER_BYTES` or a recipe over :data:`MAX_TOTAL_BYTES` or :data:`MAX_MEMBERS` is
refused with a :class:`~caspec.errors.RecipeError` as its header is read (headers are streamed, so a recipe of
millions of empty members costs nothing) and before anything is written; extraction then uses tarfile's
``data`` filter as a second guard, into a temporary folder where each file is checked against ``recipe.json``
before the folder becomes the target: a failed unpack leaves nothing behind.
"""
from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import tarfile
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import RecipeError

FORMAT = 1
SUFFIX = ".recipe.tar.gz"
MAX_MEMBER_BYTES = 1 << 30
MAX_TOTAL_BYTES = 4 << 30
MAX_MEMBERS = 10_000


def recipe_files(plan: Any, lock_file: Path) -> dict[str, Path]:
    """Archive name -> file for ``plan``'s spec: the spec, its lock, review manifests, step inputs."""
    loaded = plan.loaded
    base = loaded.dir.resolve()
    files: dict[str, Path] = {loaded.path.name: loaded.path, lock_file.name: lock_file}
    for node in plan.order():
        wanted = list(node.inputs.values())
        if node.gate is not None and Path(node.gate.manifest).is_file():
            wanted.append(Path(node.gate.manifest))
        for path in wanted:
            path = Path(path).resolve()
            try:
                rel = path.relative_to(base)
            except ValueError:
                raise RecipeError(f"step `{node.id}` reads `{path}`, outside the spec's folder `{base}`",
                                  hint="move it beside the spec (a recipe holds files at their paths relative "
                                       "to the spec)") from None
            if not path.is_file():
                raise RecipeError(f"step `{node.id}` reads `{path}`, which does not exist")
            files[rel.as_posix()] = path
    return dict(sorted(files.items()))


def pack(plan: Any, lock: dict[str, Any], lock_file: Path, out: Path) -> dict[str, Any]:
    """Write the recipe of ``plan`` to ``out``; returns its ``recipe.json``."""
    from .fsutil import atomic_write_bytes
    from .store.hashing import sha256_file

    files = recipe_files(plan, lock_file)
    manifest = {"format": FORMAT, "spec": plan.loaded.path.name, "caspec": lock.get("caspec"),
                "model": lock.get("model"), "environment": lock.get("environment"),
                "files": {name: {"sha256": sha256_file(p), "size": p.stat().st_size} for name, p in files.items()}}
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, filename="") as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            _add(tar, "recipe.json", (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
            for name, path in files.items():
                _add(tar, name, path.read_bytes())
    atomic_write_bytes(out, buf.getvalue())
    return manifest


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    tar.addfile(info, io.BytesIO(data))


def check_member(info: tarfile.TarInfo, *, max_bytes: int = MAX_MEMBER_BYTES) -> None:
    """Refuse a member that could write outside the target or is not a plain file or folder."""
    name = info.name
    parts = PurePosixPath(name).parts
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or not parts:
        raise RecipeError(f"member `{name}`: an absolute path", hint="a recipe holds relative paths only")
    if ".." in parts or "\\" in name:
        raise RecipeError(f"member `{name}`: a `..` path would write outside the target",
                          hint="this archive was not written by `caspec pack`; do not unpack it")
    if info.issym() or info.islnk():
        raise RecipeError(f"member `{name}`: a {'symbolic' if info.issym() else 'hard'} link to `{info.linkname}`",
                          hint="a recipe holds plain files only")
    if not (info.isfile() or info.isdir()):
        raise RecipeError(f"member `{name}`: a device or other special file", hint="a recipe holds plain files only")
    if info.size > max_bytes:
        raise RecipeError(f"member `{name}`: {info.size} bytes, over the limit of {max_bytes}")


def unpack(archive: Path, target: Path, *, max_member_bytes: int = MAX_MEMBER_BYTES,
           max_total_bytes: int = MAX_TOTAL_BYTES) -> Path:
    """Unpack ``archive`` into ``target`` (created; must be empty if it exists). Returns the spec's path.

    Members are read one header at a time and refused as soon as one breaks a rule or a limit is passed;
    the files are extracted into a temporary folder beside ``target`` and checked against ``recipe.json``
    there, and only a verified folder becomes ``target``: on any failure nothing is left behind."""
    if target.exists() and any(target.iterdir()):
        raise RecipeError(f"`{target}` is not empty", hint="unpack into a new folder")
    try:
        tar = tarfile.open(archive, mode="r:gz")
    except (OSError, tarfile.TarError) as exc:
        raise RecipeError(f"{archive}: not a recipe ({exc})") from None
    with tar:
        members = _members(tar, archive, max_member_bytes, max_total_bytes)
        names = {m.name for m in members}
        if "recipe.json" not in names:
            raise RecipeError(f"{archive}: no recipe.json", hint="write recipes with `caspec pack`")
        manifest = _read_manifest(tar, archive)
        extra = names - set(manifest["files"]) - {"recipe.json"}
        if extra:
            raise RecipeError(f"{archive}: members not listed in recipe.json: {', '.join(sorted(extra)[:3])}")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.unpack-", dir=target.parent))
        try:
            tar.extractall(tmp, members=members, filter="data")
            _verify(tmp, manifest, archive)
            if target.exists():
                target.rmdir()  # empty (checked above)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target / manifest["spec"]


def _members(tar: tarfile.TarFile, archive: Path, max_member_bytes: int, max_total_bytes: int) -> list[tarfile.TarInfo]:
    """The archive's members, read header by header and checked as they come: the first bad member, the
    :data:`MAX_MEMBERS` + 1-th member or the byte that passes ``max_total_bytes`` stops the reading."""
    members: list[tarfile.TarInfo] = []
    total = 0
    try:
        while True:
            info = tar.next()
            if info is None:
                return members
            if len(members) >= MAX_MEMBERS:
                raise RecipeError(f"{archive}: more than {MAX_MEMBERS} members, over the limit")
            check_member(info, max_bytes=max_member_bytes)
            total += info.size
            if total > max_total_bytes:
                raise RecipeError(f"{archive}: over the limit of {max_total_bytes} bytes unpacked")
            members.append(info)
    except (OSError, tarfile.TarError, EOFError) as exc:
        raise RecipeError(f"{archive}: a damaged archive ({exc})") from None


def _read_manifest(tar: tarfile.TarFile, archive: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(tar.extractfile("recipe.json").read().decode("utf-8"))
    except (ValueError, AttributeError, KeyError) as exc:
        raise RecipeError(f"{archive}: recipe.json is not valid ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict) \
            or not isinstance(manifest.get("spec"), str):
        raise RecipeError(f"{archive}: recipe.json is not a caspec recipe of format {FORMAT}")
    return manifest


def _verify(target: Path, manifest: dict[str, Any], archive: Path) -> None:
    from .store.hashing import sha256_file

    for name, entry in manifest["files"].items():
        path = target / name
        if not path.is_file() or sha256_file(path) != entry.get("sha256"):
            raise RecipeError(f"{archive}: `{name}` does not match its digest in recipe.json",
                              hint="the archive is damaged or was edited")


def default_target(archive: Path) -> Path:
    """``lib.recipe.tar.gz`` -> ``lib/`` beside it."""
    name = archive.name[: -len(SUFFIX)] if archive.name.endswith(SUFFIX) else archive.name.split(".")[0]
    return archive.parent / name


__all__ = ["FORMAT", "SUFFIX", "recipe_files", "pack", "unpack", "open_recipe", "check_member", "default_target"]


def open_recipe(archive: Path) -> Path:
    """The spec of the recipe ``archive``, unpacked beside it (:func:`default_target`) on first use; a
    folder already unpacked from this same recipe is used as it is."""
    target = default_target(archive)
    if (target / "recipe.json").is_file():
        try:
            with tarfile.open(archive, mode="r:gz") as tar:
                member = tar.extractfile("recipe.json")
                same = member is not None and member.read() == (target / "recipe.json").read_bytes()
        except (OSError, tarfile.TarError, KeyError):
            same = False
        if same:
            manifest = json.loads((target / "recipe.json").read_text())
            _verify(target, manifest, archive)
            return target / manifest["spec"]
    return unpack(archive, target)
