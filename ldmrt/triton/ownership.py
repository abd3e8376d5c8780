"""Which model folders of a shared Triton model repository ldmrt wrote, and whether they still hold
only that.

A model repository is shared by many models and many owners, so `ldmrt triton --force` may replace
only model folders that ldmrt itself wrote. Each one gets a marker file, MARKER, listing every file,
folder and link ldmrt put there (files with their size and sha256, links with their target) and the
group it belongs to (the name of its pipeline model: one `ldmrt triton` run writes one group).
A folder is ldmrt's to replace or remove only when its marker is there and it holds nothing that
the marker does not list, unchanged; anything else in it is named and the run is refused.
"""
from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ldmrt.atomic import Ownership, atomic_write
from ldmrt.digest import sha256_file
from ldmrt.engines.ort_cache import BUNDLE_CACHE_DIR
from ldmrt.engines.ort_cache import ownership as ort_cache_ownership
from ldmrt.errors import BundleError, ConfigError
from ldmrt.manifest_reader import Reader, join_path

MARKER = ".ldmrt-model.json"
FORMAT = 1
WRITTEN_BY = "ldmrt triton"
MAX_MARKER_BYTES = 16 * 2**20   # a model folder's listing: a few kB for a bundle copy
_SHOWN = 5            # paths named in a refusal; the rest are counted


