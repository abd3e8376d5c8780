"""ldmrt.tokenizer against transformers' tokenizers loaded from the same asset files.

Oracles: transformers' CLIPTokenizer (in transformers 5 the `tokenizers`-backed class that
diffusers loads; CLIPTokenizerFast is the same class), BertTokenizer (tokenizers-backed, what
the LDM code used as BertTokenizerFast) and BertTokenizerLegacy (the pure-Python BERT
tokenizer). Real vocabularies cannot be downloaded here, so the assets are the synthetic ones,
at the presets' real sizes (49408 CLIP tokens, 30522 WordPiece tokens).
"""
from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from ldmrt.config import BertConfig, ClassEmbedderConfig, ClipTextConfig
from ldmrt.presets import preset
from ldmrt.errors import BundleError, CheckpointError, ConfigError, GenerationError
from ldmrt.tokenizer import PromptTokenizer, TokenizedBatch, load_tokenizer
from ldmrt.synthetic_tokenizer import write_synthetic_clip_assets, write_synthetic_wordpiece_assets

transformers = pytest.importorskip("transformers")
from transformers import BertTokenizer, CLIPTokenizer  # noqa: E402

try:
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy
except ImportError:  # transformers 4: BertTokenizer itself is the pure-Python one
    from transformers import BertTokenizer as BertTokenizerLegacy

SD15, SD21, TINY = (preset(name).conditioner for name in ("sd15", "sd21", "tiny"))
LDM_BERT = preset("ldm-txt2img").conditioner

PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "A Photograph Of An ASTRONAUT riding a HORSE",
    "",
    "   ",
    "portrait of a woman, highly detailed, 8k, trending on artstation!!!",
    "it's a cat. it't they're we've I'm you'll he'd IT'S THEY'RE 'sun' ''s ' s",
    "numbers: 1234567890, 3.14159, -42, 1e-5, 50% off, $9.99, 1st 2nd 3rd 7.5 512x768",
    "café naïve résumé über crème brûlée Ångström ÉCOLE São Paulo",
    "cafe\u0301 with a combining accent, and a precomposed caf\u00e9",
    "猫と犬, 東京の夜景, 山水画 风景 한국어 텍스트 カタカナ",
    "emoji 🐱🚀 👩‍👩‍👧 👍🏽 ❤️ 🇫🇷 flags",
    "ΟΔΟΣ ΣΟΦΟΣ Ελληνικά and Кириллица МОСКВА",
    "tabs\tand\nnewlines\r\nand  double  spaces\u00a0nbsp\u3000ideographic\u2028line",
    "  leading and trailing whitespace  \n",
    "punctuation!!! ??? ... --- ((parentheses)) [brackets] {braces} <angle> «quotes» “smart” ‘single’",
    "mixed: <|endoftext|> inside, <|startoftext|> too, and <|ENDOFTEXT|> upper, x<|endoftext|>y",
    "hello!world !! ! wow!",
    "[CLS] [SEP] [MASK] [PAD] [UNK] ##ing [cls]",
    "control\x00chars\x07and\x1cfile\x1fseparators\u200bzero width\ufeffbom\ufffdreplacement",
    "url https://example.com/a_b-c?d=e&f=g#h and email someone@example.org",
    "snake_case camelCase kebab-case PascalCase ALLCAPS",
    "antidisestablishmentarianism supercalifragilisticexpialidocious pneumonoultramicroscopic",
    "x" * 120,
    "a very long prompt, " * 30,
    " ".join(f"word{i}" for i in range(100)),
]


def reference_ids(oracle, prompts, max_length):
    return oracle(list(prompts), padding="max_length", max_length=max_length, truncation=True,
                  return_tensors="np")["input_ids"]


def reference_truncated(oracle, prompts, max_length):
    return [len(ids) > max_length for ids in oracle(list(prompts))["input_ids"]]


def assert_same_ids(ours, oracle, prompts, max_length=77):
    batch = ours.encode(prompts)
    expected = reference_ids(oracle, prompts, max_length)
    for row, prompt in enumerate(prompts):
        assert batch.input_ids[row].tolist() == expected[row].tolist(), f"prompt {prompt!r}"
    assert batch.truncated == reference_truncated(oracle, prompts, max_length)
    assert batch.input_ids.dtype == np.int32 and batch.input_ids.shape == (len(prompts), max_length)


