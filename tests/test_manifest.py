"""Bundle manifest: round trips for every preset, atomic writes, hashing, verification, and
hostile input (every failure a BundleError naming bundle and field, never another exception)."""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ldmrt import manifest as manifest_module
from ldmrt.presets import PRESETS, preset
from ldmrt.engine_record import EngineRecord
from ldmrt.errors import BundleError
from ldmrt.iospec import Precision, ShapeRanges, component_specs
from ldmrt.manifest import (SCHEMA_VERSION, ComponentEntry, Manifest, ParityRecord, TokenizerEntry,
                            load_manifest, sha256_file, verify_bundle, write_manifest)

REPO = Path(__file__).resolve().parents[1]


def make_manifest(preset_name: str = "tiny", precision: Precision = Precision.FP32) -> Manifest:
    """A manifest as an export would write it (made-up hashes; no files)."""
    config = preset(preset_name)
    ranges = ShapeRanges.for_model(config)
    specs = component_specs(config, ranges, precision, fp32_components=frozenset({"vae_decoder"}))
    components = {}
    for name, spec in specs.items():
        file = f"{name}.onnx"
        external = f"{file}.data" if name == "unet" else None
        files = (file,) if external is None else (file, external)
        parity = ParityRecord(reference="torch", rel_l2=3.5e-7, max_abs=2e-6, tolerance=1e-5,
                              shapes={t.name: (2,) * len(t.shape) for t in spec.inputs})
        components[name] = ComponentEntry(
            name=name, file=file, external_data=external,
            sha256={f: hashlib.sha256(f.encode()).hexdigest() for f in files}, size_bytes=1234,
            spec=spec, dtype=spec.outputs[0].dtype, parity=parity if name != "vae_encoder" else None)
    tokenizer = TokenizerEntry("clip", {"vocab.json": "a" * 64, "merges.txt": "b" * 64}) \
        if config.is_text_conditioned else None
    engine = EngineRecord(component="unet", file="unet.plan", sha256="c" * 64, size=4096,
                          builder="tensorrt", builder_version="10.13.0", targets=("sm90",),
                          precision="fp16", profiles=(specs["unet"].profile(),),
                          onnx_sha256=components["unet"].digest, build_seconds=2.5,
                          created="2024-05-01T12:30:00+00:00", flags={"refit": False},
                          key="unet-trt10.13.0-sm90", timing_cache="created")
    return Manifest(name=preset_name, source=f"preset:{preset_name}", random_weights=True,
                    config=config, precision=precision, shape_ranges=ranges, components=components,
                    tokenizer=tokenizer,
                    engines=(engine,),
                    created="2024-05-01T12:00:00Z")


def make_bundle(folder: Path, preset_name: str = "tiny") -> Manifest:
    """A bundle on disk with random bytes as graph and tokenizer files, hashed by the module."""
    rng = np.random.default_rng(0)
    template = make_manifest(preset_name)
    (folder / "tokenizer").mkdir(parents=True)
    for name in ("vocab.json", "merges.txt"):
        (folder / "tokenizer" / name).write_bytes(rng.bytes(300))
    components = {}
    for name, entry in template.components.items():
        for file in entry.files:
            (folder / file).write_bytes(rng.bytes(1000 + 37 * len(file)))
        components[name] = ComponentEntry.from_files(folder, entry.spec, entry.dtype, entry.parity)
    manifest = dataclasses.replace(template, components=components,
                                   tokenizer=TokenizerEntry.from_folder(folder, "clip"))
    write_manifest(folder, manifest)
    return manifest


