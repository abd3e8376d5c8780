"""SDXL's text encoders: the pooled projection (transformers' CLIPTextModelWithProjection), the
penultimate hidden state, OpenCLIP names, ONNX export."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from ldmrt.checkpoints.openclip import openclip_text_to_transformers
from ldmrt.config import ClipTextConfig, LayerChoice
from ldmrt.errors import ConfigError
from ldmrt.models.conditioning import ClipTextConditioner
from ldmrt.models.convert import clip_from_transformers
from tests.reference import perturb_, rel_l2, transformers_clip
from tests.test_models import TOL

# hidden 48, projection 40: a non-square projection, so a missed transpose cannot load
CONFIG = ClipTextConfig(vocab_size=500, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                        num_attention_heads=4, hidden_act="gelu", layer=LayerChoice.PENULTIMATE_HIDDEN,
                        bos_token_id=498, eos_token_id=499, pad_token_id=0, projection_dim=40)
PROJECTION = "transformer.text_projection.weight"
SOURCE, TARGET = "conditioner.embedders.1.model.", "conditioner.embedders.1.transformer.text_model."


def _reference(config: ClipTextConfig) -> torch.nn.Module:
    """transformers' CLIPTextModelWithProjection, perturbed, with `config`'s sizes and ids."""
    from transformers import CLIPTextModelWithProjection

    text_config = transformers_clip(config).config
    text_config.projection_dim = config.projection_dim
    torch.manual_seed(0)
    return perturb_(CLIPTextModelWithProjection(text_config).eval())


def _ours(reference: torch.nn.Module, config: ClipTextConfig) -> ClipTextConditioner:
    state = clip_from_transformers(reference.state_dict())
    ours = ClipTextConditioner(config).eval()
    ours.load_state_dict(state, strict=True)
    return ours


def _ids(batch: int, config: ClipTextConfig, seed: int = 3) -> torch.Tensor:
    """(B, 77) bos, words, eos twice at positions that differ per row, then padding."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, config.vocab_size - 2, (batch, config.max_length), generator=generator)
    ids[:, 0] = config.bos_token_id
    for row in range(batch):
        first = 5 + 17 * row
        ids[row, first] = ids[row, first + 9] = config.eos_token_id
        ids[row, first + 12:] = config.pad_token_id
    return ids


def _expected(reference: torch.nn.Module, ids: torch.Tensor) -> dict[LayerChoice | str, torch.Tensor]:
    """transformers' text_embeds and the text_embeddings of every LayerChoice."""
    out = reference(ids, output_hidden_states=True)
    final_norm = reference.text_model.final_layer_norm
    return {"pooled": out.text_embeds, LayerChoice.LAST: out.last_hidden_state,
            LayerChoice.PENULTIMATE: final_norm(out.hidden_states[-2]),
            LayerChoice.PENULTIMATE_HIDDEN: out.hidden_states[-2]}


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("layer", list(LayerChoice))
def test_projection_encoder_matches_transformers(layer: LayerChoice, batch: int) -> None:
    config = dataclasses.replace(CONFIG, layer=layer)
    reference = _reference(config)
    ours = _ours(reference, config)
    ids = _ids(batch, config)
    with torch.no_grad():
        expected = _expected(reference, ids)
        text_embeddings, pooled = ours(ids.int())
        # the same projection at each row's second eos: what a last-eos (or wrong-row) rule gives
        second = (ids == config.eos_token_id).int().cumsum(-1).eq(2).int().argmax(-1)
        at_second = reference.text_projection(expected[LayerChoice.LAST][torch.arange(batch), second])
    assert text_embeddings.shape == (batch, 77, 48) and pooled.shape == (batch, 40)
    assert rel_l2(text_embeddings, expected[layer]) <= TOL
    assert rel_l2(pooled, expected["pooled"]) <= TOL
    assert rel_l2(pooled, at_second) > TOL
    assert all(rel_l2(text_embeddings, other) > TOL for choice, other in expected.items()
               if choice not in (layer, "pooled"))


def test_legacy_eos_id_two_pools_the_largest_id() -> None:
    """transformers' rule for configs with eos_token_id == 2: the position of the largest id."""
    config = dataclasses.replace(CONFIG, eos_token_id=2)
    reference = _reference(config)
    ours = _ours(reference, config)
    ids = _ids(3, config)
    ids[:, 40] = config.vocab_size - 1          # after every row's eos (2): argmax != first eos
    with torch.no_grad():
        out = reference(ids)
        _, pooled = ours(ids.int())
        first_eos = out.last_hidden_state[torch.arange(3), (ids == 2).int().argmax(-1)]
        first_eos = reference.text_projection(first_eos)
    expected = out.text_embeds
    assert rel_l2(pooled, expected) <= TOL
    assert rel_l2(pooled, first_eos) > TOL


def test_without_projection_the_encoder_returns_one_tensor() -> None:
    config = dataclasses.replace(CONFIG, projection_dim=0)
    ours = ClipTextConditioner(config).eval()
    assert not hasattr(ours.transformer, "text_projection")
    with torch.no_grad():
        out = ours(_ids(2, config).int())
    assert isinstance(out, torch.Tensor) and out.shape == (2, 77, 48)


# --- OpenCLIP names -------------------------------------------------------------------------

