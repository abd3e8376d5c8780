"""Engine records as a parsed type of the manifest layer: round trips, every field refused with
the file and the field named, `engines_for` against hand-written selections, the one plan check,
and records written before the type existed (fixed JSON text) still loading. Also the ORT cache
record and the Triton model marker, which read in the same style. No TensorRT needed."""
from __future__ import annotations

import copy
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from ldmrt import engine_record
from ldmrt.engine_record import EngineRecord, check_plan, engines_for, read_engine_record
from ldmrt.engines.ort_cache import CacheKey, CacheRecord, FileFacts, read_cache_record
from ldmrt.errors import BundleError, CorruptEngineError
from ldmrt.manifest import load_manifest, write_manifest
from ldmrt.triton.ownership import MARKER, ModelMarker, read_marker

# A manifest as ldmrt wrote it before engine records were a parsed type (written by that code,
# then laid out for reading; JSON is the same data whatever the layout).
OLD_MANIFEST = """\
{
  "components": {
    "vae_decoder": {
      "dtype": "float32",
      "external_data": null,
      "file": "vae_decoder.onnx",
      "io": {
        "inputs": [
          {
            "dtype": "float32",
            "name": "latent",
            "shape": ["batch", 4, "latent_height", "latent_width"]
          }
        ],
        "outputs": [
          {
            "dtype": "float32",
            "name": "images",
            "shape": ["batch", 3, "4*latent_height", "4*latent_width"]
          }
        ],
        "ranges": {"batch": [1, 1, 4], "latent_height": [8, 16, 24], "latent_width": [8, 16, 24]}
      },
      "parity": null,
      "sha256": {
        "vae_decoder.onnx": "68e5d891ad5cb1b26424c026ff1b9f8f347cef17eee41a7949a2cbcdd9f5632b"
      },
      "size_bytes": 16
    }
  },
  "config": {
    "autoencoder": {
      "attn_levels": [],
      "ch": 32,
      "ch_mult": [1, 1, 2],
      "embed_dim": 4,
      "in_channels": 3,
      "kind": "kl",
      "n_embed": 0,
      "norm_num_groups": 32,
      "num_res_blocks": 1,
      "out_ch": 3,
      "z_channels": 4
    },
    "conditioner": {
      "bos_token_id": 998,
      "eos_token_id": 999,
      "hidden_act": "quick_gelu",
      "hidden_size": 32,
      "intermediate_size": 64,
      "kind": "clip_text",
      "layer": "last",
      "max_position_embeddings": 77,
      "num_attention_heads": 4,
      "num_hidden_layers": 2,
      "pad_token_id": 999,
      "vocab_size": 1000
    },
    "default_image_size": 64,
    "family": "sd1",
    "name": "tiny",
    "scale_factor": 0.18215,
    "scheduler": {
      "beta_end": 0.012,
      "beta_schedule": "scaled_linear",
      "beta_start": 0.00085,
      "clip_sample": false,
      "clip_sample_range": 1.0,
      "default_sampler": "ddim",
      "defaulted_fields": [],
      "num_train_timesteps": 1000,
      "original_inference_steps": 50,
      "prediction_type": "epsilon",
      "scheduler_class": "",
      "set_alpha_to_one": false,
      "steps_offset": 1,
      "timestep_scaling": 10.0,
      "timestep_spacing": "leading"
    },
    "unet": {
      "attention_resolutions": [1, 2],
      "channel_mult": [1, 2],
      "context_dim": 32,
      "in_channels": 4,
      "model_channels": 32,
      "norm_num_groups": 32,
      "num_classes": null,
      "num_head_channels": -1,
      "num_heads": 2,
      "num_res_blocks": 1,
      "out_channels": 4,
      "transformer_depth": 1,
      "upcast_attention": false,
      "use_linear_in_transformer": false,
      "use_spatial_transformer": true
    }
  },
  "created": "2025-11-02T08:00:00Z",
  "engines": [
    {
      "build_seconds": 12.5,
      "builder": "tensorrt",
      "builder_version": "10.13.0",
      "component": "vae_decoder",
      "created": "2025-11-02T08:30:00+00:00",
      "file": "vae_decoder.plan",
      "flags": {
        "optimization_level": 3,
        "refit": false,
        "strongly_typed": true,
        "version_compatible": false,
        "weight_streaming": false,
        "workspace_bytes": null
      },
      "key": "vae_decoder-trt10.13.0-sm90-fp32-0123456789ab",
      "onnx_sha256": "68e5d891ad5cb1b26424c026ff1b9f8f347cef17eee41a7949a2cbcdd9f5632b",
      "precision": "fp32",
      "profiles": [{"latent": [[1, 4, 8, 8], [1, 4, 16, 16], [4, 4, 24, 24]]}],
      "sha256": "f94b9fb7726d9e829624f4acf8c011ec1cf7c69d35e8c675fced25fd96c0b120",
      "size": 45,
      "targets": ["sm90"],
      "timing_cache": "created"
    },
    {
      "build_seconds": 12.5,
      "builder": "tensorrt-rtx",
      "builder_version": "1.2.0.54",
      "component": "vae_decoder",
      "created": "2025-11-02T08:30:00+00:00",
      "file": "vae_decoder.plan",
      "flags": {
        "optimization_level": 3,
        "refit": false,
        "strongly_typed": true,
        "version_compatible": false,
        "weight_streaming": false,
        "workspace_bytes": null
      },
      "key": "vae_decoder-trtrtx1.2.0.54-default-fp32-ba9876543210",
      "onnx_sha256": "68e5d891ad5cb1b26424c026ff1b9f8f347cef17eee41a7949a2cbcdd9f5632b",
      "precision": "fp32",
      "profiles": [{"latent": [[1, 4, 8, 8], [1, 4, 16, 16], [4, 4, 24, 24]]}],
      "sha256": "33e0d9e1926c044b8fc93681a44baee26b64cfeb4667554ac1647509fa4a3b53",
      "size": 52,
      "targets": ["default"],
      "timing_cache": "ignored"
    }
  ],
  "family": "sd1",
  "latent_scale": 0.18215,
  "ldmrt_version": "0.1.0",
  "name": "tiny",
  "postprocess": {"images": "clamp(x / 2 + 0.5, 0, 1)"},
  "precision": "fp16",
  "random_weights": true,
  "schema_version": 1,
  "shape_ranges": {
    "max_batch": 4,
    "max_size": 96,
    "min_size": 32,
    "opt_batch": 1,
    "opt_size": 64
  },
  "source": "preset:tiny",
  "tokenizer": null
}
"""

