"""Issue 14 rows 5 and 10: added tokens (textual inversion) keep transformers' ids; cost stays bounded.

Oracles: transformers' CLIPTokenizer / BertTokenizer loading the same folders (the layouts that
diffusers' load_textual_inversion + save_pretrained leave, in transformers 5 and 4), diffusers'
TextualInversionLoaderMixin.maybe_convert_prompt for multi-vector tokens.
"""
from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import pytest

from ldmrt.checkpoints.tokenizer_assets import write_runtime_assets
from ldmrt.config import ClipTextConfig
from ldmrt.presets import preset
from ldmrt.errors import BundleError, CheckpointError, GenerationError
from ldmrt.tokenizer import READ_LIMIT_PER_TOKEN, load_tokenizer
from ldmrt.synthetic_tokenizer import write_synthetic_clip_assets, write_synthetic_wordpiece_assets

transformers = pytest.importorskip("transformers")
from transformers import BertTokenizer, CLIPTokenizer  # noqa: E402

SD15, TINY = preset("sd15").conditioner, preset("tiny").conditioner
BASE = SD15.vocab_size                           # 49408: the first id an added token gets
CONCEPTS = ["<cat-toy>", "<Cat-Toy>_1", "sks", "<gta5-artwork>", "<two words>"]
PROMPTS = [
    "a photo of <cat-toy> on a table",
    "<cat-toy>, <CAT-TOY> and x<cat-toy>y, <Cat-Toy>_1 <cat-toy>_1",
    "sks dog, a sksdog, SKS, <gta5-artwork> style, <gta5-artwork>s",
    "<two words> and <two  words> and <TWO WORDS>",
    "<|endoftext|> <|ENDOFTEXT|> <cat-toy><cat-toy>",
    "a photograph of an astronaut riding a horse",
]


def reference_ids(oracle, prompts, max_length=77):
    encoded = oracle(list(prompts), padding="max_length", max_length=max_length, truncation=True,
                     return_tensors="np")["input_ids"]
    truncated = [len(ids) > max_length for ids in oracle(list(prompts))["input_ids"]]
    return encoded, truncated


def assert_same(ours, oracle, prompts, max_length=77):
    batch = ours.encode(prompts)
    expected, truncated = reference_ids(oracle, prompts, max_length)
    for row, prompt in enumerate(prompts):
        assert batch.input_ids[row].tolist() == expected[row].tolist(), f"prompt {prompt[:80]!r}"
    assert batch.truncated == truncated


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return write_synthetic_clip_assets(tmp_path_factory.mktemp("clip") / "tokenizer", BASE)


def textual_inversion_v5(clip_dir: Path, folder: Path) -> Path:
    """What transformers 5 saves after load_textual_inversion: tokenizer.json + tokenizer_config.json."""
    tokenizer = CLIPTokenizer.from_pretrained(clip_dir)
    assert tokenizer.add_tokens(CONCEPTS) == len(CONCEPTS)
    tokenizer.save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    return folder


def textual_inversion_v4(clip_dir: Path, folder: Path, decoder: bool) -> Path:
    """What transformers 4's slow CLIPTokenizer saves: vocab.json, merges.txt, added_tokens.json,
    special_tokens_map.json and (>= 4.34) tokenizer_config.json with added_tokens_decoder."""
    folder.mkdir()
    for name in ("vocab.json", "merges.txt"):
        (folder / name).write_bytes((clip_dir / name).read_bytes())
    ids = {token: BASE + index for index, token in enumerate(CONCEPTS)}
    (folder / "added_tokens.json").write_text(json.dumps(ids), encoding="utf-8")
    special = {"content": "<|endoftext|>", "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": {**special, "content": "<|startoftext|>"}, "eos_token": special, "pad_token": "<|endoftext|>",
         "unk_token": special}), encoding="utf-8")
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "errors": "replace"}
    if decoder:
        flags = {"lstrip": False, "rstrip": False, "single_word": False}
        config["added_tokens_decoder"] = {
            str(BASE - 2): {"content": "<|startoftext|>", "normalized": True, "special": True, **flags},
            str(BASE - 1): {"content": "<|endoftext|>", "normalized": False, "special": True, **flags},
            **{str(index): {"content": token, "normalized": True, "special": False, **flags}
               for token, index in ids.items()}}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