def _openclip_layout(reference: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """The OpenCLIP text tower's names and layouts of a CLIPTextModelWithProjection's weights:
    q, k, v fused into in_proj, the projection (P, D) as text_projection (D, P), used as x @ P."""
    text = {k.removeprefix("text_model."): v for k, v in reference.state_dict().items()}
    out = {prefix + "token_embedding.weight": text["embeddings.token_embedding.weight"],
           prefix + "positional_embedding": text["embeddings.position_embedding.weight"]}
    renames = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
               "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    for i in sorted({int(k.split(".")[2]) for k in text if k.startswith("encoder.layers.")}):
        ours, theirs = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for param in ("weight", "bias"):
            out[f"{theirs}attn.in_proj_{param}"] = torch.cat(
                [text[f"{ours}self_attn.{name}_proj.{param}"] for name in "qkv"])
            for our_name, their_name in renames.items():
                out[f"{theirs}{their_name}.{param}"] = text[f"{ours}{our_name}.{param}"]
    out[prefix + "ln_final.weight"] = text["final_layer_norm.weight"]
    out[prefix + "ln_final.bias"] = text["final_layer_norm.bias"]
    out[prefix + "text_projection"] = text["text_projection.weight"].t().contiguous()   # (D, P)
    out[prefix + "logit_scale"] = torch.tensor(4.6052)
    return out


def _owned(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The keys of the SDXL embedder under test, without its prefix (ClipTextConditioner's names)."""
    owner = "conditioner.embedders.1."
    return {k[len(owner):]: v for k, v in state.items() if k.startswith(owner)}


def test_openclip_names_load_and_match_transformers() -> None:
    reference = _reference(CONFIG)
    other = {"conditioner.embedders.0.transformer.text_model.final_layer_norm.bias": torch.ones(3)}
    openclip = {**other, **_openclip_layout(reference, SOURCE)}
    state, notes = openclip_text_to_transformers(openclip, SOURCE, TARGET, keep_projection=True)
    assert all(state[k] is v for k, v in other.items())                # outside the prefix: as is
    ours = ClipTextConditioner(CONFIG).eval()
    ours.load_state_dict(_owned(state), strict=True)
    ids = _ids(3, CONFIG)
    with torch.no_grad():
        expected = reference(ids, output_hidden_states=True)
        text_embeddings, pooled = ours(ids.int())
    assert rel_l2(text_embeddings, expected.hidden_states[-2]) <= TOL
    assert rel_l2(pooled, expected.text_embeds) <= TOL
    assert any("transposed" in note for note in notes)
    assert any("logit_scale" in note for note in notes)

    untransposed = {**_owned(state), PROJECTION: openclip[SOURCE + "text_projection"]}   # (D, P)
    with pytest.raises(RuntimeError, match="text_projection"):
        ClipTextConditioner(CONFIG).load_state_dict(untransposed, strict=True)


def test_openclip_without_projection_drops_it() -> None:
    openclip = _openclip_layout(_reference(CONFIG), SOURCE)
    state, notes = openclip_text_to_transformers(openclip, SOURCE, TARGET, keep_projection=False)
    assert not any("projection" in k for k in state)
    assert any(SOURCE + "text_projection" in note for note in notes)
    plain = ClipTextConditioner(dataclasses.replace(CONFIG, projection_dim=0))
    plain.load_state_dict(_owned(state), strict=True)
    with pytest.raises(RuntimeError, match="text_projection"):
        ClipTextConditioner(CONFIG).load_state_dict(_owned(state), strict=True)


def test_openclip_unknown_key_is_kept_for_the_strict_load() -> None:
    openclip = {**_openclip_layout(_reference(CONFIG), SOURCE), SOURCE + "adapter.weight": torch.zeros(2)}
    state, _ = openclip_text_to_transformers(openclip, SOURCE, TARGET, keep_projection=True)
    assert SOURCE + "adapter.weight" in state
    with pytest.raises(RuntimeError, match="adapter.weight"):
        ClipTextConditioner(CONFIG).load_state_dict(_owned(state), strict=True)


def test_openclip_projection_needs_an_owner_in_the_target() -> None:
    openclip = _openclip_layout(_reference(CONFIG), SOURCE)
    with pytest.raises(ConfigError, match="target") as error:
        openclip_text_to_transformers(openclip, SOURCE, "text_model.", keep_projection=True)
    assert error.value.field == "target"


# --- ONNX -----------------------------------------------------------------------------------

@pytest.mark.parametrize("dynamo", [False, True])
def test_projection_encoder_exports_to_onnx(dynamo: bool, tmp_path) -> None:
    """Both outputs through ONNX Runtime at a batch the export did not trace."""
    import onnxruntime as ort

    reference = _reference(CONFIG)
    ours = _ours(reference, CONFIG)
    path = tmp_path / "text_encoder_2.onnx"
    names = {"input_names": ["input_ids"], "output_names": ["text_embeddings", "pooled"]}
    batch = ({"dynamic_shapes": {"input_ids": {0: torch.export.Dim("batch", min=1, max=64)}}} if dynamo else
             {"dynamic_axes": {"input_ids": {0: "batch"}, "text_embeddings": {0: "batch"}, "pooled": {0: "batch"}}})
    with torch.no_grad():
        torch.onnx.export(ours, (_ids(2, CONFIG).int(),), str(path), dynamo=dynamo, **names, **batch)
        ids = _ids(3, CONFIG, seed=9)
        expected = _expected(reference, ids)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    embeddings, pooled = session.run(None, {"input_ids": ids.int().numpy()})
    assert rel_l2(torch.from_numpy(embeddings), expected[CONFIG.layer]) <= TOL
    assert rel_l2(torch.from_numpy(pooled), expected["pooled"]) <= TOL


@pytest.mark.parametrize("value", [-1, True, 2.5])
def test_a_bad_projection_dim_is_refused_by_name(value) -> None:
    with pytest.raises(ConfigError, match=r"ClipTextConfig\.projection_dim"):
        dataclasses.replace(CONFIG, projection_dim=value)