ONNX_SHA = "68e5d891ad5cb1b26424c026ff1b9f8f347cef17eee41a7949a2cbcdd9f5632b"
FLAGS = {"optimization_level": 3, "refit": False, "strongly_typed": True, "version_compatible": False,
         "weight_streaming": False, "workspace_bytes": None}
PROFILE = {"latent": ((1, 4, 8, 8), (1, 4, 16, 16), (4, 4, 24, 24))}
# What OLD_MANIFEST's engines are, written out by hand.
OLD_ENGINES = (
    EngineRecord(component="vae_decoder", file="vae_decoder.plan",
                 sha256="f94b9fb7726d9e829624f4acf8c011ec1cf7c69d35e8c675fced25fd96c0b120", size=45,
                 builder="tensorrt", builder_version="10.13.0", targets=("sm90",), precision="fp32",
                 profiles=(PROFILE,), onnx_sha256=ONNX_SHA, build_seconds=12.5,
                 created="2025-11-02T08:30:00+00:00", flags=FLAGS,
                 key="vae_decoder-trt10.13.0-sm90-fp32-0123456789ab", timing_cache="created"),
    EngineRecord(component="vae_decoder", file="vae_decoder.plan",
                 sha256="33e0d9e1926c044b8fc93681a44baee26b64cfeb4667554ac1647509fa4a3b53", size=52,
                 builder="tensorrt-rtx", builder_version="1.2.0.54", targets=("default",), precision="fp32",
                 profiles=(PROFILE,), onnx_sha256=ONNX_SHA, build_seconds=12.5,
                 created="2025-11-02T08:30:00+00:00", flags=FLAGS,
                 key="vae_decoder-trtrtx1.2.0.54-default-fp32-ba9876543210", timing_cache="ignored"),
)