@dataclass(frozen=True)
class ModelMarker:
    """MARKER: what ldmrt wrote in a model folder, and the group (pipeline model) it belongs to.

    contents: relative path -> {size, sha256} (a file), {link} (its target), {dir: true} or
    {other: file type} (anything else), as `_contents` lists the folder."""
    group: str
    contents: Mapping[str, Mapping[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "written_by": WRITTEN_BY, "group": self.group,
                "contents": {relative: dict(entry) for relative, entry in self.contents.items()}}

    @classmethod
    def from_dict(cls, data: Any, origin: str = "<in memory>") -> "ModelMarker":
        return parse_marker(Reader(origin, MARKER, kind="Triton model folder"), data, "<root>")


def parse_marker(reader: Reader, data: Any, where: str) -> ModelMarker:
    """Every field checked (BundleError naming it)."""
    reader.json_value(data, where)
    reader.record(data, where, ("format", "written_by", "group", "contents"))
    if data["format"] != FORMAT:
        reader.fail(join_path(where, "format"), f"{FORMAT}", data["format"])
    reader.choice(data["written_by"], join_path(where, "written_by"), (WRITTEN_BY,))
    group = reader.string(data["group"], join_path(where, "group"))
    at = join_path(where, "contents")
    contents = {}
    for relative, entry in reader.mapping(data["contents"], at).items():
        reader.string(relative, at, expected="relative paths as keys")
        contents[relative] = _parse_entry(reader, entry, join_path(at, relative))
    return ModelMarker(group=group, contents=contents)


def _parse_entry(reader: Reader, entry: Any, where: str) -> dict[str, Any]:
    """One entry of `_contents`: {link}, {dir: true}, {other} or a file's {size, sha256}."""
    entry = reader.mapping(entry, where, minimum=1)
    if "link" in entry:
        reader.record(entry, where, ("link",))
        return {"link": reader.string(entry["link"], join_path(where, "link"))}
    if "dir" in entry:
        reader.record(entry, where, ("dir",))
        if entry["dir"] is not True:
            reader.fail(join_path(where, "dir"), "true", entry["dir"])
        return {"dir": True}
    if "other" in entry:
        reader.record(entry, where, ("other",))
        return {"other": reader.integer(entry["other"], join_path(where, "other"))}
    reader.record(entry, where, ("size", "sha256"))
    return {"size": reader.integer(entry["size"], join_path(where, "size")),
            "sha256": reader.sha256(entry["sha256"], join_path(where, "sha256"))}


def record_model(folder: Path, group: str, digests: dict[tuple[int, int], str]) -> None:
    """Write `folder`'s marker: what it holds now. `digests` caches sha256 by inode, so the hard
    links between the pipeline's bundle copy and the component models are read once."""
    marker = ModelMarker(group, _contents(folder, digests))
    atomic_write(folder / MARKER, (json.dumps(marker.to_dict(), indent=1, sort_keys=True) + "\n").encode())


def read_marker(folder: Path) -> ModelMarker | None:
    """The marker of a model folder ldmrt wrote; None when there is none (or it is not ldmrt's:
    a marker that does not parse does not prove ldmrt wrote the folder)."""
    reader = Reader(str(folder), MARKER, kind="Triton model folder")
    try:
        return parse_marker(reader, reader.read_file(MAX_MARKER_BYTES), "<root>")
    except BundleError:
        return None


def marker_group(folder: Path) -> str | None:
    """The group of the model folder ldmrt wrote at `folder`; None when it is not one."""
    marker = read_marker(folder)
    return None if marker is None else marker.group


def foreign_paths(folder: Path, contents: bool = True) -> list[str]:
    """What `folder` holds that ldmrt did not write there, or that changed since (relative paths);
    ["<no ldmrt marker>"] when ldmrt did not write the folder at all. contents=False compares
    names, kinds, sizes and links only (no hashing: the re-check at the swap)."""
    marker = read_marker(folder)
    if marker is None:
        return [f"<no {MARKER}: not written by ldmrt>"]
    recorded = marker.contents
    served = _written_by_serving(folder)
    found = []
    for relative, entry in _contents(folder, {}, hash_files=False).items():
        expected = recorded.get(relative)
        if expected is None and served(relative, "dir" in entry):
            continue                         # ldmrt's runtime wrote it while the model served
        if expected is None or {k: v for k, v in expected.items() if k != "sha256"} != entry:
            found.append(relative)           # added, or another kind, size or link target
        elif contents and "sha256" in expected and sha256_file(folder / relative) != expected["sha256"]:
            found.append(relative)           # same size, other bytes: the user's edit
    return sorted(found)


@dataclass(frozen=True)
class Claim:
    """Model folders a run may write: `replace` exist and are ldmrt's; `stale` are ldmrt's models of
    the same group that the new repository no longer has (removed, so no stale model is served)."""
    replace: tuple[str, ...]
    stale: tuple[str, ...]


def claim_models(repo: Path, names: list[str], group: str, force: bool) -> Claim:
    """Check that every model folder this run would replace or remove is ldmrt's, untouched;
    ConfigError naming what is not (nothing is written or removed before this check)."""
    if not repo.is_dir():
        return Claim((), ())
    existing = [name for name in names if os.path.lexists(repo / name)]
    stale = sorted(child.name for child in repo.iterdir()
                   if child.name not in names and not child.is_symlink() and child.is_dir()
                   and marker_group(child) == group)
    if (existing or stale) and not force:
        raise ConfigError(f"out {repo}: models {existing + stale} already exist; pass --force to "
                          f"replace the models ldmrt wrote (other models and files stay as they are)",
                          field="out")
    for name in existing + stale:
        folder = repo / name
        if folder.is_symlink() or not folder.is_dir():
            raise ConfigError(f"out {repo}: {name} is not a folder ldmrt wrote; ldmrt never replaces "
                              f"it, even with --force: remove or rename it yourself, or pass another "
                              f"--prefix", field="out")
        refuse_foreign(folder)
    return Claim(tuple(existing), tuple(stale))


def refuse_foreign(folder: Path, contents: bool = True) -> None:
    """ConfigError naming what `folder` holds that ldmrt did not write (see foreign_paths)."""
    foreign = foreign_paths(folder, contents)
    if foreign:
        shown = ", ".join(foreign[:_SHOWN]) + (f" and {len(foreign) - _SHOWN} more"
                                               if len(foreign) > _SHOWN else "")
        raise ConfigError(f"out {folder.parent}: model folder {folder.name} holds what ldmrt did not "
                          f"write there (or changed since): {shown}; ldmrt never deletes it, even with "
                          f"--force: move it out, or pass another --prefix", field="out")


# What the pipeline model writes into its own folder while it serves: Python's bytecode caches of
# model.py and the vendored runtime, and ONNX Runtime's optimized-graph cache next to the bundle copy.
_SERVING_CACHE = f"1/bundle/{BUNDLE_CACHE_DIR}"


def _written_by_serving(folder: Path):
    """(relative path, is_dir) -> whether ldmrt's own runtime wrote it there while serving: a
    `__pycache__/` folder and the `.pyc` files in it, or what ort_cache.ownership judges its own in
    1/bundle/ort_cache/. Anything else a marker does not list is the user's."""
    cache = ort_cache_ownership(folder / _SERVING_CACHE)

    def judge(relative: str, is_dir: bool) -> bool:
        parts = relative.split("/")
        if "__pycache__" in parts:
            rest = parts[parts.index("__pycache__") + 1:]
            return (not rest and is_dir) or (len(rest) == 1 and not is_dir and rest[0].endswith(".pyc"))
        if relative == _SERVING_CACHE:
            return is_dir
        if relative.startswith(_SERVING_CACHE + "/"):
            return cache(tuple(relative[len(_SERVING_CACHE) + 1:].split("/")), is_dir) != Ownership.FOREIGN
        return False
    return judge


def _contents(folder: Path, digests: dict[tuple[int, int], str], hash_files: bool = True
              ) -> dict[str, dict[str, Any]]:
    """Every entry under `folder` but the marker, without following links: files {size, sha256},
    links {link}, folders {dir}, anything else {other}."""
    contents: dict[str, dict[str, Any]] = {}
    for root, dirs, files in os.walk(folder):          # links to folders are listed, not entered
        for name in dirs + files:
            path = Path(root) / name
            relative = path.relative_to(folder).as_posix()
            if relative == MARKER:
                continue
            info = path.lstat()
            if stat.S_ISLNK(info.st_mode):
                contents[relative] = {"link": os.readlink(path)}
            elif stat.S_ISDIR(info.st_mode):
                contents[relative] = {"dir": True}
            elif stat.S_ISREG(info.st_mode):
                entry: dict[str, Any] = {"size": info.st_size}
                if hash_files:
                    key = (info.st_dev, info.st_ino)
                    if key not in digests:
                        digests[key] = sha256_file(path)
                    entry["sha256"] = digests[key]
                contents[relative] = entry
            else:
                contents[relative] = {"other": stat.S_IFMT(info.st_mode)}
    return contents
