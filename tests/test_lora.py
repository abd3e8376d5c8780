"""LoRA in ldmrt: fused at export, switched at run time on the torch backend, bad files refused.

References: the definition written out in float64 (W + scale * alpha / rank * up @ down) for the
deltas, the base weights kept before any switch for the bit-for-bit restore, fresh pipelines for
the switched ones, and the bundle exported with the adapter fused for the run-time switch.
diffusers' own loading (load_lora_weights + fuse_lora) is the reference in tests/test_lora_parity.py.
"""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ldmrt.errors import BundleError, LoraError
from ldmrt.export.bundle import ExportOptions, export_bundle, preset_source
from ldmrt.lora.choice import LoraChoice
from ldmrt.lora.reading import Layout, read_lora
from ldmrt.lora.switch import WeightSwitch
from ldmrt.lora.targets import UNET_PREFIX, lora_deltas
from ldmrt.runtime.pipeline import GenerationRequest, Pipeline

COMPONENTS = ("text_encoder", "unet", "vae_decoder")
REQUEST = GenerationRequest(prompt="a red fox", steps=4, seed=1, height=32, width=32)
TEXT_PREFIX = "cond_stage_model.transformer."


def _targets(model, prefix: str, suffixes: tuple[str, ...]) -> dict[str, torch.nn.Module]:
    return {name[len(prefix):]: module for name, module in model.named_modules()
            if name.startswith(prefix) and name.endswith(suffixes)}