# <component>.engine.json as export/tensorrt.write_engine wrote it (json.dumps(indent=2) of the
# dataclass fields in order), for the first of OLD_ENGINES.
OLD_RECORD_FILE = """\
{
  "component": "vae_decoder",
  "file": "vae_decoder.plan",
  "sha256": "f94b9fb7726d9e829624f4acf8c011ec1cf7c69d35e8c675fced25fd96c0b120",
  "size": 45,
  "builder": "tensorrt",
  "builder_version": "10.13.0",
  "targets": ["sm90"],
  "precision": "fp32",
  "profiles": [{"latent": [[1, 4, 8, 8], [1, 4, 16, 16], [4, 4, 24, 24]]}],
  "onnx_sha256": "68e5d891ad5cb1b26424c026ff1b9f8f347cef17eee41a7949a2cbcdd9f5632b",
  "build_seconds": 12.5,
  "created": "2025-11-02T08:30:00+00:00",
  "flags": {"strongly_typed": true, "refit": false, "weight_streaming": false,
            "version_compatible": false, "optimization_level": 3, "workspace_bytes": null},
  "key": "vae_decoder-trt10.13.0-sm90-fp32-0123456789ab",
  "timing_cache": "created"
}
"""


def write_bundle(folder: Path, text: str = OLD_MANIFEST) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text(text)
    return folder


def old_engine_dict() -> dict:
    return copy.deepcopy(json.loads(OLD_MANIFEST)["engines"][0])


# --- records written before the type: they still load, and are written back unchanged ----------

def test_an_old_manifest_loads_with_its_engines_as_records(tmp_path):
    manifest = load_manifest(write_bundle(tmp_path / "old"))
    assert manifest.engines == OLD_ENGINES
    assert all(isinstance(record, EngineRecord) for record in manifest.engines)


def test_the_on_disk_format_does_not_change(tmp_path):
    manifest = load_manifest(write_bundle(tmp_path / "old"))
    assert manifest.to_dict() == json.loads(OLD_MANIFEST)
    write_manifest(tmp_path / "old", manifest)                       # what the builder rewrites
    assert json.loads((tmp_path / "old" / "manifest.json").read_text()) == json.loads(OLD_MANIFEST)


def test_an_old_record_file_reads(tmp_path):
    path = tmp_path / "vae_decoder.engine.json"
    path.write_text(OLD_RECORD_FILE)
    assert read_engine_record(path) == OLD_ENGINES[0]
    assert OLD_ENGINES[0].to_dict() == json.loads(OLD_RECORD_FILE)


def test_a_record_round_trips_through_json():
    record = replace(OLD_ENGINES[1], targets=("sm86", "sm89"), build_seconds=0.25,
                     profiles=(PROFILE, {"latent": ((2, 4, 8, 8),) * 3}), flags={"refit": True})
    assert EngineRecord.from_dict(json.loads(json.dumps(record.to_dict()))) == record


# --- every field refused, naming the file and the field ------------------------------------------

KEYS = ["component", "file", "sha256", "size", "builder", "builder_version", "targets", "precision",
        "profiles", "onnx_sha256", "build_seconds", "created", "flags", "key", "timing_cache"]