def fuzz_prompts(seed: int, count: int) -> list[str]:
    """Random prompts from pieces that stress normalization, pre-tokenization and special tokens."""
    pieces = [*"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", *"!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
              " ", "  ", "\t", "\n", "\r\n", "\u00a0", "\u3000", "\u2009", "\x0b", "\x85", "\x1c",
              "é", "É", "ñ", "ü", "Å", "e\u0301", "\u0301", "ß", "ﬁ", "İ", "ΣΑΣ", "σ", "Привет",
              "猫", "東京", "ひらがな", "한국", "\U00020000", "🐱", "👩‍👩‍👧", "👍🏽", "❤️", "🇫🇷",
              "\x00", "\u200b", "\ufeff", "\ufffd", "\x7f", "\u0378", "\uffff", "½", "²", "٣", "Ⅻ", "—", "…", "«", "»",
              "'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "''", "<|endoftext|>",
              "<|startoftext|>", "<|ENDOFTEXT|>", "<|", "|>", "[CLS]", "[SEP]", "[MASK]", "[PAD]",
              "[UNK]", "##", "the ", "photograph", "astronaut", "riding", "horse", "painting ", "ing"]
    rng = random.Random(seed)
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 30))) for _ in range(count)]


def assigned_codepoints(start: int, stop: int, step: int = 1) -> list[int]:
    return [cp for cp in range(start, stop, step)
            if not 0xD800 <= cp < 0xE000 and unicodedata.category(chr(cp)) != "Cn"]


def codepoint_probes(codepoints: list[int], per_text: int = 8) -> tuple[list[list[int]], list[str]]:
    """Each codepoint inside, between and after words; several codepoints per text for speed."""
    groups = [codepoints[i:i + per_text] for i in range(0, len(codepoints), per_text)]
    texts = [" ".join(f"a{chr(cp)}b {chr(cp)}{chr(cp)} 1{chr(cp)}'s" for cp in group) for group in groups]
    return groups, texts


def assert_codepoints_match(tokenize, oracle, codepoints: list[int], what: str) -> None:
    groups, texts = codepoint_probes(codepoints)
    expected = oracle(texts, add_special_tokens=False)["input_ids"]
    wrong = [list(map(hex, group)) for group, text, ids in zip(groups, texts, expected) if tokenize(text) != ids]
    assert not wrong, f"{len(wrong)} groups of codepoints differ from {what}: {wrong[:5]}"


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return write_synthetic_clip_assets(tmp_path_factory.mktemp("clip") / "tokenizer", SD15.vocab_size)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    return write_synthetic_wordpiece_assets(tmp_path_factory.mktemp("bert") / "tokenizer", LDM_BERT.vocab_size)


@pytest.fixture(scope="module")
def sd1(clip_dir):
    return load_tokenizer(clip_dir, SD15), CLIPTokenizer.from_pretrained(clip_dir)


@pytest.fixture(scope="module")
def sd2(clip_dir):
    return load_tokenizer(clip_dir, SD21), CLIPTokenizer.from_pretrained(clip_dir, pad_token="!")


@pytest.fixture(scope="module")
def bert(bert_dir):
    return (load_tokenizer(bert_dir, LDM_BERT), BertTokenizer.from_pretrained(bert_dir),
            BertTokenizerLegacy.from_pretrained(bert_dir))


# --- CLIP ---------------------------------------------------------------------------------

