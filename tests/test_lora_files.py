"""tests/lora_files.py's fixtures are meaningful: every file it writes (diffusers/PEFT and kohya,
SD 1.x and SDXL, with and without LoCon) loads in diffusers and changes exactly the modules it
adapts, by the amount the file's own factors and alphas say (fp64 up @ down, not diffusers), and
scale 0 gives the base weights."""
from __future__ import annotations

import json

import pytest
import torch

from tests import lora_files
from tests.lora_files import PeftLayout, diffusers_fused, write_kohya_lora, write_peft_lora
from tests.reference import rel_l2

pytest.importorskip("diffusers")
pytest.importorskip("peft")
safetensors = pytest.importorskip("safetensors")

SCALE = 0.75          # not 1: a scale that reaches only some components shows
DELTA_TOL = 1e-4      # rel. L2 of diffusers' fused change against the file's own, fp32 weights
VISIBLE = 1e-3        # smallest relative change of an adapted weight


# The fixtures' self-check (~20 s) runs in the slow suite; the default one's parity tests
# (tests/test_lora_parity.py) assert that each file they use changes diffusers' weights.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return {"sd1": lora_files.tiny_sd1_pipe(tmp_path_factory.mktemp("sd1")),
            "sdxl": lora_files.tiny_sdxl_pipe(tmp_path_factory.mktemp("sdxl"))}


@pytest.fixture(scope="module")
def pipes(tiny):
    """kind -> (pipe, a copy of its base weights)."""
    return {kind: (t.pipe, {c: {k: w.clone() for k, w in weights.items()}
                            for c, weights in lora_files.base_weights(t.pipe).items()})
            for kind, t in tiny.items()}


# --- an independent reading of the files: what each adapted weight should change by -----------