# (field, bad value, the field path the error names, relative to the record)
BAD_VALUES = [
    ("component", 3, "component"), ("component", "UNet", "component"),
    ("file", "../vae_decoder.plan", "file"), ("file", "", "file"), ("file", None, "file"),
    ("sha256", "abc", "sha256"), ("sha256", "F" * 64, "sha256"),
    ("size", "45", "size"), ("size", 0, "size"), ("size", True, "size"), ("size", 4.5, "size"),
    ("builder", "TensorRT RTX", "builder"), ("builder", ["tensorrt"], "builder"), ("builder", "", "builder"),
    ("builder_version", "", "builder_version"), ("builder_version", 10, "builder_version"),
    ("targets", [], "targets"), ("targets", "sm90", "targets"), ("targets", [90], "targets[0]"),
    ("targets", ["sm90", "SM 89"], "targets[1]"),
    ("precision", "fp8", "precision"), ("precision", None, "precision"),
    ("profiles", [], "profiles"), ("profiles", {"latent": []}, "profiles"),
    ("profiles", [{}], "profiles[0]"), ("profiles", [[1, 2, 3]], "profiles[0]"),
    ("profiles", [{"latent": [[1, 4, 8, 8], [1, 4, 8, 8]]}], "profiles[0].latent"),
    ("profiles", [{"latent": [[2], [1], [3]]}], "profiles[0].latent"),            # min > opt
    ("profiles", [{"latent": [[1, 4], [1], [1]]}], "profiles[0].latent"),         # ranks differ
    ("profiles", [{"latent": [[1], [1], ["batch"]]}], "profiles[0].latent[2][0]"),
    ("profiles", [{"latent": [[1], [1], [-1]]}], "profiles[0].latent[2][0]"),
    ("profiles", [{"no spaces": [[1], [1], [1]]}], "profiles[0]"),
    ("onnx_sha256", "0" * 63, "onnx_sha256"),
    ("build_seconds", -1.0, "build_seconds"), ("build_seconds", "12.5", "build_seconds"),
    ("build_seconds", math.inf, "build_seconds"),
    ("created", "yesterday", "created"), ("created", "2025-11-02T08:30:00", "created"),
    ("created", "2025-11-02T08:30:00+02:00", "created"),
    ("flags", [], "flags"), ("flags", {"version_compatible": "yes"}, "flags.version_compatible"),
    ("flags", {"refit": {1, 2}}, "flags.refit"),
    ("key", "../../elsewhere", "key"), ("key", "a/b", "key"), ("key", "", "key"),
    ("timing_cache", "maybe", "timing_cache"),
]


def bad_records():
    for key in KEYS:
        data = old_engine_dict()
        del data[key]
        yield f"missing {key}", data, key
    data = old_engine_dict()
    data["gpu"] = "sm90"
    yield "unknown key", data, None
    for key, value, where in BAD_VALUES:
        data = old_engine_dict()
        data[key] = value
        yield f"{key}={value!r}", data, where


BAD_RECORDS = list(bad_records())


def test_the_table_covers_every_field():
    assert sorted(KEYS) == sorted(old_engine_dict()) == sorted(f for f in EngineRecord.__dataclass_fields__)
    assert {key for key, _, _ in BAD_VALUES} == set(KEYS)


def json_text(data) -> str | None:
    """`data` as JSON text, or None where JSON cannot say it (infinity, a set): such values are
    checked as in-memory data, with the same origin in the message."""
    try:
        return json.dumps(data, allow_nan=False)
    except (TypeError, ValueError):
        return None


@pytest.mark.parametrize("case,data,where", BAD_RECORDS, ids=[case[:50] for case, _, _ in BAD_RECORDS])
def test_a_bad_record_in_the_manifest_names_the_bundle_and_the_field(tmp_path, case, data, where):
    from ldmrt.manifest import Manifest

    manifest = json.loads(OLD_MANIFEST)
    manifest["engines"][1] = data
    bundle = tmp_path / "bundle"
    text = json_text(manifest)
    with pytest.raises(BundleError) as info:
        if text is None:
            Manifest.from_dict(manifest, origin=str(bundle))
        else:
            load_manifest(write_bundle(bundle, text))
    message = str(info.value)
    field = "engines[1]" if where is None else f"engines[1].{where}"
    assert message.startswith(f"bundle {bundle}: manifest.json field {field}: expected "), message
    if case.startswith("missing"):
        assert "the key is missing" in message
    if where is None:
        assert "the unknown key 'gpu'" in message


