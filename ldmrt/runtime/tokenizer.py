"""Prompt tokenizers of the lean runtime: CLIP byte-level BPE (SD 1.x/2.x) and BERT WordPiece (LDM).

Standard library + numpy only. Both reproduce the `tokenizers`-backed transformers classes the
reference pipelines use (`CLIPTokenizer`, `BertTokenizer`) id for id: special tokens are split
out of the raw prompt first, then each piece is normalized, pre-tokenized and split into
subwords; `encode` adds bos/eos, truncates to the model length keeping eos last, pads to it.
Also here: deterministic synthetic vocabularies for the random-weight presets.

Known departures, all on rare input: character classes come from this Python's `unicodedata`,
while `tokenizers` uses newer tables for CLIP and pre-Unicode-10 ones for BERT, so characters
assigned in between may tokenize differently. transformers 4's pure-Python CLIPTokenizer
without ftfy also padded CJK ideographs with spaces and dropped control characters; we follow
the `tokenizers` class (its ftfy path minus ftfy's mojibake repair), which transformers 5 and
diffusers load. SD 2.x's "!" pad token is special as in transformers (open_clip, which SD 2.x
was trained with, encodes "!" as "!</w>").
"""
from __future__ import annotations

import heapq
import json
import re
import unicodedata
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence, Union

import numpy as np

from ldmrt.config import BertConfig, ClipTextConfig
from ldmrt.errors import BundleError, ConfigError, GenerationError, LdmrtError

CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"
END_OF_WORD = "</w>"
MERGES_HEADER = "#version: 0.2"
BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
WORDPIECE_PREFIX = "##"
MAX_WORDPIECE_CHARS = 100  # longer words become [UNK], as in BERT

# The Unicode White_Space property: what `\s` matches in the regex engine of `tokenizers`
# (Python's str.isspace() also accepts U+001C..U+001F, which CLIP keeps as symbols).
WHITESPACE = frozenset(map(chr, (
    0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B),
    0x2028, 0x2029, 0x202F, 0x205F, 0x3000)))
# CLIP's contraction alternatives, tried in this order after a "'"
_CONTRACTIONS = ("s", "t", "re", "ve", "m", "ll", "d")
# CJK ideograph ranges BERT pads with spaces (those of the Rust BertNormalizer)
_CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
               (0x2B740, 0x2B81F), (0x2B920, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


@dataclass(frozen=True)
class TokenizedBatch:
    """Token ids ready for the text encoder, and which prompts lost tokens to truncation."""
    input_ids: np.ndarray  # int32 [B, L]
    truncated: list[bool]  # per prompt: True when tokens were dropped to fit L


class _SubwordTokenizer:
    """Special-token splitting and bos/eos/truncation/padding, shared by both tokenizers."""

    def __init__(self, vocab: Mapping[str, int], special_tokens: Mapping[str, int], *,
                 bos_token_id: int, eos_token_id: int, pad_token_id: int, max_length: int) -> None:
        if max_length < 2:
            raise ConfigError(f"tokenizer max_length: expected >= 2 (room for bos and eos), found {max_length}")
        self.vocab = dict(vocab)
        self.id_to_token = {index: token for token, index in self.vocab.items()}
        if pad_token_id not in self.id_to_token:
            raise ConfigError(f"{type(self).__name__}: pad_token_id {pad_token_id} is not in the vocabulary")
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.max_length = max_length
        self._special_tokens = dict(special_tokens)
        # longest first, so that the leftmost match is also the longest one
        alternatives = sorted(self._special_tokens, key=len, reverse=True)
        self._special_pattern = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")")

    def tokenize(self, prompt: str) -> list[int]:
        """The prompt's token ids without bos/eos, truncation or padding."""
        ids: list[int] = []
        # re.split with one group alternates text, special, text, ...: odd pieces are specials
        for index, piece in enumerate(self._special_pattern.split(prompt)):
            if index % 2:
                ids.append(self._special_tokens[piece])
            elif piece:
                ids.extend(self._tokenize_text(piece))
        return ids

    def encode(self, prompts: Union[str, Sequence[str]]) -> TokenizedBatch:
        """[bos] + tokens[:max_length - 2] + [eos], padded with pad_token_id: int32 [B, max_length]."""
        batch = [prompts] if isinstance(prompts, str) else list(prompts)
        if not batch:
            raise GenerationError("tokenizer: expected at least one prompt, found an empty batch")
        for index, prompt in enumerate(batch):
            if not isinstance(prompt, str):
                raise GenerationError(f"tokenizer: prompt {index} must be a str, found "
                                      f"{type(prompt).__name__}")
        room = self.max_length - 2
        input_ids = np.full((len(batch), self.max_length), self.pad_token_id, dtype=np.int32)
        truncated = []
        for row, prompt in enumerate(batch):
            tokens = self.tokenize(prompt)
            truncated.append(len(tokens) > room)
            kept = [self.bos_token_id, *tokens[:room], self.eos_token_id]
            input_ids[row, :len(kept)] = kept
        return TokenizedBatch(input_ids, truncated)

    __call__ = encode

    def _tokenize_text(self, text: str) -> list[int]:
        raise NotImplementedError