def write_kohya(model, path: Path, seed: int, rank: int = 2, alpha: float = 1.0, scale: float = 0.3,
                text: bool = True, conv: bool = True) -> Path:
    """Random kohya-layout adapters on CompVis UNet names (attention, GEGLU and, with conv, the
    ResNet convs) and, with text, the CLIP attention."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    suffixes = ("attn1.to_q", "attn2.to_v", "ff.net.0.proj") + (("in_layers.2",) if conv else ())
    groups = [("lora_unet", _targets(model, UNET_PREFIX, suffixes))]
    if text:
        groups.append(("lora_te", _targets(model, TEXT_PREFIX, ("self_attn.q_proj", "mlp.fc1"))))
    for prefix, modules in groups:
        for name, module in modules.items():
            key = f"{prefix}_{name.replace('.', '_')}"
            weight = module.weight
            kernel = tuple(weight.shape[2:])
            tensors[f"{key}.lora_down.weight"] = torch.randn(rank, weight.shape[1], *kernel, generator=g) * scale
            tensors[f"{key}.lora_up.weight"] = torch.randn(weight.shape[0], rank, *((1, 1) if kernel else ()),
                                                           generator=g) * scale
            tensors[f"{key}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    source = preset_source("tiny")
    files = {name: write_kohya(source.model, root / f"{name}.safetensors", seed)
             for name, seed in (("a", 1), ("b", 2))}
    export_bundle(source, root / "plain", ExportOptions(components=COMPONENTS))
    export_bundle(source, root / "fused-b", ExportOptions(components=COMPONENTS, loras=(LoraChoice(files["b"], 0.7),)))
    return root, source, files


# --- the deltas ------------------------------------------------------------------------------

def test_deltas_follow_the_definition(setup):
    """float64 numpy: scale * alpha / rank * up @ down, reshaped to the weight (LoCon convs too)."""
    _, source, files = setup
    lora = read_lora(files["a"])
    assert lora.layout == Layout.KOHYA
    deltas = lora_deltas(source.model, [LoraChoice(files["a"], 0.5)])
    assert len(deltas) == len(lora.pairs)
    state = source.model.state_dict()
    checked_conv = False
    for (_, module), pair in lora.pairs.items():
        prefix = UNET_PREFIX if pair.keys[0].startswith("lora_unet") else TEXT_PREFIX
        key = next(k for k in deltas if k.startswith(prefix) and k[len(prefix):-len(".weight")].replace(".", "_") == module)
        up, down = pair.up.astype(np.float64), pair.down.astype(np.float64)
        expected = 0.5 * pair.alpha / pair.rank * (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1))
        np.testing.assert_allclose(deltas[key].astype(np.float64), expected.reshape(state[key].shape), rtol=1e-5, atol=1e-7)
        checked_conv |= state[key].dim() == 4 and state[key].shape[-1] == 3
    assert checked_conv


# --- fused at export --------------------------------------------------------------------------

def test_export_fuses_records_and_leaves_the_source_model_alone(setup):
    root, source, files = setup
    from ldmrt.checkpoints.source import weights_digest
    from ldmrt.manifest import load_manifest

    manifest = load_manifest(root / "fused-b")
    (path, digest, scale), = manifest.model_source.loras
    assert (Path(path), digest, scale) == (files["b"].absolute(), read_lora(files["b"]).sha256, 0.7)
    assert manifest.model_source.weights_sha256 != load_manifest(root / "plain").model_source.weights_sha256
    assert weights_digest(source.model) == load_manifest(root / "plain").model_source.weights_sha256
    fused = Pipeline.load(root / "fused-b", "onnxruntime").generate(REQUEST).images
    plain = Pipeline.load(root / "plain", "onnxruntime").generate(REQUEST).images
    assert np.abs(fused - plain).max() > 1e-3                      # the adapter shows
    # the torch backend rebuilds the model and fuses the recorded file again (digest proven)
    torch_fused = Pipeline.load(root / "fused-b", "torch", device="cpu").generate(REQUEST).images
    assert np.abs(torch_fused - fused).max() < 1e-4


def test_a_changed_adapter_file_is_refused_by_the_torch_backend(setup, tmp_path):
    root, source, _ = setup
    path = write_kohya(source.model, tmp_path / "c.safetensors", seed=3)
    export_bundle(source, tmp_path / "bundle", ExportOptions(components=("unet",), loras=(LoraChoice(path),),
                                                             validate=False, optimize=False))
    write_kohya(source.model, path, seed=4)
    with pytest.raises(BundleError, match="changed since export"):
        Pipeline.load(tmp_path / "bundle", "torch", device="cpu")


# --- switched at run time ---------------------------------------------------------------------

def test_switching_gives_fresh_pipelines_images_and_restores_the_base_bit_for_bit(setup):
    root, source, files = setup
    pipeline = Pipeline.load(root / "plain", "torch", device="cpu")
    state = pipeline.runners["unet"].graph.unet.state_dict()
    base = {k: v.clone() for k, v in state.items()}
    none = pipeline.generate(REQUEST).images
    pipeline.loras.set([f"{files['a']}:1.0"])
    with_a = pipeline.generate(REQUEST).images
    pipeline.loras.set([LoraChoice(files["b"], 0.7)])
    with_b = pipeline.generate(REQUEST).images
    assert np.abs(with_a - with_b).max() > 1e-3
    fused_b = Pipeline.load(root / "fused-b", "onnxruntime").generate(REQUEST).images
    assert np.abs(with_b - fused_b).max() < 1e-4                # = a fresh pipeline with B
    pipeline.loras.set([])
    assert all(torch.equal(v, base[k]) for k, v in pipeline.runners["unet"].graph.unet.state_dict().items())
    np.testing.assert_array_equal(pipeline.generate(REQUEST).images, none)
    fresh = Pipeline.load(root / "plain", "torch", device="cpu").generate(REQUEST).images
    np.testing.assert_array_equal(fresh, none)


def test_two_adapters_add(setup):
    _, source, files = setup
    both = lora_deltas(source.model, [LoraChoice(files["a"], 0.5), LoraChoice(files["b"], -0.25)])
    a = lora_deltas(source.model, [LoraChoice(files["a"], 0.5)])
    b = lora_deltas(source.model, [LoraChoice(files["b"], -0.25)])
    assert set(both) == set(a) == set(b)
    assert all(np.allclose(both[k], a[k] + b[k], rtol=0, atol=1e-7) for k in both)


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_requests_in_flight_see_old_or_new_weights_never_a_mix(setup, backend):
    """Generations on threads while the adapters switch between none and A: each image equals
    the one of none or the one of A (a mix of the two weight sets would equal neither; ONNX
    Runtime's new sessions may differ from each other in the last bit, not more)."""
    root, _, files = setup
    pipeline = Pipeline.load(root / "plain", backend, **({"device": "cpu"} if backend == "torch" else {}))
    request = GenerationRequest(prompt="a red fox", steps=8, seed=1, height=32, width=32)
    none = pipeline.generate(request).images
    pipeline.loras.set([files["a"]])
    with_a = pipeline.generate(request).images
    found, errors = [], []

    def work():
        try:
            for _ in range(3):
                found.append(pipeline.generate(request).images)
        except Exception as exc:          # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for i in range(6):
        pipeline.loras.set([] if i % 2 == 0 else [files["a"]])
    for t in threads:
        t.join()
    assert not errors and len(found) == 9
    assert all(np.allclose(image, none, rtol=0, atol=1e-6) or np.allclose(image, with_a, rtol=0, atol=1e-6)
               for image in found)


def test_a_backend_without_a_switch_refuses_by_name():
    """TensorRT engines built without --refit cannot take new weights: the slot says so, naming the field."""
    from ldmrt.lora.slot import AdapterSlot

    with pytest.raises(LoraError) as raised:
        AdapterSlot(None, "tensorrt").set(["a.safetensors"], "--lora")
    assert raised.value.field == "--lora" and "tensorrt" in str(raised.value) and "--refit" in str(raised.value)
    slot = AdapterSlot(None, "tensorrt")
    assert not slot.can_switch and "--refit" in slot.why_not        # the Triton model refuses to load on it


# --- bad files --------------------------------------------------------------------------------

def _bad(tmp_path, tensors: dict, name: str = "bad.safetensors") -> Path:
    path = tmp_path / name
    save_file(tensors, str(path))
    return path


def _kohya_pair(model, rank: int = 2):
    name, module = next(iter(_targets(model, UNET_PREFIX, ("attn1.to_q",)).items()))
    key = "lora_unet_" + name.replace(".", "_")
    out, inp = module.weight.shape
    return key, {f"{key}.lora_down.weight": torch.ones(rank, inp) * 0.01, f"{key}.lora_up.weight": torch.ones(out, rank)}


@pytest.mark.parametrize("case, expected", [
    ("unmatched", "no unet Linear or Conv2d module named 'input_blocks_99_1_proj_in'"),
    ("wrong shape", "the pair's update has shape"),
    ("wrong rank", "ranks do not match"),
    ("nan", "NaN or infinite"),
    ("half a pair", "half of the pair is missing"),
    ("lycoris", "a lora_mid tensor: only plain LoRA"),
    ("unknown key", "tensor 'model.weird': expected"),
    ("no text encoder 2", "targets the text_encoder_2, which this model (tiny) does not have"),
    ("mixed", "mixes the diffusers and kohya layouts"),
])
def test_bad_adapter_files_are_refused_naming_the_tensor(setup, tmp_path, case, expected):
    _, source, _ = setup
    model = source.model
    key, pair = _kohya_pair(model)
    tensors = dict(pair)
    if case == "unmatched":
        tensors = {k.replace(key, "lora_unet_input_blocks_99_1_proj_in"): v for k, v in pair.items()}
    elif case == "wrong shape":
        tensors[f"{key}.lora_down.weight"] = torch.ones(2, 7)
    elif case == "wrong rank":
        tensors[f"{key}.lora_up.weight"] = torch.ones(pair[f"{key}.lora_up.weight"].shape[0], 3)
    elif case == "nan":
        tensors[f"{key}.lora_up.weight"] = torch.full_like(pair[f"{key}.lora_up.weight"], float("nan"))
    elif case == "half a pair":
        del tensors[f"{key}.lora_up.weight"]
    elif case == "lycoris":
        tensors[f"{key}.lora_mid.weight"] = torch.ones(2, 2, 3, 3)
    elif case == "unknown key":
        tensors["model.weird"] = torch.ones(1)
    elif case == "no text encoder 2":
        tensors = {"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.ones(2, 4),
                   "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.ones(4, 2)}
    elif case == "mixed":
        tensors["unet.down_blocks.0.attentions.0.proj_in.lora_A.weight"] = torch.ones(2, 4)
    path = _bad(tmp_path, tensors)
    with pytest.raises(LoraError) as raised:
        lora_deltas(model, [LoraChoice(path)])
    assert expected in str(raised.value) and raised.value.field == "lora"
    assert str(path) in str(raised.value)


def test_a_pickle_or_a_missing_file_is_refused_before_reading(tmp_path):
    pickled = tmp_path / "adapter.ckpt"
    torch.save({"lora_unet_x.lora_down.weight": torch.ones(1, 1)}, pickled)
    with pytest.raises(LoraError, match="expected a .safetensors LoRA file"):
        read_lora(pickled)
    with pytest.raises(LoraError, match="expected a weight file, found nothing"):
        read_lora(tmp_path / "missing.safetensors")
    with pytest.raises(LoraError, match="scale inf: expected a finite number"):
        LoraChoice.parse(f"{tmp_path / 'x.safetensors'}:inf")


def test_a_failed_switch_changes_no_weight(setup, tmp_path):
    root, source, files = setup
    key, pair = _kohya_pair(source.model)
    bad = _bad(tmp_path, {**pair, f"{key}.lora_up.weight": torch.ones(3, 3)})
    pipeline = Pipeline.load(root / "plain", "torch", device="cpu")
    pipeline.loras.set([files["a"]])
    before = {k: v.clone() for k, v in pipeline.runners["unet"].graph.unet.state_dict().items()}
    with pytest.raises(LoraError):
        pipeline.loras.set([files["b"], bad])
    assert all(torch.equal(v, before[k]) for k, v in pipeline.runners["unet"].graph.unet.state_dict().items())
    assert pipeline.loras.active == (LoraChoice(files["a"]),)


def test_weight_switch_on_a_model_restores_every_tensor(setup):
    _, source, files = setup
    model = source.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    switch = WeightSwitch(model)
    switch.set([LoraChoice(files["a"], 2.0)])
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())
    switch.set([])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# --- the command line -------------------------------------------------------------------------

def test_cli_export_and_generate_take_lora(setup, tmp_path):
    from typer.testing import CliRunner

    from ldmrt.cli import app

    root, _, files = setup
    runner = CliRunner()
    result = runner.invoke(app, ["export", "tiny", "--out", str(tmp_path / "b"), "--components", "unet",
                                 "--no-validate", "--lora", f"{files['b']}:0.7"])
    assert result.exit_code == 0, result.output
    assert "LoRA fused" in result.output
    generate = ["generate", str(root / "plain"), "--prompt", "a red fox", "--steps", "4", "--seed", "1",
                "--height", "32", "--width", "32"]
    pickled = tmp_path / "adapter.ckpt"
    pickled.write_bytes(b"not read")
    result = runner.invoke(app, generate + ["--lora", str(pickled), "--out", str(tmp_path / "x.png")])
    assert result.exit_code == 2 and "--lora" in result.output and "---" not in result.output
    assert not (tmp_path / "x.png").exists()
    fused = Pipeline.load(root / "fused-b", "onnxruntime").generate(REQUEST).images
    for backend in ("torch", "onnxruntime"):
        result = runner.invoke(app, generate + ["--backend", backend, "--lora", f"{files['b']}:0.7",
                                                "--out", str(tmp_path / f"{backend}.npy")])
        assert result.exit_code == 0, result.output
        assert np.abs(np.load(tmp_path / f"{backend}.npy") - fused).max() < 1e-4, backend


# --- names -------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["sd1", "sd2", "ldm-class"])
def test_diffusers_names_of_compvis_keys_are_diffusers_own(family):
    """unet_diffusers_names inverts unet_from_diffusers on every key of diffusers' own UNet."""
    import diffusers

    from ldmrt.checkpoints.diffusers_unet import diffusers_unet_config
    from ldmrt.models.convert import unet_diffusers_names, unet_from_diffusers
    from tests.families import FAMILIES

    config = FAMILIES[family].unet
    theirs = list(diffusers.UNet2DConditionModel(**diffusers_unet_config(config)).state_dict())
    ours = list(unet_from_diffusers({k: torch.empty(0) for k in theirs}, config))
    assert list(unet_diffusers_names(ours, config).values()) == theirs


def test_whole_module_prefixes_are_found_under_both_names(setup):
    """conv_in, conv_out and the time MLP are whole CompVis prefixes (input_blocks.0.0, out.2,
    time_embed.0): a LoRA on them lands under either spelling, dotted or kohya's."""
    from ldmrt.lora.reading import Component
    from ldmrt.lora.targets import module_index

    _, source, _ = setup
    index = module_index(source.model)
    for theirs, ours in (("conv_in", "input_blocks.0.0"), ("conv_out", "out.2"),
                         ("time_embedding.linear_1", "time_embed.0"),
                         ("down_blocks.0.resnets.0.conv1", "input_blocks.1.0.in_layers.2")):
        for name in (theirs, ours, theirs.replace(".", "_"), ours.replace(".", "_")):
            assert index.key(Component.UNET, name) == f"{UNET_PREFIX}{ours}.weight", name
    assert index.key(Component.TEXT_ENCODER, "encoder.layers.0.self_attn.q_proj") == \
        f"{TEXT_PREFIX}text_model.encoder.layers.0.self_attn.q_proj.weight"     # transformers 5's flat names