def test_synthetic_clip_assets_have_the_preset_layout(clip_dir, tmp_path):
    vocab = json.loads((clip_dir / "vocab.json").read_text(encoding="utf-8"))
    lines = (clip_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert sorted(vocab.values()) == list(range(SD15.vocab_size))
    assert vocab["<|startoftext|>"] == SD15.bos_token_id and vocab["<|endoftext|>"] == SD15.eos_token_id
    assert vocab["!"] == 0 and lines[0] == "#version: 0.2" and len(lines) - 1 == SD15.vocab_size - 514
    again = write_synthetic_clip_assets(tmp_path / "again", SD15.vocab_size)
    for name in ("vocab.json", "merges.txt"):
        digest = [hashlib.sha256((folder / name).read_bytes()).hexdigest() for folder in (clip_dir, again)]
        assert digest[0] == digest[1], f"{name} is not deterministic"


def test_synthetic_merges_join_real_words(sd1):
    ours, oracle = sd1
    for word in ("photograph", "astronaut", "painting", "mountains", "the"):
        assert oracle.tokenize(word) == [word + "</w>"]
        assert ours.tokenize(word) == oracle.convert_tokens_to_ids([word + "</w>"])
    assert len(oracle.tokenize("unseenwordzq")) > 1  # ... and unseen words are split


def test_clip_sd1_matches_transformers(sd1):
    ours, oracle = sd1
    assert isinstance(ours, PromptTokenizer)
    assert_same_ids(ours, oracle, PROMPTS)
    batch = ours.encode(PROMPTS)
    assert (batch.input_ids[:, 0] == SD15.bos_token_id).all()
    empty = batch.input_ids[PROMPTS.index("")]
    assert empty[1] == SD15.eos_token_id and (empty[2:] == SD15.eos_token_id).all()  # SD 1.x pads with eos


def test_clip_sd2_pads_with_id_zero_and_splits_out_the_pad_token(sd2):
    ours, oracle = sd2
    assert_same_ids(ours, oracle, PROMPTS)
    prompts = ["a cat", "wow!! great!"]
    batch = ours.encode(prompts)
    for row, prompt in enumerate(prompts):
        end = len(ours.tokenize(prompt)) + 1
        assert batch.input_ids[row, end] == SD21.eos_token_id and (batch.input_ids[row, end + 1:] == 0).all()
    assert ours.tokenize("wow!! great!").count(0) == 3  # "!" is a special token, as in transformers


def test_clip_fuzz_matches_transformers(sd1, sd2):
    prompts = fuzz_prompts(seed=0, count=400)
    assert_same_ids(*sd1, prompts)
    assert_same_ids(*sd2, prompts)


def test_clip_every_codepoint_matches_transformers(sd1):
    ours, oracle = sd1
    codepoints = assigned_codepoints(0, 0x10000) + assigned_codepoints(0x10000, 0x110000, 17)
    assert_codepoints_match(ours.tokenize, oracle, codepoints, "transformers' CLIPTokenizer")


def test_clip_truncation_keeps_eos_last_and_reports_it(sd1):
    ours, oracle = sd1
    assert len(ours.tokenize("the")) == 1
    prompts = ["the " * 75, "the " * 76, "the " * 200]
    assert_same_ids(ours, oracle, prompts)
    batch = ours.encode(prompts)
    assert batch.truncated == [False, True, True]
    assert (batch.input_ids[:, -1] == SD15.eos_token_id).all()
    assert (batch.input_ids[1] == batch.input_ids[2]).all()


def test_tiny_preset_assets_load_in_both(tmp_path):
    folder = write_synthetic_clip_assets(tmp_path, TINY.vocab_size)
    ours, oracle = load_tokenizer(folder, TINY), CLIPTokenizer.from_pretrained(folder)
    assert len(oracle) == TINY.vocab_size and (ours.bos_token_id, ours.eos_token_id) == (998, 999)
    assert_same_ids(ours, oracle, PROMPTS[:12] + fuzz_prompts(seed=1, count=100))
    short = PromptTokenizer(ours.backend, bos_token_id=998, eos_token_id=999, pad_token_id=0, max_length=16)
    assert short.encode("a b c d e f g h i j k l m n o p q").input_ids.shape == (1, 16)


def test_single_prompt_and_call_form(sd1):
    ours, _ = sd1
    single = ours("a cat")
    assert isinstance(single, TokenizedBatch) and single.input_ids.shape == (1, 77)
    assert (single.input_ids == ours.encode(["a cat"]).input_ids).all()


# --- BERT WordPiece -----------------------------------------------------------------------

def test_synthetic_wordpiece_assets_have_the_preset_layout(bert_dir, tmp_path):
    lines = (bert_dir / "vocab.txt").read_text(encoding="utf-8").split("\n")
    assert lines[-1] == "" and len(lines) - 1 == LDM_BERT.vocab_size
    assert lines[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] and len(set(lines)) == len(lines)
    assert {"photograph", "##ing"} <= set(lines)
    again = write_synthetic_wordpiece_assets(tmp_path, LDM_BERT.vocab_size)
    assert (again / "vocab.txt").read_bytes() == (bert_dir / "vocab.txt").read_bytes()


def test_wordpiece_matches_transformers_fast_and_python(bert):
    ours, fast, python = bert
    assert isinstance(ours, PromptTokenizer)
    # Greek capital sigma: the Python tokenizer lower-cases whole words (final "ς"), the Rust one per
    # character ("σ"); ours follows the Rust one, which the LDM code used (BertTokenizerFast).
    # (test_wordpiece_every_codepoint_matches_transformers checks it with Greek in the vocabulary)
    prompts = PROMPTS + fuzz_prompts(seed=2, count=300)
    assert_same_ids(ours, fast, prompts)
    # The Python tokenizer also drops unassigned codepoints (U+0378, U+FFFF) that the Rust one keeps.
    assert_same_ids(ours, python, [prompt for prompt in prompts if not set(prompt) & {"Σ", "\u0378", "\uffff"}])
    batch = ours.encode(["a photograph", ""])
    assert batch.input_ids[1, :3].tolist() == [2, 3, 0] and (batch.input_ids[:, 4:] == 0).all()


def test_wordpiece_truncation(bert):
    ours, fast, _ = bert
    prompts = ["the " * 75, "the " * 76, "photograph " * 90, "x" * 101, "ab" * 50]
    assert_same_ids(ours, fast, prompts)
    assert ours.encode(prompts).truncated == [False, True, True, False, False]


def test_wordpiece_every_codepoint_matches_transformers(bert, bert_dir, tmp_path):
    """With every character (and ##character) in the vocabulary, so that no difference hides in [UNK]."""
    ours, _, _ = bert
    codepoints = (assigned_codepoints(0, 0x3000) + assigned_codepoints(0x3000, 0x10000, 3)
                  + assigned_codepoints(0x10000, 0x110000, 29))
    variants = (lambda c: c, str.lower, lambda c: unicodedata.normalize("NFD", c).lower(),
                lambda c: unicodedata.normalize("NFD", c.lower()))
    extra = sorted({char for cp in codepoints for variant in variants for char in variant(chr(cp))}
                   - set(ours.backend.get_vocab()))
    lines = (bert_dir / "vocab.txt").read_text(encoding="utf-8").split("\n")[:-1]
    lines += [token for char in extra if char.strip() for token in (char, "##" + char)]
    (tmp_path / "vocab.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    wide = load_tokenizer(tmp_path, BertConfig(vocab_size=len(lines)))
    fast, python = BertTokenizer.from_pretrained(tmp_path), BertTokenizerLegacy.from_pretrained(tmp_path)
    # ours runs the same `tokenizers` pipeline as transformers' BertTokenizer: equal on every codepoint.
    assert_codepoints_match(wide.tokenize, fast, codepoints, "the Rust BertTokenizer")
    # The pure-Python tokenizer differs from both where the Rust category tables (pre-Unicode 10)
    # and this Python's disagree: compare with it on the scripts of real prompts, and away from its
    # two documented departures (whole-word final sigma; CJK padding from U+2B820, not U+2B920).
    stable = [cp for cp in codepoints if cp < 0x600 or 0x1E00 <= cp < 0x2E43 or 0x3000 <= cp < 0xA000
              or 0xF900 <= cp < 0x10000 or 0x1F000 <= cp < 0x1FB00 or 0x2B800 <= cp < 0x2B940]
    python_side = [cp for cp in stable if cp != 0x3A3 and not 0x2B820 <= cp < 0x2B920]
    assert_codepoints_match(wide.tokenize, python, python_side, "the Python BertTokenizer")


# --- loading and errors ---------------------------------------------------------------------

def copy_assets(source: Path, target: Path) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


@pytest.mark.parametrize("name", ["vocab.json", "merges.txt"])
def test_missing_clip_file_names_it(clip_dir, tmp_path, name):
    folder = copy_assets(clip_dir, tmp_path / "tokenizer")
    (folder / name).unlink()
    with pytest.raises(BundleError, match=name):
        load_tokenizer(folder, SD15)
    with pytest.raises(CheckpointError, match=name):
        load_tokenizer(folder, SD15, error=CheckpointError)


def test_missing_wordpiece_vocab_names_it(tmp_path):
    with pytest.raises(BundleError, match="vocab.txt"):
        load_tokenizer(tmp_path, LDM_BERT)


@pytest.mark.parametrize("content, message", [
    ('{"!": 0, "a": 1', "corrupt JSON"),
    ('["!", "a"]', "non-negative integer ids"),
    ('{"!": 0, "a": "1"}', "non-negative integer ids"),
    ('{"!": 0, "a": 0}', "share one id"),
    ('{"!": 0, "<|startoftext|>": 1, "<|endoftext|>": 2}', "byte-level base tokens"),
])
def test_corrupt_vocab_json(clip_dir, tmp_path, content, message):
    folder = copy_assets(clip_dir, tmp_path)
    (folder / "vocab.json").write_text(content, encoding="utf-8")
    with pytest.raises(BundleError, match=f"vocab.json.*{message}"):
        load_tokenizer(folder, SD15)


def test_non_utf8_file(clip_dir, tmp_path):
    folder = copy_assets(clip_dir, tmp_path)
    (folder / "merges.txt").write_bytes(b"#version: 0.2\n\xff\xfe a\n")
    with pytest.raises(BundleError, match="merges.txt.*UTF-8"):
        load_tokenizer(folder, SD15)


@pytest.mark.parametrize("line, message", [
    ("qqqqq zzzzz", "refers to 'qqqqq'"),  # a token that is not in vocab.json
    ("Ā Ā</w>", "refers to 'ĀĀ</w>'"),     # a merge whose result is not in vocab.json
    ("a b c", "two tokens"),
    (" a", "two tokens"),
])
def test_merges_with_unknown_tokens_or_bad_lines(clip_dir, tmp_path, line, message):
    folder = copy_assets(clip_dir, tmp_path)
    lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    lines.insert(5, line)
    (folder / "merges.txt").write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(BundleError, match=f"merges.txt line 6.*{message}"):
        load_tokenizer(folder, SD15)
    if "refers" in message:
        with pytest.raises(Exception):  # the oracle refuses such a file too
            CLIPTokenizer.from_pretrained(folder)


def test_config_mismatches(clip_dir, bert_dir, tmp_path):
    with pytest.raises(BundleError, match="'<\\|startoftext\\|>' has id 49406.*expects 998"):
        load_tokenizer(clip_dir, TINY)
    with pytest.raises(BundleError, match="id 49407, which does not fit the text encoder's vocab_size=49000"):
        load_tokenizer(clip_dir, ClipTextConfig(vocab_size=49000))
    with pytest.raises(BundleError, match="pad_token_id=50000"):
        load_tokenizer(clip_dir, ClipTextConfig(vocab_size=60000, pad_token_id=50000))
    with pytest.raises(BundleError, match="'\\[PAD\\]' has id 0.*expects 3"):
        load_tokenizer(bert_dir, BertConfig(pad_token_id=3))
    with pytest.raises(BundleError, match="vocab_size=1000"):
        load_tokenizer(bert_dir, BertConfig(vocab_size=1000))
    with pytest.raises(ConfigError, match="ClassEmbedderConfig"):
        load_tokenizer(clip_dir, ClassEmbedderConfig())


@pytest.mark.parametrize("lines, message", [
    (["[PAD]", "[UNK]", "[SEP]", "a"], "\\['\\[CLS\\]'\\] missing"),
    (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "a"], "line 6.*already on line 5"),
])
def test_corrupt_wordpiece_vocab(tmp_path, lines, message):
    (tmp_path / "vocab.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(BundleError, match=f"vocab.txt.*{message}"):
        load_tokenizer(tmp_path, BertConfig())


def test_bad_requests(sd1):
    ours, _ = sd1
    with pytest.raises(GenerationError, match="prompt 1 must be a str, found int"):
        ours.encode(["a cat", 3])
    with pytest.raises(GenerationError, match="empty batch"):
        ours.encode([])
    with pytest.raises(ConfigError, match="max_length"):
        PromptTokenizer(ours.backend, bos_token_id=0, eos_token_id=0, pad_token_id=0, max_length=1)
    with pytest.raises(ConfigError, match="vocab_size must be >= 514"):
        write_synthetic_clip_assets(Path("unused"), 513)
    with pytest.raises(ConfigError, match="vocab_size must be >= "):
        write_synthetic_wordpiece_assets(Path("unused"), 50)


def test_tokenizer_imports_without_torch_or_transformers():
    # `tokenizers` (Rust, no torch) is the runtime's tokenizer; torch and transformers stay out
    code = ("import sys\n"
            "for name in ('torch', 'transformers'): sys.modules[name] = None\n"
            "import ldmrt.tokenizer\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