@pytest.mark.parametrize("case,data,where", BAD_RECORDS, ids=[case[:50] for case, _, _ in BAD_RECORDS])
def test_a_bad_record_file_names_the_file_and_the_field(tmp_path, case, data, where):
    path = tmp_path / "engines" / "vae_decoder-x" / "vae_decoder.engine.json"
    path.parent.mkdir(parents=True)
    text = json_text(data)
    with pytest.raises(CorruptEngineError) as info:
        if text is None:
            EngineRecord.from_dict(data, origin=str(path.parent), document=path.name)
        else:
            path.write_text(text)
            read_engine_record(path)
    message = str(info.value)
    field = "<root>" if where is None else where
    assert isinstance(info.value, BundleError)
    assert message.startswith(f"engine folder {path.parent}: {path.name} field {field}: expected "), message
    assert message.endswith("; rebuild the engine")


def test_a_record_file_that_is_not_json_or_too_large_names_the_file(tmp_path):
    path = tmp_path / "unet.engine.json"
    for content, found in [(b"{not json", "invalid JSON"), (b"\xff\xfe", "not UTF-8"),
                           (b'{"a": NaN}', "non-finite"), (b"[" * 100 + b"]" * 100, "levels of nesting"),
                           (b" " * (engine_record.MAX_RECORD_BYTES + 1), "at most")]:
        path.write_bytes(content)
        with pytest.raises(CorruptEngineError, match=found) as info:
            read_engine_record(path)
        assert str(info.value).startswith(f"engine folder {tmp_path}: "), str(info.value)
        assert "unet.engine.json" in str(info.value)
    path.unlink()
    with pytest.raises(CorruptEngineError, match=f"engine folder {tmp_path}: cannot read unet.engine.json"):
        read_engine_record(path)


# --- engines_for ---------------------------------------------------------------------------------

def record(key: str, component: str, builder: str, targets: tuple[str, ...], batch: int) -> EngineRecord:
    return replace(OLD_ENGINES[0], key=key, component=component, builder=builder, targets=targets,
                   profiles=({"latent": ((1, 4, 8, 8), (1, 4, 16, 16), (batch, 4, 24, 24))},))


TRT, RTX = "tensorrt", "tensorrt-rtx"
LISTED = (                                    # oldest first, as a manifest lists them
    record("unet-a", "unet", TRT, ("sm86",), 4),
    record("vae-a", "vae_decoder", TRT, ("sm86",), 4),
    record("unet-b", "unet", RTX, ("default",), 4),
    record("unet-c", "unet", TRT, ("sm90",), 8),
    record("unet-d", "unet", TRT, ("ampere+",), 2),
    record("vae-b", "vae_decoder", RTX, ("sm89",), 4),
    record("unet-e", "unet", RTX, ("sm86", "sm89"), 8),
)


@pytest.mark.parametrize("component,builder,key,expected", [
    ("unet", None, None, ["unet-e", "unet-d", "unet-c", "unet-b", "unet-a"]),
    ("unet", TRT, None, ["unet-d", "unet-c", "unet-a"]),
    ("unet", RTX, None, ["unet-e", "unet-b"]),
    ("vae_decoder", TRT, None, ["vae-a"]),
    ("vae_decoder", RTX, None, ["vae-b"]),
    ("unet", TRT, "unet-c", ["unet-c"]),
    ("unet", RTX, "unet-c", []),
    ("vae_decoder", None, "unet-c", []),
    (None, None, "vae-b", ["vae-b"]),
    (None, RTX, None, ["unet-e", "vae-b", "unet-b"]),
    ("text_encoder", None, None, []),
    (None, None, None, ["unet-e", "vae-b", "unet-d", "unet-c", "unet-b", "vae-a", "unet-a"]),
])
def test_engines_for_picks_exactly_the_right_records_newest_first(component, builder, key, expected):
    found = engines_for(LISTED, component, builder=builder, key=key)
    assert [r.key for r in found] == expected
    assert all(isinstance(r, EngineRecord) for r in found)


def test_engines_for_takes_a_manifests_records(tmp_path):
    manifest = load_manifest(write_bundle(tmp_path / "old"))
    assert engines_for(manifest.engines, "vae_decoder", builder=RTX) == (OLD_ENGINES[1],)
    assert engines_for(manifest.engines, "vae_decoder") == OLD_ENGINES[::-1]