# --- CLIP ---------------------------------------------------------------------------------

def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character map, printable bytes first (vocab order)."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    mapping = {byte: chr(byte) for byte in printable}
    for byte in range(256):
        if byte not in mapping:
            mapping[byte] = chr(256 + len(mapping) - len(printable))
    return mapping


_BYTE_TO_CHAR = bytes_to_unicode()


def clip_normalize(text: str) -> str:
    """NFC, whitespace runs -> one space, lower-case per character (tokenizers' order and rules)."""
    text = unicodedata.normalize("NFC", text)
    chars = [" " if char in WHITESPACE else char for char in text]
    return re.sub(" +", " ", "".join(char.lower() for char in chars))


def clip_pre_tokenize(text: str) -> list[str]:
    """CLIP's regex, findall-style, on normalized text:
    <|startoftext|> | <|endoftext|> | 's|'t|'re|'ve|'m|'ll|'d | \\p{L}+ | \\p{N} | [^\\s\\p{L}\\p{N}]+

    The GPT-2 split of tokenizers' ByteLevel pre-tokenizer, which follows, changes only the two
    specials here: "<|endoftext|>" (the lower-cased "<|ENDOFTEXT|>"; the exact token was split
    out of the raw prompt before) becomes "<|", "endoftext", "|>".
    """
    words = []
    position, end = 0, len(text)
    while position < end:
        char = text[position]
        if char in WHITESPACE:
            position += 1
            continue
        start = position
        special = next((s for s in (CLIP_BOS, CLIP_EOS) if text.startswith(s, position)), None)
        if special is not None:
            position += len(special)
            words += ["<|", special[2:-2], "|>"]
            continue
        contraction = None
        if char == "'":
            contraction = next((c for c in _CONTRACTIONS if text.startswith(c, position + 1)), None)
        if contraction is not None:
            position += 1 + len(contraction)
        elif _is_letter(char):
            while position < end and _is_letter(text[position]):
                position += 1
        elif _is_number(char):
            position += 1
        else:
            while position < end and not (text[position] in WHITESPACE or _is_letter(text[position])
                                          or _is_number(text[position])):
                position += 1
        words.append(text[start:position])
    return words


def _is_letter(char: str) -> bool:
    return unicodedata.category(char)[0] == "L"


def _is_number(char: str) -> bool:
    return unicodedata.category(char)[0] == "N"


def _byte_word(word: str) -> str:
    return "".join(_BYTE_TO_CHAR[byte] for byte in word.encode("utf-8"))