WITH_CONCEPTS = ClipTextConfig(vocab_size=BASE + len(CONCEPTS))


# --- row 5: added tokens ----------------------------------------------------------------------

def test_clip_tokenizer_json_added_tokens_keep_transformers_ids(clip_dir, tmp_path):
    folder = textual_inversion_v5(clip_dir, tmp_path / "ti")
    assert write_runtime_assets(folder, tmp_path / "bundle", WITH_CONCEPTS) == "clip"
    ours, oracle = load_tokenizer(tmp_path / "bundle", WITH_CONCEPTS), CLIPTokenizer.from_pretrained(folder)
    assert_same(ours, oracle, PROMPTS)
    assert ours.tokenize("<cat-toy>") == [BASE]        # one token, not sub-words


@pytest.mark.parametrize("decoder", [True, False], ids=["added_tokens_decoder", "added_tokens.json"])
def test_clip_classic_files_with_added_tokens_keep_transformers_ids(clip_dir, tmp_path, decoder):
    folder = textual_inversion_v4(clip_dir, tmp_path / "ti", decoder)
    write_runtime_assets(folder, tmp_path / "bundle", WITH_CONCEPTS)
    ours, oracle = load_tokenizer(tmp_path / "bundle", WITH_CONCEPTS), CLIPTokenizer.from_pretrained(folder)
    assert oracle.convert_tokens_to_ids(CONCEPTS) == list(range(BASE, BASE + len(CONCEPTS)))
    assert_same(ours, oracle, PROMPTS)


def test_bert_added_tokens_keep_transformers_ids(tmp_path):
    config = preset("ldm-txt2img").conditioner
    assets = write_synthetic_wordpiece_assets(tmp_path / "assets", config.vocab_size - 3)
    tokenizer = BertTokenizer.from_pretrained(assets)
    tokenizer.add_tokens(["<cat-toy>", "sks", "[V]"])
    tokenizer.save_pretrained(tmp_path / "ti")
    write_runtime_assets(tmp_path / "ti", tmp_path / "bundle", config)
    ours, oracle = load_tokenizer(tmp_path / "bundle", config), BertTokenizer.from_pretrained(tmp_path / "ti")
    prompts = ["a photo of <cat-toy>", "sks dog, SKS, [V] [v] x<cat-toy>y", "[CLS] [MASK] plain words"]
    assert_same(ours, oracle, prompts)
    assert ours.tokenize("<cat-toy>") == [config.vocab_size - 3]


def test_added_token_outside_the_text_encoder_vocab_is_refused_at_export(clip_dir, tmp_path):
    """A tokenizer with textual-inversion tokens next to a text encoder without their rows."""
    folder = textual_inversion_v5(clip_dir, tmp_path / "ti")
    with pytest.raises(CheckpointError, match=r"token '<two words>' has id 49412 \(an added token.*"
                                              r"vocab_size=49408 \(ids 0\.\.49407\)"):
        write_runtime_assets(folder, tmp_path / "bundle", SD15)


def test_added_token_ids_with_a_gap_are_refused_by_name(clip_dir, tmp_path):
    folder = textual_inversion_v4(clip_dir, tmp_path / "ti", decoder=False)
    (folder / "added_tokens.json").write_text(json.dumps({"<cat-toy>": BASE + 2}), encoding="utf-8")
    with pytest.raises(CheckpointError, match=r"'<cat-toy>' is declared with id 49410, but it takes id 49408"):
        write_runtime_assets(folder, tmp_path / "bundle", WITH_CONCEPTS)