def write_raw(folder: Path, data) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    text = data if isinstance(data, (str, bytes)) else json.dumps(data)
    (folder / "manifest.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    return folder


def set_path(data: dict, path: str, value) -> dict:
    """Copy of `data` with the dotted `path` set to `value` (or deleted if value is DELETE)."""
    data = copy.deepcopy(data)
    *parents, last = path.split(".")
    node = data
    for key in parents:
        node = node[key]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return data


DELETE = object()
VALID = make_manifest().to_dict()


# --- round trips ---------------------------------------------------------------------------

@pytest.mark.parametrize("precision", list(Precision))
@pytest.mark.parametrize("preset_name", sorted(PRESETS))
def test_round_trip_every_preset(tmp_path, preset_name, precision):
    manifest = make_manifest(preset_name, precision)
    data = manifest.to_dict()
    assert Manifest.from_dict(json.loads(json.dumps(data))) == manifest
    write_manifest(tmp_path, manifest)
    loaded = load_manifest(tmp_path)
    assert loaded == manifest
    assert loaded.to_dict() == data
    on_disk = json.loads((tmp_path / "manifest.json").read_text())
    assert on_disk["schema_version"] == SCHEMA_VERSION == 1
    assert on_disk["family"] == PRESETS[preset_name].family.value
    assert on_disk["latent_scale"] == PRESETS[preset_name].scale_factor
    assert on_disk["precision"] == precision.value
    assert on_disk["postprocess"] == {"images": "clamp(x / 2 + 0.5, 0, 1)"}
    encoders = {"text_encoder", "text_encoder_2"} if PRESETS[preset_name].conditioner_2 else {"text_encoder"}
    expected = {"unet", "vae_decoder", "vae_encoder", "denoise_step"} | (
        encoders if PRESETS[preset_name].is_text_conditioned else set())
    assert set(on_disk["components"]) == expected
    assert on_disk["components"]["unet"]["sha256"] == {
        f: hashlib.sha256(f.encode()).hexdigest() for f in ("unet.onnx", "unet.onnx.data")}
    assert loaded.component("unet").spec == manifest.components["unet"].spec


def test_written_json_is_stable_sorted_and_indented(tmp_path):
    manifest = make_manifest()
    write_manifest(tmp_path, manifest)
    first = (tmp_path / "manifest.json").read_bytes()
    write_manifest(tmp_path, load_manifest(tmp_path))
    assert (tmp_path / "manifest.json").read_bytes() == first
    text = first.decode()
    assert text.endswith("}\n") and text.splitlines()[1].startswith('  "') \
        and not text.splitlines()[1].startswith('   ')
    assert list(json.loads(text)) == sorted(json.loads(text))


def test_component_lookup_names_the_available_components():
    manifest = make_manifest()
    assert manifest.component("unet").file == "unet.onnx"
    with pytest.raises(BundleError, match=r"no component 'decoder'.*text_encoder.*unet"):
        manifest.component("decoder")


# --- atomic writes -------------------------------------------------------------------------

def test_atomic_write_leaves_no_temp_files(tmp_path):
    for _ in range(3):
        path = write_manifest(tmp_path, make_manifest())
    assert path == tmp_path / "manifest.json"
    assert sorted(os.listdir(tmp_path)) == ["manifest.json"]


def test_failed_write_keeps_the_old_manifest_and_no_temp_file(tmp_path, monkeypatch):
    write_manifest(tmp_path, make_manifest())
    before = (tmp_path / "manifest.json").read_bytes()

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(manifest_module.os, "replace", broken_replace)
    with pytest.raises(BundleError, match="No space left"):
        write_manifest(tmp_path, dataclasses.replace(make_manifest(), name="other"))
    assert sorted(os.listdir(tmp_path)) == ["manifest.json"]
    assert (tmp_path / "manifest.json").read_bytes() == before


def test_write_refuses_an_invalid_manifest_and_writes_nothing(tmp_path):
    good = make_manifest()
    unet = dataclasses.replace(good.components["unet"], file="../unet.onnx",
                               sha256={"../unet.onnx": "0" * 64, "unet.onnx.data": "0" * 64})
    bad = dataclasses.replace(good, components={**good.components, "unet": unet})
    with pytest.raises(BundleError, match=r"refusing.*components\.unet\.file"):
        write_manifest(tmp_path, bad)
    not_json = dataclasses.replace(good, engines=(dataclasses.replace(good.engines[0], flags={"x": {1, 2}}),))
    with pytest.raises(BundleError, match=r"engines\[0\]\.flags"):
        write_manifest(tmp_path, not_json)
    assert os.listdir(tmp_path) == []
    with pytest.raises(BundleError, match="cannot write"):
        write_manifest(tmp_path / "missing", good)


# --- hashing and verification --------------------------------------------------------------

def test_sha256_file_matches_hashlib_on_a_file_written_in_chunks(tmp_path):
    rng = np.random.default_rng(1)
    path, reference = tmp_path / "blob.bin", hashlib.sha256()
    with open(path, "wb") as handle:
        for size in (4096, 4096, 1, 10_000, 17):
            chunk = rng.bytes(size)
            handle.write(chunk)
            reference.update(chunk)
    for chunk_size in (1, 4096, 4097, 1 << 20):
        assert sha256_file(path, chunk_size=chunk_size) == reference.hexdigest()
    (tmp_path / "empty").write_bytes(b"")
    assert sha256_file(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()
    with pytest.raises(BundleError, match="nothing-here"):
        sha256_file(tmp_path / "nothing-here")


def test_from_files_hashes_what_is_on_disk(tmp_path):
    manifest = make_bundle(tmp_path)
    unet = manifest.component("unet")
    assert unet.external_data == "unet.onnx.data"
    assert unet.sha256 == {f: hashlib.sha256((tmp_path / f).read_bytes()).hexdigest() for f in unet.files}
    assert unet.size_bytes == sum((tmp_path / f).stat().st_size for f in unet.files)
    assert manifest.component("vae_decoder").external_data is None
    verify_bundle(tmp_path, load_manifest(tmp_path))


def test_verify_catches_a_flipped_byte(tmp_path):
    manifest = make_bundle(tmp_path)
    path = tmp_path / "unet.onnx.data"
    blob = bytearray(path.read_bytes())
    blob[500] ^= 0x01
    path.write_bytes(bytes(blob))
    expected = manifest.component("unet").sha256["unet.onnx.data"]
    found = hashlib.sha256(bytes(blob)).hexdigest()
    with pytest.raises(BundleError) as info:
        verify_bundle(tmp_path, manifest)
    message = str(info.value)
    assert "unet.onnx.data" in message and expected in message and found in message
    verify_bundle(tmp_path, manifest, components=["vae_decoder", "text_encoder"])  # others intact


def test_verify_catches_a_flipped_byte_in_every_file_of_every_component(tmp_path):
    """Not only the second file of one component: a byte flipped anywhere in any listed file is named."""
    manifest = make_bundle(tmp_path)
    for name, entry in manifest.components.items():
        for file in entry.sha256:
            path = tmp_path / file
            original = path.read_bytes()
            for offset in (0, len(original) // 2, len(original) - 1):
                blob = bytearray(original)
                blob[offset] ^= 0x80
                path.write_bytes(bytes(blob))
                with pytest.raises(BundleError) as info:
                    verify_bundle(tmp_path, manifest, components=[name])
                assert file in str(info.value) and entry.sha256[file] in str(info.value), (file, offset)
            path.write_bytes(original)
    verify_bundle(tmp_path, manifest)                                            # restored: sound


def test_verify_catches_a_missing_file_and_a_truncated_file(tmp_path):
    manifest = make_bundle(tmp_path)
    (tmp_path / "vae_decoder.onnx").unlink()
    with pytest.raises(BundleError, match=r"vae_decoder\.onnx.*missing"):
        verify_bundle(tmp_path, manifest)
    verify_bundle(tmp_path, manifest, components="unet")
    with open(tmp_path / "unet.onnx", "r+b") as handle:
        handle.truncate(10)
    with pytest.raises(BundleError, match=r"components\.unet\.size_bytes"):
        verify_bundle(tmp_path, manifest, components=["unet"])
    with pytest.raises(BundleError, match="available"):
        verify_bundle(tmp_path, manifest, components=["controlnet"])


def test_verify_catches_a_wrong_or_missing_tokenizer_file(tmp_path):
    manifest = make_bundle(tmp_path)
    vocab = tmp_path / "tokenizer" / "vocab.json"
    vocab.write_bytes(vocab.read_bytes()[::-1])  # same size, other content
    with pytest.raises(BundleError, match=r"tokenizer/vocab\.json.*tokenizer\.files"):
        verify_bundle(tmp_path, manifest)
    vocab.unlink()
    with pytest.raises(BundleError, match=r"tokenizer/vocab\.json.*missing"):
        verify_bundle(tmp_path, manifest)


def test_verify_refuses_names_that_escape_even_from_an_in_memory_manifest(tmp_path):
    manifest = make_bundle(tmp_path / "bundle")
    (tmp_path / "outside.onnx").write_bytes(b"x")
    unet = dataclasses.replace(manifest.component("unet"), external_data=None,
                               sha256={"../outside.onnx": hashlib.sha256(b"x").hexdigest()}, size_bytes=1)
    evil = dataclasses.replace(manifest, components={"unet": unet})
    with pytest.raises(BundleError, match="plain file name"):
        verify_bundle(tmp_path / "bundle", evil)


# --- hostile input: files ------------------------------------------------------------------

def test_missing_folder_missing_file_and_wrong_kinds_of_path(tmp_path):
    with pytest.raises(BundleError, match=rf"{tmp_path / 'nope'}.*found nothing"):
        load_manifest(tmp_path / "nope")
    (tmp_path / "file").write_text("{}")
    with pytest.raises(BundleError, match="found a file"):
        load_manifest(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match=r"manifest\.json.*no such file.*ldmrt export"):
        load_manifest(tmp_path / "empty")
    (tmp_path / "dir" / "manifest.json").mkdir(parents=True)
    with pytest.raises(BundleError, match="not a file"):
        load_manifest(tmp_path / "dir")
    with pytest.raises(BundleError, match="expected a folder path"):
        load_manifest(123)  # type: ignore[arg-type]
    with pytest.raises(BundleError, match="expected a folder path"):
        load_manifest(b"/tmp")  # type: ignore[arg-type]
    with pytest.raises(BundleError, match="expected a folder path"):
        load_manifest("bundle\0name")


def test_oversized_manifest_is_not_parsed(tmp_path, monkeypatch):
    write_manifest(tmp_path, make_manifest())
    monkeypatch.setattr(manifest_module, "MAX_MANIFEST_BYTES", 100)
    with pytest.raises(BundleError, match="at most 100 bytes"):
        load_manifest(tmp_path)


VALID_TEXT = json.dumps(VALID)
BAD_FILES = {
    "empty": b"",
    "not json": b"manifest, but not JSON",
    "json array": b"[1, 2, 3]",
    "json string": b'"hello"',
    "not utf-8": b'{"name": "\xff\xfe"}',
    "deep arrays": b"[" * 100_000 + b"]" * 100_000,
    "deep objects": b'{"a":' * 5_000 + b"1" + b"}" * 5_000,
    "NaN": VALID_TEXT.replace('"latent_scale": 0.18215', '"latent_scale": NaN').encode(),
    "Infinity": VALID_TEXT.replace('"rel_l2": 3.5e-07', '"rel_l2": -Infinity').encode(),
    "overflowing float": VALID_TEXT.replace('"latent_scale": 0.18215', '"latent_scale": 1e400').encode(),
    "huge int": VALID_TEXT.replace('"size_bytes": 1234', '"size_bytes": 1' + "0" * 30).encode(),
    "5000-digit int": VALID_TEXT.replace('"size_bytes": 1234', '"size_bytes": 1' + "0" * 5000).encode(),
    "duplicate key": VALID_TEXT.replace('"name": "tiny"', '"name": "tiny", "name": "evil"').encode(),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_unreadable_manifest_raises_bundle_error(tmp_path, case):
    assert BAD_FILES[case] != VALID_TEXT.encode()  # the replacement took effect
    write_raw(tmp_path, BAD_FILES[case])
    with pytest.raises(BundleError, match=str(tmp_path)):
        load_manifest(tmp_path)


def test_schema_versions(tmp_path):
    write_raw(tmp_path, {**VALID, "schema_version": 2, "new_field": 1})
    with pytest.raises(BundleError, match=r"schema_version.*newer ldmrt.*upgrade"):
        load_manifest(tmp_path)
    write_raw(tmp_path, {**VALID, "schema_version": 0})
    with pytest.raises(BundleError, match=r"schema_version.*older ldmrt"):
        load_manifest(tmp_path)
    for wrong in ("1", 1.0, True, None, DELETE):
        write_raw(tmp_path, set_path(VALID, "schema_version", wrong))
        with pytest.raises(BundleError, match="field schema_version: expected the integer 1"):
            load_manifest(tmp_path)


BAD_FIELDS = [  # (dotted path, new value, field named in the message)
    ("components.unet.sha256", {"unet.onnx": "xyz", "unet.onnx.data": "0" * 64},
     'components.unet.sha256["unet.onnx"]'),
    ("components.unet.sha256", {"unet.onnx": "0" * 64}, "components.unet.sha256"),
    ("components.unet.sha256", "0" * 64, "components.unet.sha256"),
    ("components.unet.file", "../unet.onnx", "components.unet.file"),
    ("components.unet.file", "/etc/unet.onnx", "components.unet.file"),
    ("components.unet.file", "sub/unet.onnx", "components.unet.file"),
    ("components.unet.file", "..\\unet.onnx", "components.unet.file"),
    ("components.unet.file", "C:unet.onnx", "components.unet.file"),
    ("components.unet.file", "unet.onnx\n", "components.unet.file"),
    ("components.unet.file", "unet.bin", "components.unet.file"),
    ("components.unet.external_data", "../../etc/passwd", "components.unet.external_data"),
    ("components.unet.external_data", "manifest.json", "components.unet.external_data"),
    ("components.unet.size_bytes", -1, "components.unet.size_bytes"),
    ("components.unet.size_bytes", 12.5, "components.unet.size_bytes"),
    ("components.unet.dtype", "float64", "components.unet.dtype"),
    ("components.unet.io", DELETE, "components.unet.io"),
    ("components.unet.io.ranges", {"batch": [1, 2, 8]}, "components.unet.io"),
    ("components.unet.io.ranges", {"batch": [8, 2, 1], "latent_height": [1, 2, 3], "latent_width": [1, 2, 3]},
     "components.unet.io"),
    ("components.unet.io.inputs", [{"name": "sample", "dtype": "float32", "shape": "batch"}],
     "components.unet.io.inputs[0].shape"),
    ("components.unet.parity.rel_l2", "small", "components.unet.parity.rel_l2"),
    ("components.unet.parity.shapes", {"sample": [2, -1]}, "components.unet.parity.shapes.sample"),
    ("components.unet.extra", 1, "components.unet"),
    ("components", {}, "components"),
    ("components", [], "components"),
    ("tokenizer.files", {"../vocab.json": "a" * 64}, "tokenizer.files"),
    ("tokenizer.files", {"vocab.json": "A" * 64}, 'tokenizer.files["vocab.json"]'),
    ("tokenizer.kind", "sentencepiece", "tokenizer.kind"),
    ("family", "sd2", "family"),
    ("latent_scale", 1.0, "latent_scale"),
    ("config.unet.in_channels", "4", "config"),
    ("config.conditioner.kind", [], "config"),
    ("config.autoencoder", None, "config"),
    ("shape_ranges.min_size", 0, "shape_ranges.min_size"),
    ("shape_ranges.min_size", 30, "shape_ranges"),   # not a multiple of the latent factor 4
    ("created", "yesterday", "created"),
    ("created", "2024-05-01T12:00:00", "created"),    # no time zone
    ("created", "2024-05-01T12:00:00+02:00", "created"),
    ("precision", "fp8", "precision"),
    ("random_weights", 1, "random_weights"),
    ("ldmrt_version", "", "ldmrt_version"),
    ("postprocess", {}, "postprocess"),
    ("engines", {}, "engines"),
    ("engines", [1], "engines[0]"),
    ("name", DELETE, "name"),
    ("unknown", 1, "<root>"),
]


@pytest.mark.parametrize("path,value,where", BAD_FIELDS, ids=[f"{p}={v!r}"[:60] for p, v, _ in BAD_FIELDS])
def test_bad_field_is_named_with_expected_and_found(tmp_path, path, value, where):
    write_raw(tmp_path, set_path(VALID, path, value))
    with pytest.raises(BundleError) as info:
        load_manifest(tmp_path)
    message = str(info.value)
    assert f"bundle {tmp_path}: manifest.json field {where}" in message, message
    assert "expected" in message and "found" in message, message


def test_component_names_must_be_plain(tmp_path):
    data = copy.deepcopy(VALID)
    data["components"]["../unet"] = data["components"].pop("unet")
    write_raw(tmp_path, data)
    with pytest.raises(BundleError, match=r"field components: expected component names"):
        load_manifest(tmp_path)


def test_two_components_cannot_share_a_file(tmp_path):
    data = copy.deepcopy(VALID)
    data["components"]["vae_encoder"]["file"] = "vae_decoder.onnx"
    data["components"]["vae_encoder"]["sha256"] = {"vae_decoder.onnx": "0" * 64}
    write_raw(tmp_path, data)
    with pytest.raises(BundleError, match=r"field components\.(vae_encoder|vae_decoder)\.file: "
                                          r"expected a file no other component lists"):
        load_manifest(tmp_path)


def test_the_valid_document_itself_loads(tmp_path):
    """Guards the negative tests above: they fail for the mutation, not for the template."""
    assert load_manifest(write_raw(tmp_path, VALID)) == make_manifest()


# --- hostile input: properties --------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda children: (st.lists(children, max_size=4)
                      | st.dictionaries(st.text(max_size=8), children, max_size=4)),
    max_leaves=20)
PROPERTY = settings(max_examples=150, deadline=None)


def paths_of(value, prefix=()):
    """Every (path to container, key) in a JSON document."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return []
    out = []
    for key, child in items:
        out.append((prefix, key))
        out.extend(paths_of(child, prefix + (key,)))
    return out


VALID_PATHS = paths_of(VALID)


def mutate(data, path, key, operation, value):
    data = copy.deepcopy(data)
    node = data
    for step in path:
        node = node[step]
    if operation == "delete":
        del node[key]
    else:
        node[key] = value
    return data


def loads_or_bundle_error(data, origin="<test>"):
    """None when `data` is rejected properly; the Manifest when it loads."""
    try:
        manifest = Manifest.from_dict(data, origin=origin)
    except BundleError as exc:
        assert str(exc).startswith(f"bundle {origin}: manifest.json field "), str(exc)
        return None
    assert Manifest.from_dict(json.loads(json.dumps(manifest.to_dict()))) == manifest
    return manifest


@PROPERTY
@given(json_values)
def test_arbitrary_json_is_rejected_with_bundle_error(value):
    assert loads_or_bundle_error(value) is None


@settings(max_examples=40, deadline=None)
@given(json_values | st.binary(max_size=64))
def test_arbitrary_file_contents_raise_bundle_error(value):
    with tempfile.TemporaryDirectory() as folder:
        write_raw(Path(folder), value if isinstance(value, bytes) else json.dumps(value))
        with pytest.raises(BundleError, match=folder):
            load_manifest(folder)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(VALID_PATHS), st.sampled_from(["delete", "replace"]), json_values)
def test_mutated_manifest_loads_or_raises_bundle_error(where, operation, value):
    path, key = where
    loads_or_bundle_error(mutate(VALID, path, key, operation, value))


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(VALID_PATHS), json_values)
def test_mutated_manifest_file_loads_or_raises_bundle_error(where, value):
    with tempfile.TemporaryDirectory() as folder:
        write_raw(Path(folder), json.dumps(mutate(VALID, *where, "replace", value)))
        try:
            load_manifest(folder)
        except BundleError as exc:
            assert folder in str(exc)


name_parts = st.lists(st.sampled_from(["..", ".", "/", "\\", ":", "C:", "unet", "a", "~", " ", "\x00",
                                       "\n", "%2e", "onnx", ".onnx", "/etc/passwd", "é"]),
                      min_size=1, max_size=6).map("".join)


@PROPERTY
@given(name_parts, st.sampled_from(["file", "external_data", "tokenizer"]))
def test_file_names_that_load_stay_inside_the_bundle(name, slot):
    data = copy.deepcopy(VALID)
    unet = data["components"]["unet"]
    if slot == "file":
        name = name if name.endswith(".onnx") else name + ".onnx"
        unet["file"] = name
        unet["sha256"] = {name: "0" * 64, "unet.onnx.data": "1" * 64}
    elif slot == "external_data":
        unet["external_data"] = name
        unet["sha256"] = {"unet.onnx": "0" * 64, name: "1" * 64}
    else:
        data["tokenizer"]["files"] = {name: "2" * 64}
    manifest = loads_or_bundle_error(data)
    if manifest is not None:   # only plain names may load: check that they cannot escape
        bundle = Path("/srv/bundle")
        names = list(manifest.component("unet").files) + list(manifest.tokenizer.files)
        for loaded in names:
            assert loaded not in (".", "..") and not any(c in loaded for c in "/\\:\x00\n")
            assert os.path.normpath(bundle / loaded) == str(bundle / loaded)
            assert Path(os.path.normpath(bundle / loaded)).parent == bundle


def test_mutations_reach_the_validators():
    """The property tests above only mean something if mutations are actually rejected."""
    rejected = sum(loads_or_bundle_error(mutate(VALID, path, key, "replace", {"x": [None]})) is None
                   for path, key in VALID_PATHS)
    assert rejected > 0.9 * len(VALID_PATHS)


# --- lean runtime ----------------------------------------------------------------------------

def test_manifest_imports_without_torch():
    code = ("import sys; sys.modules['torch'] = None; import ldmrt.manifest; "
            "assert not [m for m, v in sys.modules.items() if v is not None "
            "and m.split('.')[0] in ('torch', 'transformers', 'onnx')]")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_follow_the_umask_not_mkstemp(tmp_path, umask):
    """Images, engine plans and manifests are read by other users (Triton, web servers):
    0666 minus the umask, as open() gives, never mkstemp's 0600 regardless of the umask."""
    import numpy as np

    from ldmrt.atomic import atomic_write
    from ldmrt.runtime.images import write_images

    old = os.umask(umask)
    try:
        written = [atomic_write(tmp_path / "plan.bin", b"x"),
                   *write_images(np.zeros((2, 8, 8, 3), np.float32), tmp_path / "img.png"),
                   *write_images(np.zeros((1, 8, 8, 3), np.float32), tmp_path / "img.npy")]
    finally:
        os.umask(old)
    assert [oct(p.stat().st_mode & 0o777) for p in written] == [oct(0o666 & ~umask)] * 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img-0.png", "img-1.png", "img.npy", "plan.bin"]


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    from ldmrt.atomic import atomic_write

    target = atomic_write(tmp_path / "a.bin", b"old")

    def broken(handle):
        handle.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, broken)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["a.bin"]