class ClipTokenizer(_SubwordTokenizer):
    """CLIP's byte-level BPE as transformers' CLIPTokenizer applies it for Stable Diffusion.

    Special tokens split out of the raw prompt: bos, eos and the pad token (SD 2.x pads with
    "!", id 0, so every "!" in an SD 2.x prompt becomes id 0, as in transformers).
    """

    _CACHE_LIMIT = 50_000

    def __init__(self, vocab: Mapping[str, int], merges: Sequence[tuple[str, str]], *,
                 max_length: int = 77, pad_token_id: int | None = None) -> None:
        for token in (CLIP_BOS, CLIP_EOS):
            if token not in vocab:
                raise ConfigError(f"ClipTokenizer: the vocabulary has no {token!r} token")
        pad_token_id = vocab[CLIP_EOS] if pad_token_id is None else pad_token_id
        pad_token = next((token for token, index in vocab.items() if index == pad_token_id), CLIP_EOS)
        specials = {CLIP_BOS: vocab[CLIP_BOS], CLIP_EOS: vocab[CLIP_EOS], pad_token: pad_token_id}
        super().__init__(vocab, specials, bos_token_id=vocab[CLIP_BOS], eos_token_id=vocab[CLIP_EOS],
                         pad_token_id=pad_token_id, max_length=max_length)
        self.merge_ranks = {tuple(pair): rank for rank, pair in enumerate(merges)}
        self.unk_token_id = vocab[CLIP_EOS]
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def from_config(cls, vocab: Mapping[str, int], merges: Sequence[tuple[str, str]],
                    config: ClipTextConfig) -> "ClipTokenizer":
        return cls(vocab, merges, max_length=config.max_length, pad_token_id=config.pad_token_id)

    def _tokenize_text(self, text: str) -> list[int]:
        ids: list[int] = []
        for word in clip_pre_tokenize(clip_normalize(text)):
            ids.extend(self._bpe(_byte_word(word)))
        return ids

    def _bpe(self, word: str) -> list[int]:
        """Merge the lowest-ranked adjacent pair (leftmost on ties) until none is in the merges."""
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        symbols = [*word[:-1], word[-1] + END_OF_WORD]
        while len(symbols) > 1:
            ranks = [self.merge_ranks.get(pair, -1) for pair in zip(symbols, symbols[1:])]
            candidates = [(rank, index) for index, rank in enumerate(ranks) if rank >= 0]
            if not candidates:
                break
            _, index = min(candidates)
            symbols[index:index + 2] = [symbols[index] + symbols[index + 1]]
        ids = [self.vocab.get(symbol, self.unk_token_id) for symbol in symbols]
        if len(self._cache) >= self._CACHE_LIMIT:
            self._cache.clear()
        self._cache[word] = ids
        return ids


# --- BERT WordPiece -----------------------------------------------------------------------

def _is_cjk(char: str) -> bool:
    codepoint = ord(char)
    return any(low <= codepoint <= high for low, high in _CJK_RANGES)


def _is_punctuation(char: str) -> bool:
    codepoint = ord(char)
    if 33 <= codepoint <= 47 or 58 <= codepoint <= 64 or 91 <= codepoint <= 96 or 123 <= codepoint <= 126:
        return True
    return unicodedata.category(char)[0] == "P"


def bert_normalize(text: str) -> str:
    """BertNormalizer of bert-base-uncased: drop controls, spaces, pad CJK, strip accents, lower-case."""
    out = []
    for char in text:
        if char in "\x00\ufffd" or (char not in "\t\n\r"
                                    and unicodedata.category(char) in ("Cc", "Cf", "Co")):
            continue
        if char in WHITESPACE:
            out.append(" ")
        elif _is_cjk(char):
            out.append(f" {char} ")
        else:
            out.append(char)
    decomposed = unicodedata.normalize("NFD", "".join(out))
    return "".join(char.lower() for char in decomposed if unicodedata.category(char) != "Mn")


def bert_pre_tokenize(text: str) -> list[str]:
    """BertPreTokenizer: split on whitespace, every punctuation character is a word of its own."""
    words, current = [], []
    for char in text:
        if char in WHITESPACE or _is_punctuation(char):
            if current:
                words.append("".join(current))
                current = []
            if char not in WHITESPACE:
                words.append(char)
        else:
            current.append(char)
    if current:
        words.append("".join(current))
    return words