def test_with_engine_replaces_the_record_of_its_key_and_lists_it_last(tmp_path):
    manifest = load_manifest(write_bundle(tmp_path / "old"))
    rebuilt = replace(OLD_ENGINES[0], sha256="e" * 64, build_seconds=3.0)
    assert manifest.with_engine(rebuilt).engines == (OLD_ENGINES[1], rebuilt)
    new = replace(OLD_ENGINES[0], key="vae_decoder-new")
    assert manifest.with_engine(new).engines == OLD_ENGINES + (new,)


# --- the plan check ------------------------------------------------------------------------------

def plan_and_record(tmp_path: Path) -> tuple[EngineRecord, Path]:
    import hashlib

    plan = tmp_path / "engines" / "unet-x" / "unet.plan"
    plan.parent.mkdir(parents=True)
    data = bytes(range(256)) * 40
    plan.write_bytes(data)
    return replace(OLD_ENGINES[0], component="unet", key="unet-x", file="unet.plan", size=len(data),
                   sha256=hashlib.sha256(data).hexdigest()), plan


def test_the_plan_check_passes_an_intact_plan(tmp_path):
    record, plan = plan_and_record(tmp_path)
    check_plan(record, plan, tmp_path)
    assert engine_record.engine_plan_path(tmp_path, record) == plan


def test_the_plan_check_refuses_a_plan_one_byte_shorter_without_hashing_it(tmp_path, monkeypatch):
    record, plan = plan_and_record(tmp_path)
    plan.write_bytes(plan.read_bytes()[:-1])

    def no_hashing(path):
        raise AssertionError(f"hashed {path}")
    monkeypatch.setattr(engine_record, "sha256_file", no_hashing)
    with pytest.raises(CorruptEngineError) as info:
        check_plan(record, plan, tmp_path)
    message = str(info.value)
    assert f"plan {plan} does not match the size in its record: size {record.size - 1}" in message
    assert f"the record says size {record.size}" in message
    assert f"rebuild it: ldmrt build {tmp_path} --backend tensorrt" in message


@pytest.mark.parametrize("index", [0, 5000, -1])
def test_the_plan_check_refuses_a_plan_with_a_flipped_byte(tmp_path, index):
    record, plan = plan_and_record(tmp_path)
    data = bytearray(plan.read_bytes())
    data[index] ^= 0x01
    plan.write_bytes(bytes(data))
    with pytest.raises(CorruptEngineError) as info:
        check_plan(record, plan, tmp_path)
    message = str(info.value)
    assert f"unet engine unet-x: plan {plan} does not match the sha256 in its record" in message
    assert record.sha256[:12] in message


def test_the_plan_check_refuses_a_missing_plan(tmp_path):
    record, plan = plan_and_record(tmp_path)
    plan.unlink()
    with pytest.raises(CorruptEngineError, match=f"plan {plan} is missing"):
        check_plan(record, plan, tmp_path)
    plan.mkdir()                                        # a folder where the plan should be
    with pytest.raises(CorruptEngineError, match=f"plan {plan} is missing"):
        check_plan(record, plan, tmp_path)


# --- the ORT cache record and the Triton model marker: the same style ---------------------------

OLD_CACHE_RECORD = """\
{
  "component": "unet",
  "files": {
    "graph.onnx": {"sha256": "1111111111111111111111111111111111111111111111111111111111111111", "size": 2048},
    "graph.onnx.data": {"sha256": "2222222222222222222222222222222222222222222222222222222222222222", "size": 4096}
  },
  "key": {"graph_sha256": "68e5d891ad5cb1b26424c026ff1b9f8f347cef17eee41a7949a2cbcdd9f5632b",
          "isa": ["avx", "avx2", "fma"], "level": "ORT_ENABLE_ALL", "machine": "x86_64",
          "onnxruntime": "1.20.1"},
  "schema": 2
}
"""
CACHE_RECORD = CacheRecord(
    component="unet",
    key=CacheKey(graph_sha256=ONNX_SHA, onnxruntime="1.20.1", machine="x86_64", isa=("avx", "avx2", "fma")),
    files={"graph.onnx": FileFacts(2048, "1" * 64), "graph.onnx.data": FileFacts(4096, "2" * 64)})