def test_an_edited_bundle_tokenizer_json_is_refused(clip_dir, tmp_path):
    write_runtime_assets(textual_inversion_v5(clip_dir, tmp_path / "ti"), tmp_path / "bundle", WITH_CONCEPTS)
    path = tmp_path / "bundle" / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    data["added_tokens"][-1]["id"] += 7
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(BundleError, match="'<two words>' is declared with id 49419, but it takes id 49412"):
        load_tokenizer(tmp_path / "bundle", WITH_CONCEPTS)
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(BundleError, match="tokenizer.json: corrupt"):
        load_tokenizer(tmp_path / "bundle", WITH_CONCEPTS)


def test_multi_vector_tokens_are_expanded_as_diffusers_does(clip_dir, tmp_path):
    """diffusers' pipelines write "<t>" as "<t> <t>_1 <t>_2" when the tokenizer holds <t>_1 (one row per vector)."""
    diffusers = pytest.importorskip("diffusers")
    tokenizer = CLIPTokenizer.from_pretrained(clip_dir)
    tokenizer.add_tokens(["<mv>", "<mv>_1", "<mv>_2", "<one>"])
    tokenizer.save_pretrained(tmp_path / "ti")
    config = ClipTextConfig(vocab_size=BASE + 4)
    write_runtime_assets(tmp_path / "ti", tmp_path / "bundle", config)
    ours = load_tokenizer(tmp_path / "bundle", config)
    mixin = diffusers.loaders.TextualInversionLoaderMixin()
    prompts = ["a <mv> cat", "<mv>, <one> and <mv>_1 <MV>", "<one> alone", "no concept at all"]
    expected = tokenizer(mixin.maybe_convert_prompt(prompts, tokenizer), padding="max_length", max_length=77,
                         truncation=True, return_tensors="np")["input_ids"]
    np.testing.assert_array_equal(ours.encode(prompts).input_ids, expected)
    assert ours.encode("a <mv> cat").input_ids[0, 2:5].tolist() == [BASE, BASE + 1, BASE + 2]


# --- row 10: cost bounded by the model's text length ---------------------------------------

def long_inputs() -> dict[str, str]:
    rng = random.Random(0)
    words = "a photograph of an astronaut riding a horse on the moon highly detailed it's they're".split()
    text, size = [], 0
    while size < 1_000_000:
        text.append(rng.choice(words))
        size += len(text[-1]) + 1
    return {
        "100k letters": "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(100_000)),
        "1 MB of words": " ".join(text)[:1_000_000],
        "100k emoji": "🐱👩‍👩‍👧🇫🇷" * 25_000,
        "100k CJK": "".join(chr(0x4E00 + rng.randrange(20_000)) for _ in range(100_000)),
        "1 MB of whitespace": " \t\n\u3000" * 250_000,
        "1 MB of combining marks": "e" + "\u0301\u0323" * 500_000,
    }


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    folder = write_synthetic_clip_assets(tmp_path_factory.mktemp("tiny"), TINY.vocab_size)
    return load_tokenizer(folder, TINY), CLIPTokenizer.from_pretrained(folder, model_max_length=77)


def test_long_prompts_read_a_bounded_prefix_and_finish_fast(tiny_tokenizer):
    """The old tokenizer took 125 s for 100k letters (quadratic BPE); now: bounded characters read."""
    ours, _ = tiny_tokenizer
    read: list[int] = []
    original = ours.backend.encode
    ours.backend = _Recording(ours.backend, read)
    limit = READ_LIMIT_PER_TOKEN * ours.max_length
    try:
        for name, text in long_inputs().items():
            read.clear()
            start = time.perf_counter()
            batch = ours.encode([text])
            seconds = time.perf_counter() - start
            assert batch.input_ids.shape == (1, 77) and batch.truncated == [True], name
            assert sum(read) <= 1.34 * limit, f"{name}: read {sum(read)} characters, bound {1.34 * limit:.0f}"
            assert seconds < 2.0, f"{name}: {seconds:.2f} s"
    finally:
        ours.backend = original.__self__