class WordPieceTokenizer(_SubwordTokenizer):
    """bert-base-uncased's tokenizer, as the LDM paper's BERT conditioner used it: [CLS] ... [SEP] [PAD]..."""

    def __init__(self, vocab: Mapping[str, int], *, max_length: int = 77,
                 pad_token_id: int | None = None) -> None:
        missing = [token for token in ("[PAD]", "[UNK]", "[CLS]", "[SEP]") if token not in vocab]
        if missing:
            raise ConfigError(f"WordPieceTokenizer: the vocabulary lacks {missing}")
        pad_token_id = vocab["[PAD]"] if pad_token_id is None else pad_token_id
        specials = {token: vocab[token] for token in BERT_SPECIALS if token in vocab}
        super().__init__(vocab, specials, bos_token_id=vocab["[CLS]"], eos_token_id=vocab["[SEP]"],
                         pad_token_id=pad_token_id, max_length=max_length)
        self.unk_token_id = vocab["[UNK]"]

    @classmethod
    def from_config(cls, vocab: Mapping[str, int], config: BertConfig) -> "WordPieceTokenizer":
        return cls(vocab, max_length=config.max_length, pad_token_id=config.pad_token_id)

    def _tokenize_text(self, text: str) -> list[int]:
        ids: list[int] = []
        for word in bert_pre_tokenize(bert_normalize(text)):
            ids.extend(self._wordpiece(word))
        return ids

    def _wordpiece(self, word: str) -> list[int]:
        """Greedy longest-match-first; a word with any unmatched rest is one [UNK]."""
        if len(word) > MAX_WORDPIECE_CHARS:
            return [self.unk_token_id]
        ids, start = [], 0
        while start < len(word):
            for end in range(len(word), start, -1):
                piece = word[start:end] if start == 0 else WORDPIECE_PREFIX + word[start:end]
                if piece in self.vocab:
                    ids.append(self.vocab[piece])
                    start = end
                    break
            else:
                return [self.unk_token_id]
        return ids


# --- loading a bundle's tokenizer/ folder ---------------------------------------------------

def load_tokenizer(folder: Path, conditioner_config: Union[ClipTextConfig, BertConfig], *,
                   error: type[LdmrtError] = BundleError) -> Union[ClipTokenizer, WordPieceTokenizer]:
    """The tokenizer of `conditioner_config` from `folder` (vocab.json + merges.txt, or vocab.txt).

    Raises `error` (BundleError for bundles; pass CheckpointError for checkpoint folders) naming
    the missing or corrupt file, or the mismatch with the config.
    """
    folder = Path(folder)
    if isinstance(conditioner_config, ClipTextConfig):
        vocab = _read_clip_vocab(folder / "vocab.json", error)
        merges = _read_merges(folder / "merges.txt", vocab, error)
        _check_ids(folder / "vocab.json", vocab, conditioner_config, error,
                   {CLIP_BOS: conditioner_config.bos_token_id, CLIP_EOS: conditioner_config.eos_token_id})
        return ClipTokenizer.from_config(vocab, merges, conditioner_config)
    if isinstance(conditioner_config, BertConfig):
        vocab = _read_wordpiece_vocab(folder / "vocab.txt", error)
        _check_ids(folder / "vocab.txt", vocab, conditioner_config, error,
                   {"[PAD]": conditioner_config.pad_token_id})
        return WordPieceTokenizer.from_config(vocab, conditioner_config)
    raise ConfigError(f"load_tokenizer: expected a ClipTextConfig or BertConfig, found "
                      f"{type(conditioner_config).__name__} (that conditioner takes no text)")


def _read_text(path: Path, error: type[LdmrtError], what: str) -> str:
    if not path.is_file():
        raise error(f"{path}: missing; expected {what}. Re-export the bundle or copy the file "
                    f"from the model's tokenizer/ folder")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{path}: unreadable as UTF-8 text ({exc}); expected {what}") from None


