"""Issue 14, Triton rows: a shared model repository keeps what ldmrt did not write (1), unwritable
and unservable --out paths are refused before any work (13, 20), bad requests are 400 and server
faults 500 with failures counted (17), cancelled and over-cost requests stop (19), a dead stub is
seen by the shipped probe and cured by a reload (16), warnings reach the client, the local server
helper dies with its owner (21).

Tests that need a tritonserver use the environment of scripts/triton_env.sh and skip without it
(LDMRT_REQUIRE_TRITON=1 makes that a failure).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

import pytest

from ldmrt.errors import ConfigError, LdmrtError
from ldmrt.triton.config import InstanceGroup, InstanceKind
MARKER = ".ldmrt-model.json"   # ldmrt.triton.ownership.MARKER
from ldmrt.triton.repository import PipelineModelOptions, RepositoryOptions, write_repository

CPU = InstanceGroup(1, InstanceKind.CPU)
CPU_OPTIONS = RepositoryOptions(instances=CPU, pipeline=PipelineModelOptions(instances=CPU, threads=1))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    from ldmrt.export.bundle import ExportOptions, export_bundle, preset_source

    out = tmp_path_factory.mktemp("reliability_triton") / "tiny"
    export_bundle(preset_source("tiny"), out, ExportOptions(validate=False))
    return out


def _snapshot(root: Path) -> dict[str, str]:
    """Every entry under root: files by sha256, links by target, folders as such."""
    found = {}
    for path in sorted(root.rglob("*")):
        key = path.relative_to(root).as_posix()
        if path.is_symlink():
            found[key] = "link:" + os.readlink(path)
        elif path.is_dir():
            found[key] = "dir"
        else:
            found[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def _shared_repository(bundle: Path, root: Path) -> Path:
    """A repository with a foreign model, a foreign top-level file, and ldmrt's models."""
    repo = root / "repo"
    write_repository(bundle, repo, CPU_OPTIONS)
    foreign = repo / "resnet" / "1"
    foreign.mkdir(parents=True)
    (repo / "resnet" / "config.pbtxt").write_text('name: "resnet"\nplatform: "onnxruntime_onnx"\n')
    (foreign / "model.onnx").write_bytes(b"somebody else's graph")
    (repo / "README.txt").write_text("shared by the vision team")
    return repo


# --- row 1: --force replaces only what ldmrt wrote ----------------------------------------------

def test_force_replaces_only_ldmrts_models_in_a_shared_repository(bundle, tmp_path):
    repo = _shared_repository(bundle, tmp_path)
    foreign = {k: v for k, v in _snapshot(repo).items() if k.startswith("resnet") or k == "README.txt"}
    assert len(foreign) == 5
    old_inode = (repo / "unet" / "config.pbtxt").stat().st_ino
    result = write_repository(bundle, repo, replace(CPU_OPTIONS, force=True))
    after = _snapshot(repo)
    assert {k: v for k, v in after.items() if k in foreign} == foreign      # byte-identical
    assert not [k for k in after if k.startswith("resnet") and k not in foreign]
    assert (repo / "unet" / "config.pbtxt").stat().st_ino != old_inode          # replaced
    assert sorted(result.replaced) == sorted(["pipeline", "text_encoder", "unet", "vae_decoder",
                                              "vae_encoder"])
    assert sorted(p.name for p in repo.iterdir()) == sorted(
        ["README.txt", "resnet", "pipeline", "text_encoder", "unet", "vae_decoder", "vae_encoder"])
    assert all((repo / name / MARKER).is_file() for name in result.replaced)
    with pytest.raises(ConfigError, match="already exist; pass --force"):
        write_repository(bundle, repo, CPU_OPTIONS)


def test_a_file_added_inside_an_ldmrt_model_is_named_and_kept(bundle, tmp_path):
    repo = _shared_repository(bundle, tmp_path)
    (repo / "unet" / "1" / "notes.txt").write_text("my tuning notes")
    before = _snapshot(repo)
    with pytest.raises(ConfigError, match=r"model folder unet holds what ldmrt did not write.*1/notes.txt"):
        write_repository(bundle, repo, replace(CPU_OPTIONS, force=True))
    assert _snapshot(repo) == before                                          # nothing touched


def test_an_edited_file_of_an_ldmrt_model_is_named_and_kept(bundle, tmp_path):
    repo = _shared_repository(bundle, tmp_path)
    config = repo / "pipeline" / "config.pbtxt"
    config.write_text(config.read_text().replace("count: 1", "count: 4"))       # same size, other bytes
    before = _snapshot(repo)
    with pytest.raises(ConfigError, match="model folder pipeline .*config.pbtxt"):
        write_repository(bundle, repo, replace(CPU_OPTIONS, force=True))
    assert _snapshot(repo) == before