class _Recording:
    """A `tokenizers.Tokenizer` stand-in that records how many characters each encode call reads."""

    def __init__(self, backend, read: list[int]) -> None:
        self._backend, self._read = backend, read

    def encode(self, text, **kwargs):
        self._read.append(len(text))
        return self._backend.encode(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self._backend, name)


def test_bounded_encoding_keeps_transformers_ids_on_long_prompts(tiny_tokenizer):
    """Window cuts at whitespace change no id: long prompts of every kind, and cuts next to added tokens."""
    ours, oracle = tiny_tokenizer
    rng = random.Random(1)
    pieces = ["the ", "photograph ", "astronaut", " ", "  ", "\t", "\n", "\u3000", "'s ", "'", "re", "ve ",
              "e\u0301", "\u0323", "🐱", "猫", "x" * 300, " " * 2000, "!!!", "1", "2.5", "<|endoftext|>",
              "café ", "ΣΑΣ ", "\x00", "\u200b"]
    prompts = []
    for _ in range(60):
        text = []
        while sum(map(len, text)) < rng.choice([1500, 5000, 12_000, 19_000]):
            text.append(rng.choice(pieces))
        prompts.append("".join(text))
    prompts += [" " * 5000 + "a cat", "x" * 15_000 + " a cat", "a " * 38 + " " * 10_000 + "b c",
                "word " * 300 + "e" + "\u0301" * 3000, "a's " * 1000]
    assert_same(ours, oracle, prompts)