def _read_clip_vocab(path: Path, error: type[LdmrtError]) -> dict[str, int]:
    what = "the JSON token -> id map of a CLIP tokenizer"
    try:
        vocab = json.loads(_read_text(path, error, what))
    except json.JSONDecodeError as exc:
        raise error(f"{path}: corrupt JSON ({exc}); expected {what}") from None
    if not isinstance(vocab, dict) or not all(
            isinstance(index, int) and not isinstance(index, bool) and index >= 0 for index in vocab.values()):
        raise error(f"{path}: expected {what} with non-negative integer ids, found another structure")
    if len(set(vocab.values())) != len(vocab):
        raise error(f"{path}: corrupt, several tokens share one id")
    missing = [char for char in _BYTE_TO_CHAR.values() for token in (char, char + END_OF_WORD)
               if token not in vocab]
    if missing:
        raise error(f"{path}: corrupt, {len(missing)} of the 512 byte-level base tokens are missing "
                    f"(first: {missing[0]!r})")
    return vocab


def _read_merges(path: Path, vocab: Mapping[str, int], error: type[LdmrtError]) -> list[tuple[str, str]]:
    merges = []
    for number, line in enumerate(_read_text(path, error, "CLIP's BPE merges").splitlines(), start=1):
        if (number == 1 and line.startswith("#version")) or not line:
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not all(parts):
            raise error(f"{path} line {number}: expected two tokens separated by one space, found {line!r}")
        for token in (*parts, parts[0] + parts[1]):
            if token not in vocab:
                raise error(f"{path} line {number}: merge {line!r} refers to {token!r}, which is not in "
                            f"vocab.json; the two files do not belong together")
        merges.append((parts[0], parts[1]))
    return merges


def _read_wordpiece_vocab(path: Path, error: type[LdmrtError]) -> dict[str, int]:
    lines = _read_text(path, error, "a WordPiece vocab.txt, one token per line").split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline
    vocab: dict[str, int] = {}
    for index, token in enumerate(lines):
        if token in vocab:
            raise error(f"{path} line {index + 1}: corrupt, {token!r} already on line {vocab[token] + 1}")
        vocab[token] = index
    missing = [token for token in ("[PAD]", "[UNK]", "[CLS]", "[SEP]") if token not in vocab]
    if missing:
        raise error(f"{path}: expected the BERT special tokens, {missing} missing")
    return vocab


def _check_ids(path: Path, vocab: Mapping[str, int], config: Union[ClipTextConfig, BertConfig],
               error: type[LdmrtError], expected: Mapping[str, int]) -> None:
    for token, index in expected.items():
        if vocab[token] != index:
            raise error(f"{path}: {token!r} has id {vocab[token]}, but the model config expects {index}; "
                        f"the tokenizer does not belong to this model")
    largest = max(vocab.values())
    if largest >= config.vocab_size:
        raise error(f"{path}: token id {largest} does not fit the model's vocab_size={config.vocab_size}")
    if isinstance(config, ClipTextConfig) and config.pad_token_id not in set(vocab.values()):
        raise error(f"{path}: the model config's pad_token_id={config.pad_token_id} is not in the vocabulary")


# --- synthetic assets for random-weight presets ---------------------------------------------