_PEFT_FACTORS = ((".lora_A.weight", ".lora_B.weight"), (".lora.down.weight", ".lora.up.weight"),
                 (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"))


def _read(path):
    with safetensors.safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}


def expected_changes(pipe, path) -> dict[str, dict[str, torch.Tensor]]:
    """component -> {weight key: scaling * up @ down} as the file spells it (fp64); the alpha
    rules are kohya's (alpha / rank, 1 without alpha) and diffusers' for its own files (the
    metadata's lora_alpha / r, 1 without metadata)."""
    state, header = _read(path)
    models = {"unet": pipe.unet, **lora_files.text_encoder_modules(pipe)}
    changes = {name: {} for name in models}
    if any(k.startswith("lora_") for k in state):
        spelled = {**lora_files.kohya_names(pipe, conv=True, sgm_names=False),
                   **lora_files.kohya_names(pipe, conv=True, sgm_names=True)}
        for key, down in state.items():
            if key.endswith(".lora_down.weight"):
                name = key.removesuffix(".lora_down.weight")
                component, module = spelled[name]
                alpha = state.get(f"{name}.alpha")
                scaling = 1.0 if alpha is None else float(alpha) / down.shape[0]
                weight = models[component].get_submodule(module).weight
                changes[component][f"{module}.weight"] = scaling * lora_files.lora_delta(
                    down, state[f"{name}.lora_up.weight"], weight.shape)
        return changes
    metadata = json.loads(header.get("lora_adapter_metadata", "null"))
    for key, down in state.items():
        component, rest = key.split(".", 1)
        for down_suffix, up_suffix in _PEFT_FACTORS:
            if rest.endswith(down_suffix):
                module = rest.removesuffix(down_suffix)
                if not hasattr(models[component], "text_model"):
                    module = module.removeprefix("text_model.")
                scaling = 1.0 if metadata is None else metadata[f"{component}.lora_alpha"] / metadata[f"{component}.r"]
                weight = models[component].get_submodule(module).weight
                changes[component][f"{module}.weight"] = scaling * lora_files.lora_delta(
                    down, state[key.removesuffix(down_suffix) + up_suffix], weight.shape)
    return changes


def assert_fused_as_expected(base, fused, expected, scale: float) -> None:
    """Adapted weights changed by scale * expected (and visibly), every other tensor untouched."""
    assert fused.keys() == base.keys()
    for component, weights in base.items():
        assert fused[component].keys() == weights.keys(), component
        for key, weight in weights.items():
            change = fused[component][key].double() - weight.double()
            if key in expected[component]:
                assert rel_l2(change, scale * expected[component][key]) < DELTA_TOL, (component, key)
                assert change.norm() / weight.double().norm() > VISIBLE * abs(scale), (component, key)
            else:
                assert torch.equal(fused[component][key], weight), f"{component}.{key} changed, no adapter"


CASES = {
    # diffusers' own files: the metadata carries lora_alpha (8 != rank 4: alpha doubles every change)
    "peft-sd1": ("sd1", write_peft_lora, {}),
    "peft-sd1-locon-alpha-unet-only": ("sd1", write_peft_lora, dict(alpha=8, conv=True, text_encoders=False)),
    # what diffusers' training scripts wrote before the metadata: alpha is lost (scale 1)
    "peft-sd1-script-no-metadata": ("sd1", write_peft_lora, dict(
        alpha=8, layout=PeftLayout(metadata=False, training_script_keys=True))),
    "peft-sdxl-alpha": ("sdxl", write_peft_lora, dict(alpha=8, rank=2, layout=PeftLayout(text_model_prefix=False))),
    # kohya / A1111: diffusers names for SD 1.x, SGM names for SDXL; LoCon's own rank and alpha
    "kohya-sd1": ("sd1", write_kohya_lora, {}),
    "kohya-sd1-locon": ("sd1", write_kohya_lora, dict(conv=True, conv_rank=2, conv_alpha=1.0)),
    "kohya-sd1-sgm-names-no-alpha": ("sd1", write_kohya_lora, dict(sgm_names=True, conv=True, alpha=None)),
    "kohya-sdxl-locon": ("sdxl", write_kohya_lora, dict(alpha=8.0, conv=True, conv_rank=8, conv_alpha=4.0)),
    "kohya-sdxl-diffusers-names": ("sdxl", write_kohya_lora, dict(sgm_names=False)),
}


@pytest.mark.parametrize("case", CASES)
def test_diffusers_fuses_each_file_as_it_says(pipes, case, tmp_path) -> None:
    kind, writer, options = CASES[case]
    pipe, base = pipes[kind]
    path = writer(pipe, tmp_path / f"{case}.safetensors", seed=list(CASES).index(case), **options)
    expected = expected_changes(pipe, path)
    components = {c for c, changes in expected.items() if changes}
    assert components == ({"unet"} if options.get("text_encoders") is False else base.keys())
    assert set(expected["unet"]) == {f"{m}.weight" for m in lora_files.targets(pipe.unet, _unet_targets(options))}
    assert_fused_as_expected(base, diffusers_fused(pipe, [(path, SCALE)]), expected, SCALE)
    assert_unchanged(pipe, base)          # neither the writer nor the reference touched `pipe`


def _unet_targets(options: dict) -> tuple[str, ...]:
    """The UNet modules a case's file should adapt."""
    if "layout" in options and options["layout"].training_script_keys:
        return lora_files.SCRIPT_UNET_TARGETS
    return lora_files.UNET_TARGETS + (lora_files.RESNET_TARGETS if options.get("conv") else ())


def assert_unchanged(pipe, base) -> None:
    now = lora_files.base_weights(pipe)
    assert all(now[c].keys() == w.keys() and all(torch.equal(now[c][k], w[k]) for k in w) for c, w in base.items())


def test_scale_zero_gives_the_base_weights_and_scales_add(pipes, tmp_path) -> None:
    pipe, base = pipes["sd1"]
    kohya = write_kohya_lora(pipe, tmp_path / "kohya.safetensors", conv=True, seed=1)
    peft = write_peft_lora(pipe, tmp_path / "peft.safetensors", alpha=8, seed=2)
    zero = diffusers_fused(pipe, [(kohya, 0.0)])
    assert all(torch.equal(zero[c][k], w) for c, weights in base.items() for k, w in weights.items())
    kohya_changes, peft_changes = expected_changes(pipe, kohya), expected_changes(pipe, peft)
    both = diffusers_fused(pipe, [(kohya, 0.5), (peft, -1.0)])
    for component, weights in base.items():
        for key, weight in weights.items():
            got = both[component][key].double() - weight.double()
            if key in kohya_changes[component] or key in peft_changes[component]:
                none = torch.zeros(weight.shape, dtype=torch.float64)
                want = 0.5 * kohya_changes[component].get(key, none) - peft_changes[component].get(key, none)
                assert rel_l2(got, want) < DELTA_TOL, (component, key)
            else:
                assert torch.equal(both[component][key], weight), (component, key)


def test_the_check_can_fail(tiny, tmp_path) -> None:
    """Another seed's file, or a scale the check was not told, does not pass as this one."""
    pipe = tiny["sd1"].pipe
    path = write_kohya_lora(pipe, tmp_path / "a.safetensors", seed=0)
    other = write_kohya_lora(pipe, tmp_path / "b.safetensors", seed=1)
    base, fused = lora_files.base_weights(pipe), diffusers_fused(pipe, [(path, 1.0)])
    with pytest.raises(AssertionError):
        assert_fused_as_expected(base, fused, expected_changes(pipe, other), 1.0)
    with pytest.raises(AssertionError):
        assert_fused_as_expected(base, fused, expected_changes(pipe, path), 0.5)
    assert base["unet"]["conv_in.weight"] is not fused["unet"]["conv_in.weight"]


# --- the layouts, key by key ---------------------------------------------------------------------

def test_kohya_sdxl_keys_are_sgm_names(tiny, tmp_path) -> None:
    state, header = _read(write_kohya_lora(tiny["sdxl"].pipe, tmp_path / "k.safetensors", conv=True, conv_rank=2))
    down = state["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight"]
    assert down.shape == (4, 128)
    assert state["lora_unet_middle_block_1_transformer_blocks_1_attn2_to_k.alpha"].shape == ()
    assert state["lora_unet_output_blocks_0_1_proj_in.lora_up.weight"].shape == (128, 4)
    assert state["lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight"].shape == (2, 64, 3, 3)   # conv1
    assert state["lora_unet_output_blocks_3_0_out_layers_3.lora_up.weight"].shape == (64, 2, 1, 1)  # conv2
    assert state["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"].shape == (4, 64)
    assert state["lora_te2_text_model_encoder_layers_2_mlp_fc2.lora_up.weight"].shape == (128, 4)
    assert float(state["lora_te2_text_model_encoder_layers_2_mlp_fc2.alpha"]) == 2.0
    assert not any("down_blocks" in k or k.startswith("lora_te_") for k in state)
    assert json.loads(header["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "2.0"}


def test_kohya_sd1_keys_are_diffusers_names(tiny, tmp_path) -> None:
    state, _ = _read(write_kohya_lora(tiny["sd1"].pipe, tmp_path / "k.safetensors", conv=True))
    assert state["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].shape == (4, 32, 1, 1)
    assert state["lora_unet_up_blocks_1_attentions_1_transformer_blocks_0_ff_net_0_proj.lora_up.weight"].shape[1] == 4
    assert state["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape == (4, 32, 3, 3)
    assert state["lora_te_text_model_encoder_layers_1_self_attn_out_proj.alpha"].shape == ()
    assert not any("input_blocks" in k or k.startswith("lora_te1_") for k in state)


def test_peft_files_are_what_diffusers_writes(tiny, tmp_path) -> None:
    state, header = _read(write_peft_lora(tiny["sdxl"].pipe, tmp_path / "p.safetensors", alpha=8))
    metadata = json.loads(header["lora_adapter_metadata"])
    assert metadata["unet.r"] == 4 and metadata["unet.lora_alpha"] == 8 and metadata["text_encoder_2.lora_alpha"] == 8
    assert state["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"].shape == (4, 128)
    assert "unet.mid_block.attentions.0.proj_out.lora_B.weight" in state
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in state
    assert "text_encoder_2.text_model.encoder.layers.2.mlp.fc2.lora_B.weight" in state
    plain, _ = _read(write_peft_lora(tiny["sd1"].pipe, tmp_path / "q.safetensors", layout=PeftLayout(
        training_script_keys=True, text_model_prefix=False, metadata=False)))
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight" in plain
    assert "text_encoder.encoder.layers.0.self_attn.q_proj.lora_linear_layer.up.weight" in plain
    assert not any("lora_A" in k or "lora_B" in k or "proj_in" in k or "fc1" in k for k in plain)


def test_nothing_to_adapt_and_script_locon_are_refused(tiny, tmp_path) -> None:
    with pytest.raises(ValueError, match="unet, text_encoders"):
        write_peft_lora(tiny["sd1"].pipe, tmp_path / "p.safetensors", unet=False, text_encoders=False)
    with pytest.raises(ValueError, match="conv"):
        write_peft_lora(tiny["sd1"].pipe, tmp_path / "p.safetensors", conv=True,
                        layout=PeftLayout(training_script_keys=True))


# --- the CompVis / SGM names come from diffusers' single-file converter -----------------------

def test_compvis_names_are_diffusers_single_file_names(tiny) -> None:
    names = lora_files.compvis_unet_names(tiny["sdxl"].pipe.unet)
    assert names["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"] == \
        "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    assert names["down_blocks.0.downsamplers.0.conv"] == "input_blocks.3.0.op"
    assert names["mid_block.resnets.1.conv2"] == "middle_block.2.out_layers.3"
    assert names["up_blocks.0.attentions.2.proj_out"] == "output_blocks.2.1.proj_out"
    assert names["up_blocks.0.upsamplers.0.conv"] == "output_blocks.2.2.conv"
    assert names["add_embedding.linear_1"] == "label_emb.0.0"
    sd1 = lora_files.compvis_unet_names(tiny["sd1"].pipe.unet)
    assert sd1["up_blocks.0.upsamplers.0.conv"] == "output_blocks.1.1.conv"       # a level without attention


def test_a_wrong_compvis_name_is_caught(tiny) -> None:
    unet = tiny["sdxl"].pipe.unet
    names = lora_files.compvis_unet_names(unet)
    a, b = "down_blocks.1.attentions.0.proj_in", "down_blocks.1.attentions.1.proj_in"
    with pytest.raises(AssertionError, match="misplaced"):
        lora_files.check_compvis_names(unet, {**names, a: names[b], b: names[a]})


def test_per_level_resnet_counts_are_refused() -> None:
    import diffusers

    unet = diffusers.UNet2DConditionModel(**dict(lora_files.SDXL_UNET, layers_per_block=(1, 2)))
    with pytest.raises(ValueError, match="layers_per_block"):
        lora_files.compvis_unet_names(unet)


# --- ldmrt loads the same base weights --------------------------------------------------------

@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_ldmrt_loads_the_tiny_folders(tiny, kind) -> None:
    from ldmrt.checkpoints.loading import load_checkpoint

    loaded = load_checkpoint(tiny[kind].folder)
    assert not loaded.warnings