def test_an_old_ort_cache_record_reads_and_writes_back_the_same(tmp_path):
    (tmp_path / "record.json").write_text(OLD_CACHE_RECORD)
    assert read_cache_record(tmp_path) == CACHE_RECORD
    assert CACHE_RECORD.to_dict() == json.loads(OLD_CACHE_RECORD)


@pytest.mark.parametrize("edit,where", [
    (lambda d: d.update(schema=1), "schema"),
    (lambda d: d.pop("component"), "component"),
    (lambda d: d["key"].update(isa="avx"), "key.isa"),
    (lambda d: d["key"].pop("level"), "key.level"),
    (lambda d: d["files"]["graph.onnx"].update(size="2048"), 'files["graph.onnx"].size'),
    (lambda d: d["files"].update({"../graph.onnx": d["files"]["graph.onnx"]}), "files"),
    (lambda d: d["files"].pop("graph.onnx"), "files"),
    (lambda d: d.update(extra=1), "<root>"),
])
def test_a_bad_ort_cache_record_names_the_file_and_the_field(tmp_path, edit, where):
    data = json.loads(OLD_CACHE_RECORD)
    edit(data)
    (tmp_path / "record.json").write_text(json.dumps(data))
    with pytest.raises(BundleError) as info:
        read_cache_record(tmp_path)
    assert str(info.value).startswith(f"ORT cache entry {tmp_path}: record.json field {where}: expected ")


OLD_MARKER = """\
{
 "contents": {
  "1": {"dir": true},
  "1/model.onnx": {"sha256": "3333333333333333333333333333333333333333333333333333333333333333", "size": 10},
  "1/weights": {"link": "../shared/weights"},
  "1/fifo": {"other": 4096},
  "config.pbtxt": {"sha256": "4444444444444444444444444444444444444444444444444444444444444444", "size": 99}
 },
 "format": 1,
 "group": "pipeline",
 "written_by": "ldmrt triton"
}
"""
MARKER_RECORD = ModelMarker(group="pipeline", contents={
    "1": {"dir": True}, "1/model.onnx": {"sha256": "3" * 64, "size": 10},
    "1/weights": {"link": "../shared/weights"}, "1/fifo": {"other": 4096},
    "config.pbtxt": {"sha256": "4" * 64, "size": 99}})


def test_an_old_triton_marker_reads_and_writes_back_the_same(tmp_path):
    (tmp_path / MARKER).write_text(OLD_MARKER)
    assert read_marker(tmp_path) == MARKER_RECORD
    assert MARKER_RECORD.to_dict() == json.loads(OLD_MARKER)


@pytest.mark.parametrize("edit,where", [
    (lambda d: d.update(format=2), "format"),
    (lambda d: d.update(group=""), "group"),
    (lambda d: d.update(written_by="someone"), "written_by"),
    (lambda d: d["contents"]["1"].update(dir=False), "contents.1.dir"),
    (lambda d: d["contents"]["1/model.onnx"].pop("sha256"), 'contents["1/model.onnx"].sha256'),
    (lambda d: d["contents"]["1/weights"].update(size=3), 'contents["1/weights"]'),
    (lambda d: d["contents"].update({"x": []}), "contents.x"),
])
def test_a_bad_triton_marker_is_named_and_does_not_count_as_ldmrts(tmp_path, edit, where):
    data = json.loads(OLD_MARKER)
    edit(data)
    with pytest.raises(BundleError) as info:
        ModelMarker.from_dict(data, origin=str(tmp_path))
    assert str(info.value).startswith(f"Triton model folder {tmp_path}: {MARKER} field {where}: expected "), \
        str(info.value)
    (tmp_path / MARKER).write_text(json.dumps(data))
    assert read_marker(tmp_path) is None          # not proof that ldmrt wrote the folder


def test_every_engine_backend_is_a_builder_a_record_may_name():
    from ldmrt.engines.backend import ENGINE_BACKENDS

    for backend in ENGINE_BACKENDS:
        assert EngineRecord.from_dict({**old_engine_dict(), "builder": backend.value}).builder == backend.value