# Learned from by the synthetic builders (any change changes every synthetic vocabulary).
SYNTHETIC_CORPUS = """\
a photograph of an astronaut riding a horse on the moon, highly detailed, sharp focus, 8k
a beautiful painting of a castle in the mountains at sunset, by a famous artist, trending on artstation
portrait of a young woman with long red hair and green eyes, soft lighting, studio photo, bokeh
an oil painting of a quiet village by the river in autumn, golden leaves, warm colors, impressionism
a cute cat sitting on a wooden table next to a cup of coffee, morning light through the window
a futuristic city at night with neon lights, flying cars, rain, cyberpunk, cinematic composition
a watercolor illustration of a small fox in a snowy forest, children's book, pastel colors
a close-up photo of a red rose with water drops, macro photography, shallow depth of field
an ancient temple hidden in the jungle, overgrown with plants, volumetric fog, concept art
a dog running on the beach, waves, blue sky, summer afternoon, high resolution, realistic
a bowl of fresh fruit on the kitchen counter: apples, oranges, bananas and grapes, still life
the old lighthouse stands on a rocky island while the storm clouds gather over the dark sea
a medieval knight in shining armor holding a sword, epic fantasy, dramatic lighting, unreal engine
a robot reading a book in a library, digital art, detailed, octane render, smooth, elegant
an aerial view of green fields and winding roads, drone shot, countryside, spring flowers
a black and white photograph of a busy street in the nineteen fifties, film grain, vintage
a dragon flying over snow covered mountains, wings spread, fire, majestic, matte painting
a cozy living room with a fireplace, bookshelves, plants, a sleeping cat, interior design
a small wooden boat on a calm lake, reflection, mist, early morning, peaceful landscape
the portrait of an old man with a white beard, wrinkles, expressive eyes, charcoal drawing
a bright colorful bird sitting on a branch, tropical rainforest, national geographic photo
a spaceship landing on a red planet, dust, science fiction, retro poster, minimalism
it's a sunny day and we're walking through the park; they've said you'll love the garden
she doesn't know whether the train will arrive before noon, but I'd guess it won't be late
a café in paris with a naïve painter, a résumé on the table, über detailed, crème brûlée
the quick brown fox jumps over the lazy dog while five wizards box quickly in the jungle
two thousand and twenty three, version 1.5, 512 by 512 pixels, 50 steps, guidance 7.5
a house made of candy and chocolate, whimsical, fairy tale, soft shading, storybook art
an underwater scene with coral reefs, colorful fish, sun rays through the water, turtles
a mountain cabin in winter covered with snow, smoke from the chimney, pine trees, twilight
a samurai standing in a field of cherry blossoms, wind, petals, traditional japanese art
a steampunk airship above the clouds, brass gears, copper pipes, victorian, intricate
a glass of orange juice on a white marble surface, product photography, clean background
children playing football in the street after school, documentary photo, natural light
a huge waterfall in a green valley, rainbow, tourists on the bridge, wide angle lens
an abstract composition of circles, lines and triangles, bauhaus, primary colors, geometric
a golden retriever puppy wearing a tiny hat, studio portrait, adorable, professional photo
the ruins of a stone castle under the full moon, wolves howling, gothic, dark atmosphere
a chef cooking pasta in a restaurant kitchen, steam, motion blur, warm tones, candid
a vase of sunflowers on a windowsill, van gogh style, thick brush strokes, vibrant yellow
猫 と 犬, 東京 の 夜景, 山 と 川, 日本 の 庭園, 美しい 風景
"""

# Characters every synthetic WordPiece vocabulary knows besides the corpus' own
_WORDPIECE_EXTRA_CHARS = "".join(map(chr, range(0x21, 0x7F))).lower() + "猫犬山川人大小中日月水火木金土"