def test_a_foreign_model_with_an_ldmrt_name_is_never_replaced(bundle, tmp_path):
    repo = tmp_path / "repo"
    (repo / "unet" / "1").mkdir(parents=True)
    (repo / "unet" / "config.pbtxt").write_text('name: "unet"\nplatform: "tensorrt_plan"\n')
    (repo / "unet" / "1" / "model.plan").write_bytes(b"their engine")
    before = _snapshot(repo)
    with pytest.raises(ConfigError, match=f"unet holds .*no {MARKER}"):
        write_repository(bundle, repo, replace(CPU_OPTIONS, force=True))
    assert _snapshot(repo) == before
    # Another prefix writes next to it, without --force: nothing of theirs is in the way.
    write_repository(bundle, repo, replace(CPU_OPTIONS, prefix="tiny_"))
    assert _snapshot(repo).items() >= before.items() and (repo / "tiny_unet" / MARKER).is_file()


def test_models_of_the_same_group_no_longer_written_are_removed_with_force(bundle, tmp_path):
    repo = _shared_repository(bundle, tmp_path)
    smaller = tmp_path / "smaller"
    shutil.copytree(bundle, smaller)
    from ldmrt.manifest import load_manifest, write_manifest

    manifest = load_manifest(smaller)
    components = {k: v for k, v in manifest.components.items() if k != "vae_encoder"}
    write_manifest(smaller, replace(manifest, components=components))
    result = write_repository(smaller, repo, replace(CPU_OPTIONS, force=True))
    assert result.removed == ["vae_encoder"] and not (repo / "vae_encoder").exists()
    assert (repo / "resnet" / "1" / "model.onnx").read_bytes() == b"somebody else's graph"


def test_cli_force_on_a_shared_repository(bundle, tmp_path):
    from typer.testing import CliRunner

    from ldmrt.cli import app

    repo = _shared_repository(bundle, tmp_path)
    result = CliRunner().invoke(app, ["triton", str(bundle), "--out", str(repo), "--force",
                                      "--kind", "cpu", "--pipeline-kind", "cpu"])
    assert result.exit_code == 0, result.output
    assert "nothing else in the repository was touched" in result.output
    assert (repo / "README.txt").read_text() == "shared by the vision team"


# --- row 13: unwritable --out, before any work ---------------------------------------------------

@pytest.mark.parametrize("where", ["proc", "under-a-file", "read-only"])
def test_an_unwritable_out_is_one_line_exit_2_before_any_work(bundle, tmp_path, where, monkeypatch):
    from typer.testing import CliRunner

    from ldmrt.cli import app
    import ldmrt.triton.repository as repository

    if where == "proc":
        out = Path("/proc/ldmrt-triton-x")
    elif where == "under-a-file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "repo"
    else:
        if os.geteuid() == 0:
            # root writes through mode bits; a folder on a read-only mount is what root cannot write
            pytest.skip("root ignores mode bits; /proc covers the unwritable case")
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        out = locked / "repo"
    calls = []
    monkeypatch.setattr(repository, "verify_bundle", lambda *a, **k: calls.append(a))
    result = CliRunner().invoke(app, ["triton", str(bundle), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "out" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert calls == []                                                        # before the sha256 check


# --- row 20: paths Triton's Python backend cannot start a model from -----------------------------

@pytest.mark.parametrize("name", ["with space", "ünïcode", "quote'd", "semi;colon"])
def test_unservable_paths_are_refused_by_name(bundle, tmp_path, name):
    out = tmp_path / name / "repo"
    with pytest.raises(LdmrtError, match="Triton's Python backend cannot start a model") as caught:
        write_repository(bundle, out, CPU_OPTIONS)
    assert caught.value.field == "out"
    assert not (tmp_path / name).exists()


def test_the_printed_serve_command_is_quoted(bundle, tmp_path):
    import shlex

    from typer.testing import CliRunner

    from ldmrt.cli import app

    out = tmp_path / "a=b,c" / "repo"        # servable, but shell-sensitive for some shells' words
    result = CliRunner().invoke(app, ["triton", str(bundle), "--out", str(out), "--kind", "cpu",
                                      "--pipeline-kind", "cpu"])
    assert result.exit_code == 0, result.output
    line = next(line for line in result.output.splitlines() if line.startswith("serve: "))
    command = line.removeprefix("serve: ").split(" (see")[0]
    assert shlex.split(command) == ["tritonserver", f"--model-repository={out.resolve()}"]