def test_bounded_encoding_keeps_added_tokens_across_window_cuts(clip_dir, tmp_path):
    """Added tokens (one with a space) and multi-vector concepts next to every window cut."""
    diffusers = pytest.importorskip("diffusers")
    tokenizer = CLIPTokenizer.from_pretrained(clip_dir)
    tokenizer.add_tokens([*CONCEPTS, "<mv>", "<mv>_1"])
    tokenizer.save_pretrained(tmp_path / "ti")
    config = ClipTextConfig(vocab_size=BASE + len(CONCEPTS) + 2)
    write_runtime_assets(tmp_path / "ti", tmp_path / "bundle", config)
    ours = load_tokenizer(tmp_path / "bundle", config)
    first = 16 * ours.max_length
    prompts = []
    for shift in range(-14, 3):
        for concept in (*CONCEPTS, "<mv>"):
            for before in (73, 74, 75, 76):     # the concept is token 74..77, straddling the first cut
                head = " " * (first + shift - 2 * before - len(concept) // 2) + "a " * before
                prompts.append(head + concept + " a" * 80)
                prompts.append(head + concept + " <mv>" * 40)
    assert all(first < len(prompt) < 4 * first for prompt in prompts)
    mixin = diffusers.loaders.TextualInversionLoaderMixin()
    expected = tokenizer(mixin.maybe_convert_prompt(prompts, tokenizer), padding="max_length", max_length=77,
                         truncation=True, return_tensors="np")["input_ids"]
    np.testing.assert_array_equal(ours.encode(prompts).input_ids, expected)


def test_text_past_the_read_limit_is_dropped_and_reported(tiny_tokenizer):
    """The documented departure: what lies past READ_LIMIT_PER_TOKEN x max_length characters is not read."""
    ours, oracle = tiny_tokenizer
    text = "a" + " " * 1_000_000 + "cat"
    batch = ours.encode(text)
    assert batch.truncated == [True]
    assert batch.input_ids[0, :3].tolist() == [ours.bos_token_id, *ours.tokenize("a"), ours.eos_token_id]
    assert reference_ids(oracle, [text])[0][0, 2] != ours.eos_token_id      # transformers reads "cat"


def test_invalid_unicode_is_a_typed_error(tiny_tokenizer):
    ours, _ = tiny_tokenizer
    with pytest.raises(GenerationError, match=r"prompt 1 holds a lone surrogate U\+D800 at character 2"):
        ours.encode(["fine", "ab\ud800cd"])


def test_manifest_tokenizer_entry_must_list_what_load_tokenizer_reads():
    from ldmrt.manifest import TokenizerEntry

    digest = "a" * 64
    assert TokenizerEntry.from_dict({"kind": "clip", "files": {"tokenizer.json": digest}}).files
    assert TokenizerEntry.from_dict({"kind": "clip", "files": {"vocab.json": digest, "merges.txt": digest}})
    assert TokenizerEntry.from_dict({"kind": "wordpiece", "files": {"vocab.txt": digest}})
    for kind, files in (("clip", {"vocab.json": digest}), ("wordpiece", {"vocab.json": digest, "merges.txt": digest}),
                        ("clip", {"notes.txt": digest})):
        with pytest.raises(BundleError, match="tokenizer.files.*tokenizer.json"):
            TokenizerEntry.from_dict({"kind": kind, "files": files})


# --- row 5 end to end: a diffusers folder after load_textual_inversion -------------------------

def test_textual_inversion_folder_exports_ids_and_embedding_rows_as_diffusers(tmp_path):
    """diffusers' own load_textual_inversion (a 2-vector concept) + save_pretrained -> ldmrt's checkpoint
    loader and tokenizer writer: same ids as the diffusers pipeline, same text embeddings for them."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from ldmrt.checkpoints import checkpoint_source, load_checkpoint
    from ldmrt.config import AutoencoderConfig, UNetConfig
    from tests.reference import diffusers_autoencoder, diffusers_unet, perturb_, rel_l2, transformers_clip

    clip = ClipTextConfig(vocab_size=1000, hidden_size=128, intermediate_size=256, num_attention_heads=2,
                          bos_token_id=998, eos_token_id=999, num_hidden_layers=2, pad_token_id=999)
    unet = diffusers_unet(UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                                     attention_resolutions=(2, 1), num_heads=8, context_dim=128))
    vae = diffusers_autoencoder(AutoencoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1))
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=perturb_(transformers_clip(clip), seed=3),
        tokenizer=CLIPTokenizer.from_pretrained(write_synthetic_clip_assets(tmp_path / "assets", 1000)),
        unet=unet, scheduler=diffusers.DDIMScheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    vectors = torch.randn(2, 128, generator=torch.Generator().manual_seed(5))
    pipe.load_textual_inversion({"<cat-toy>": vectors}, token="<cat-toy>")
    pipe.save_pretrained(tmp_path / "ti")
    loaded = load_checkpoint(tmp_path / "ti")
    assert loaded.config.conditioner.vocab_size == 1002
    kind = checkpoint_source(tmp_path / "ti").write_tokenizer(tmp_path / "tokenizer")
    ours = load_tokenizer(tmp_path / "tokenizer", loaded.config.conditioner)
    prompts = ["a photo of <cat-toy>", "<cat-toy> on a <cat-toy>_1 table", "no concept"]
    expected = pipe.tokenizer(pipe.maybe_convert_prompt(prompts, pipe.tokenizer), padding="max_length",
                              max_length=77, truncation=True, return_tensors="pt").input_ids
    ids = ours.encode(prompts).input_ids
    assert kind == "clip" and ids[0, 4:6].tolist() == [1000, 1001]
    np.testing.assert_array_equal(ids, expected.numpy())
    with torch.no_grad():
        theirs = pipe.text_encoder(expected)[0]
        mine = loaded.model.cond_stage_model(torch.from_numpy(ids))
    assert rel_l2(mine, theirs) <= 1e-5
    # the same tokenizer next to the text encoder without the concept's rows: refused at export, by name
    pipe.text_encoder.resize_token_embeddings(1000)
    pipe.text_encoder.save_pretrained(tmp_path / "ti" / "text_encoder")
    with pytest.raises(CheckpointError, match=r"token '<cat-toy>_1' has id 1001 \(an added token.*vocab_size=1000"):
        checkpoint_source(tmp_path / "ti").write_tokenizer(tmp_path / "again")