def write_synthetic_clip_assets(folder: Path, vocab_size: int) -> Path:
    """Write a CLIP-style vocab.json + merges.txt of exactly `vocab_size` tokens to `folder`.

    Layout as in CLIP: 256 byte characters, the same with </w>, one token per merge, then
    <|startoftext|> = vocab_size - 2 and <|endoftext|> = vocab_size - 1 (the presets' bos/eos).
    Merges are learned by BPE on SYNTHETIC_CORPUS; when it runs out, filler merges of two base
    tokens (in vocab order) complete the vocabulary. Deterministic: same size, same bytes.
    """
    base = [*_BYTE_TO_CHAR.values(), *(char + END_OF_WORD for char in _BYTE_TO_CHAR.values())]
    merge_count = vocab_size - len(base) - 2
    if merge_count < 0:
        raise ConfigError(f"write_synthetic_clip_assets: vocab_size must be >= {len(base) + 2}, found {vocab_size}")
    words = (_byte_word(word) for word in clip_pre_tokenize(clip_normalize(SYNTHETIC_CORPUS)))
    merges = _learn_merges((tuple([*word[:-1], word[-1] + END_OF_WORD]) for word in words),
                           merge_count, lambda left, right: left + right, set(base))
    known = set(base) | {left + right for left, right in merges}
    filler = ((left, right) for left in base[:256] for right in base if left + right not in known)
    for pair in filler:
        if len(merges) == merge_count:
            break
        merges.append(pair)
    if len(merges) < merge_count:
        raise ConfigError(f"write_synthetic_clip_assets: vocab_size={vocab_size} is larger than this "
                          f"builder can fill ({len(base) + len(merges) + 2})")
    tokens = [*base, *(left + right for left, right in merges), CLIP_BOS, CLIP_EOS]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {token: index for index, token in enumerate(tokens)}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = [MERGES_HEADER, *(f"{left} {right}" for left, right in merges)]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def write_synthetic_wordpiece_assets(folder: Path, vocab_size: int) -> Path:
    """Write a bert-style vocab.txt of exactly `vocab_size` lines to `folder`.

    Layout: [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4, single characters, the same with ##,
    word pieces learned by BPE on SYNTHETIC_CORPUS (the WordPiece trainer's method), then
    [unused0], [unused1], ... to reach `vocab_size`. Deterministic.
    """
    words = bert_pre_tokenize(bert_normalize(SYNTHETIC_CORPUS))
    alphabet = sorted(set("".join(words)) | set(_WORDPIECE_EXTRA_CHARS))
    base = [*BERT_SPECIALS, *alphabet, *(WORDPIECE_PREFIX + char for char in alphabet)]
    merge_count = vocab_size - len(base)
    if merge_count < 0:
        raise ConfigError(f"write_synthetic_wordpiece_assets: vocab_size must be >= {len(base)}, "
                          f"found {vocab_size}")
    symbolized = (tuple([word[0], *(WORDPIECE_PREFIX + char for char in word[1:])]) for word in words)
    merges = _learn_merges(symbolized, merge_count,
                           lambda left, right: left + right[len(WORDPIECE_PREFIX):], set(base))
    tokens = [*base, *(left + right[len(WORDPIECE_PREFIX):] for left, right in merges)]
    tokens += [f"[unused{index}]" for index in range(vocab_size - len(tokens))]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")
    return folder


def _learn_merges(words: Iterable[tuple[str, ...]], limit: int, join: Callable[[str, str], str],
                  known: set[str]) -> list[tuple[str, str]]:
    """Byte-pair encoding training: repeatedly merge the most frequent adjacent pair.

    Ties go to the smallest pair (string order); a pair whose joined token already exists is
    skipped, so that every merge adds exactly one new token.
    """
    counts: dict[tuple[str, ...], int] = defaultdict(int)
    for word in words:
        counts[word] += 1
    symbols = [list(word) for word in counts]
    frequency = list(counts.values())
    pair_counts: dict[tuple[str, str], int] = defaultdict(int)
    pair_words: dict[tuple[str, str], set[int]] = defaultdict(set)
    for index, word in enumerate(symbols):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += frequency[index]
            pair_words[pair].add(index)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)
    known = set(known)
    merges: list[tuple[str, str]] = []
    while heap and len(merges) < limit:
        negative_count, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -negative_count or negative_count == 0:
            continue  # stale entry: the count changed since it was pushed
        joined = join(*pair)
        if joined in known:
            pair_counts[pair] = 0
            continue
        known.add(joined)
        merges.append(pair)
        touched = set()
        for index in sorted(pair_words.pop(pair, ())):
            word, weight = symbols[index], frequency[index]
            for old in zip(word, word[1:]):
                pair_counts[old] -= weight
                touched.add(old)
            merged, position = [], 0
            while position < len(word):
                if tuple(word[position:position + 2]) == pair:
                    merged.append(joined)
                    position += 2
                else:
                    merged.append(word[position])
                    position += 1
            symbols[index] = merged
            for new in zip(merged, merged[1:]):
                pair_counts[new] += weight
                pair_words[new].add(index)
                touched.add(new)
        pair_counts.pop(pair, None)
        for changed in touched - {pair}:
            if pair_counts[changed] > 0:
                heapq.heappush(heap, (-pair_counts[changed], changed))
    return merges
