"""Prompt tokenizers of the lean runtime: CLIP byte-level BPE (SD 1.x/2.x) and BERT WordPiece (LDM).

The work is done by `tokenizers` (Rust, no torch), with the pipelines that transformers'
`CLIPTokenizer` and `BertTokenizer` build (transformers 5: the tokenizers-backed classes diffusers
loads), so ids match them id for id, added tokens (textual inversion) included. A bundle holds its
tokenizer as one `tokenizer.json`; bundles written before hold vocab.json + merges.txt (CLIP) or
vocab.txt (BERT), which `load_tokenizer` converts at load with the same pipelines.

Cost is bounded by the model's text length, not the prompt's: `encode` reads a prompt in growing
windows cut at whitespace, stops as soon as the first max_length - 2 tokens are certain, and never
reads more than READ_LIMIT_PER_TOKEN * max_length characters (what lies beyond is dropped and the
prompt reported truncated). The random-weight presets' synthetic vocabularies are built in
ldmrt/synthetic_tokenizer.py (export and tests only). SD 2.x's "!" pad token is special as in transformers (open_clip, which SD 2.x was trained
with, encodes "!" as "!</w>").
"""
from __future__ import annotations

import bisect
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence, Union

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE, WordPiece

from ldmrt.config import BertConfig, ClipTextConfig
from ldmrt.errors import BundleError, ConfigError, GenerationError, LdmrtError

CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"
END_OF_WORD = "</w>"
MERGES_HEADER = "#version: 0.2"
BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
WORDPIECE_PREFIX = "##"
MAX_WORDPIECE_CHARS = 100  # longer words become [UNK], as in BERT
TOKENIZER_FILE = "tokenizer.json"
TextConfig = Union[ClipTextConfig, BertConfig]

# CLIP's pre-tokenizer regex, as transformers' CLIPTokenizer writes it
CLIP_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# The Unicode White_Space property: `\s` of the Rust regex engine and char::is_whitespace (BERT).
# A cut just before one of these changes neither normalization (NFC, BERT's) nor any word.
WHITESPACE = frozenset(map(chr, (
    0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B),
    0x2028, 0x2029, 0x202F, 0x205F, 0x3000)))
_WHITESPACE_CHAR = re.compile("[" + re.escape("".join(sorted(WHITESPACE))) + "]")
# encode's windows, in characters per token of max_length: the first one holds every real prompt
# (77 tokens: 1,232 characters), each next one is 4x larger, the last one is the read limit
# (77 tokens: 19,712 characters; the worst input measured, one word of emoji, takes ~0.1 s there).
FIRST_WINDOW_PER_TOKEN = 16
READ_LIMIT_PER_TOKEN = 256
# Tokens that end this close to a window's cut are not trusted: an added token may hold spaces,
# and CLIP's contractions ('re, 've, 'll) look 3 characters ahead.
_CUT_MARGIN = 4


@dataclass(frozen=True)
class TokenizedBatch:
    """Token ids ready for the text encoder, and which prompts lost tokens to truncation."""
    input_ids: np.ndarray  # int32 [B, L]
    truncated: list[bool]  # per prompt: True when tokens were dropped to fit L


@dataclass(frozen=True)
class TokenSpec:
    """An added token (special, or textual inversion's) with the id it must have and its matching rules."""
    content: str
    id: int
    special: bool = False
    normalized: bool = False   # matched on the normalized text (lower-cased for CLIP) instead of the raw one
    lstrip: bool = False
    rstrip: bool = False
    single_word: bool = False

    def added_token(self) -> AddedToken:
        return AddedToken(self.content, single_word=self.single_word, lstrip=self.lstrip,
                          rstrip=self.rstrip, normalized=self.normalized, special=self.special)


# --- the pipelines (transformers' CLIPTokenizer / BertTokenizer) ----------------------------

def build_clip(vocab: Mapping[str, int], merges: Sequence[tuple[str, str]], added: Iterable[TokenSpec],
               where: str, error: type[LdmrtError]) -> Tokenizer:
    """CLIP's byte-level BPE: NFC, whitespace runs -> " ", lower-case; CLIP's regex; bytes; BPE with </w>."""
    backend = Tokenizer(BPE(vocab=dict(vocab), merges=list(merges), dropout=None, continuing_subword_prefix="",
                            end_of_word_suffix=END_OF_WORD, fuse_unk=False, unk_token=CLIP_EOS))
    return _add_tokens(clip_pipeline(backend), added, where, error)


def build_wordpiece(vocab: Mapping[str, int], added: Iterable[TokenSpec], where: str,
                    error: type[LdmrtError], *, lowercase: bool = True) -> Tokenizer:
    """bert-base-uncased's WordPiece: BertNormalizer (clean, CJK, accents, lower-case), BertPreTokenizer."""
    backend = Tokenizer(WordPiece(vocab=dict(vocab), unk_token="[UNK]", continuing_subword_prefix=WORDPIECE_PREFIX,
                                  max_input_chars_per_word=MAX_WORDPIECE_CHARS))
    return _add_tokens(wordpiece_pipeline(backend, lowercase), added, where, error)


def clip_pipeline(backend: Tokenizer) -> Tokenizer:
    backend.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
         pre_tokenizers.ByteLevel(add_prefix_space=False)])
    backend.decoder = decoders.ByteLevel()
    return backend


def wordpiece_pipeline(backend: Tokenizer, lowercase: bool = True) -> Tokenizer:
    backend.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                    strip_accents=None, lowercase=lowercase)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix=WORDPIECE_PREFIX)
    return backend


def _add_tokens(backend: Tokenizer, added: Iterable[TokenSpec], where: str,
                error: type[LdmrtError]) -> Tokenizer:
    # `tokenizers` chooses an added token's id itself (its vocabulary id, else the next free one):
    # add in id order and refuse any token that would not get the id its file gives it.
    for spec in sorted(added, key=lambda spec: spec.id):
        backend.add_tokens([spec.added_token()])
        found = backend.token_to_id(spec.content)
        if found != spec.id:
            raise error(f"{where}: added token {spec.content!r} is declared with id {spec.id}, but it "
                        f"takes id {found} (added ids must follow the vocabulary without gaps or clashes); "
                        f"fix the tokenizer files")
    return backend


def clip_specials(vocab: Mapping[str, int], pad_token_id: int) -> list[TokenSpec]:
    """bos, eos and the pad token, split out of the raw prompt as transformers' defaults do."""
    pad = next((token for token, index in vocab.items() if index == pad_token_id), CLIP_EOS)
    return [TokenSpec(token, vocab[token], special=True) for token in dict.fromkeys((CLIP_BOS, CLIP_EOS, pad))
            if token in vocab]


def wordpiece_specials(vocab: Mapping[str, int]) -> list[TokenSpec]:
    return [TokenSpec(token, vocab[token], special=True) for token in BERT_SPECIALS if token in vocab]


# --- the runtime tokenizer ------------------------------------------------------------------

class PromptTokenizer:
    """Prompts -> int32 [B, max_length]: [bos] + tokens[:max_length - 2] + [eos], padded with pad_token_id."""

    def __init__(self, backend: Tokenizer, *, bos_token_id: int, eos_token_id: int, pad_token_id: int,
                 max_length: int, multi_vector: bool = False) -> None:
        if max_length < 2:
            raise ConfigError(f"tokenizer max_length: expected >= 2 (room for bos and eos), found {max_length}")
        self.backend = backend
        self.backend.no_truncation()
        self.backend.no_padding()
        self.bos_token_id, self.eos_token_id, self.pad_token_id = bos_token_id, eos_token_id, pad_token_id
        self.max_length = max_length
        added = list(backend.get_added_tokens_decoder().values())
        self._margin = _CUT_MARGIN + max((len(token.content) for token in added), default=0)
        # diffusers' TextualInversionLoaderMixin writes "<t>" as "<t> <t>_1 ... <t>_k" when the
        # tokenizer holds "<t>_1" (one token per vector of a multi-vector embedding)
        self._expansions: dict[int, tuple[str, str]] = {}
        concepts = [token.content for token in added if not token.special] if multi_vector else []
        for content in concepts:
            parts = [content]
            while f"{content}_{len(parts)}" in concepts:
                parts.append(f"{content}_{len(parts)}")
            if len(parts) > 1:
                self._expansions[backend.token_to_id(content)] = (content, " ".join(parts))

    def encode(self, prompts: Union[str, Sequence[str]]) -> TokenizedBatch:
        """One prompt or a batch -> ids int32 [B, max_length] and which prompts were truncated."""
        batch = [prompts] if isinstance(prompts, str) else list(prompts)
        if not batch:
            raise GenerationError("tokenizer: expected at least one prompt, found an empty batch")
        for index, prompt in enumerate(batch):
            if not isinstance(prompt, str):
                raise GenerationError(f"tokenizer: prompt {index} must be a str, found {type(prompt).__name__}")
        input_ids = np.full((len(batch), self.max_length), self.pad_token_id, dtype=np.int32)
        truncated = []
        for row, prompt in enumerate(batch):
            tokens, cut = self._bounded_ids(prompt, row)
            kept = [self.bos_token_id, *tokens, self.eos_token_id]
            input_ids[row, :len(kept)] = kept
            truncated.append(cut)
        return TokenizedBatch(input_ids, truncated)

    __call__ = encode

    def tokenize(self, text: str) -> list[int]:
        """All token ids of `text` (no bos/eos, no truncation: cost grows with the text)."""
        return self._ids(text, 0)[0]

    def _bounded_ids(self, prompt: str, row: int) -> tuple[list[int], bool]:
        """The first max_length - 2 ids of `prompt` and whether any were dropped, reading a bounded prefix."""
        room = self.max_length - 2
        window = FIRST_WINDOW_PER_TOKEN * self.max_length
        limit = READ_LIMIT_PER_TOKEN * self.max_length
        while True:
            if len(prompt) <= window:
                ids = self._ids(prompt, row)[0]
                return ids[:room], len(ids) > room
            cut = _last_whitespace(prompt, window)
            if window >= limit:
                # the read limit: the rest is never read (a word crossing the limit is cut there)
                return self._ids(prompt[:cut or limit], row)[0][:room], True
            if cut:
                # words before a whitespace cut tokenize as in the whole prompt; count the sure ones
                ids, ends, length = self._ids(prompt[:cut], row)
                if bisect.bisect_right(ends, length - self._margin) > room:
                    return ids[:room], True
            window = min(4 * window, limit)

    def _ids(self, text: str, row: int) -> tuple[list[int], list[int], int]:
        """Token ids of `text`, where each token ends (characters, non-decreasing) and the text's length.

        Multi-vector textual-inversion tokens are expanded first, so ends and length refer to that text.
        """
        encoding = self._encode(text, row)
        present = self._expansions.keys() & set(encoding.ids) if self._expansions else ()
        if present:
            for index in sorted(present):
                content, replacement = self._expansions[index]
                text = text.replace(content, replacement)
            encoding = self._encode(text, row)
        ends = list(itertools.accumulate((end for _, end in encoding.offsets), max))
        return list(encoding.ids), ends, len(text)

    def _encode(self, text: str, row: int):
        try:
            return self.backend.encode(text, add_special_tokens=False)
        except Exception as exc:   # `tokenizers` raises TypeError for text Rust cannot hold
            surrogate = re.search("[\ud800-\udfff]", text)
            if surrogate:
                raise GenerationError(f"tokenizer: prompt {row} holds a lone surrogate "
                                      f"U+{ord(surrogate.group()):04X} at character {surrogate.start()}; "
                                      f"expected valid Unicode text (UTF-8 on the wire)") from None
            raise GenerationError(f"tokenizer: prompt {row} could not be tokenized ({exc})") from None


def _last_whitespace(text: str, window: int) -> int:
    """Index of the last whitespace character in text[1:window], 0 when there is none."""
    found = _WHITESPACE_CHAR.search(text[window - 1:0:-1])
    return 0 if found is None else window - 1 - found.start()


# --- loading a bundle's tokenizer/ folder ---------------------------------------------------

def load_tokenizer(folder: Path, conditioner_config: TextConfig, *,
                   error: type[LdmrtError] = BundleError) -> PromptTokenizer:
    """The tokenizer of `conditioner_config` from `folder`: tokenizer.json, or (bundles of earlier
    ldmrt versions) vocab.json + merges.txt / vocab.txt, converted here.

    Raises `error` (BundleError for bundles; CheckpointError for checkpoint folders) naming the
    missing or corrupt file, or the mismatch with the config (ids, vocab_size).
    """
    folder = Path(folder)
    if not isinstance(conditioner_config, (ClipTextConfig, BertConfig)):
        raise ConfigError(f"load_tokenizer: expected a ClipTextConfig or BertConfig, found "
                          f"{type(conditioner_config).__name__} (that conditioner takes no text)")
    clip = isinstance(conditioner_config, ClipTextConfig)
    path = folder / TOKENIZER_FILE
    legacy = ("vocab.json", "merges.txt") if clip else ("vocab.txt",)
    if not path.is_file() and not any((folder / name).is_file() for name in legacy):
        raise error(f"{path}: missing (nor {' + '.join(legacy)}, as bundles of earlier ldmrt versions hold); "
                    f"expected the tokenizer of the bundle: re-export it")
    if path.is_file():
        backend = read_tokenizer_json(path, "clip" if clip else "wordpiece", error)
        if clip:    # SDXL's second encoder reads the first's tokenizer: its own pad token is special too
            added = {token.content for token in backend.get_added_tokens_decoder().values()}
            specials = clip_specials(backend.get_vocab(), conditioner_config.pad_token_id)
            backend = _add_tokens(backend, [t for t in specials if t.content not in added], str(path), error)
    elif clip:
        path = folder / "vocab.json"
        vocab = read_clip_vocab(path, error)
        merges = read_merges(folder / "merges.txt", vocab, error)
        backend = build_clip(vocab, merges, clip_specials(vocab, conditioner_config.pad_token_id), str(path), error)
    else:
        path = folder / "vocab.txt"
        vocab = read_wordpiece_vocab(path, error)
        backend = build_wordpiece(vocab, wordpiece_specials(vocab), str(path), error)
    return tokenizer_for(backend, conditioner_config, str(path), error)


def tokenizer_for(backend: Tokenizer, config: TextConfig, where: str, error: type[LdmrtError]) -> PromptTokenizer:
    """`backend` checked against the text encoder's config: special ids, and every id inside vocab_size."""
    vocab = backend.get_vocab(with_added_tokens=True)
    if isinstance(config, ClipTextConfig):
        expected = {CLIP_BOS: config.bos_token_id, CLIP_EOS: config.eos_token_id}
    else:
        expected = {"[PAD]": config.pad_token_id, "[CLS]": vocab.get("[CLS]", -1), "[SEP]": vocab.get("[SEP]", -1)}
    for token, index in expected.items():
        if token not in vocab:
            raise error(f"{where}: the vocabulary has no {token!r} token; expected the "
                        f"{'CLIP' if isinstance(config, ClipTextConfig) else 'BERT'} special tokens")
        if vocab[token] != index:
            raise error(f"{where}: {token!r} has id {vocab[token]}, but the model config expects {index}; "
                        f"the tokenizer does not belong to this model")
    if config.pad_token_id not in set(vocab.values()):
        raise error(f"{where}: the model config's pad_token_id={config.pad_token_id} is not in the vocabulary")
    # The text encoder gathers row `id` of its embedding table: an id past it has no embedding.
    token, largest = max(vocab.items(), key=lambda item: item[1])
    if largest >= config.vocab_size:
        added = " (an added token, e.g. textual inversion's: the text encoder needs its embedding row)" \
            if token in {t.content for t in backend.get_added_tokens_decoder().values() if not t.special} else ""
        raise error(f"{where}: token {token!r} has id {largest}{added}, which does not fit the text encoder's "
                    f"vocab_size={config.vocab_size} (ids 0..{config.vocab_size - 1}); use the text encoder "
                    f"that was saved with this tokenizer")
    bos, eos = (vocab[CLIP_BOS], vocab[CLIP_EOS]) if isinstance(config, ClipTextConfig) else \
        (vocab["[CLS]"], vocab["[SEP]"])
    return PromptTokenizer(backend, bos_token_id=bos, eos_token_id=eos, pad_token_id=config.pad_token_id,
                           max_length=config.max_length, multi_vector=isinstance(config, ClipTextConfig))


def read_tokenizer_json(path: Path, kind: str, error: type[LdmrtError]) -> Tokenizer:
    """A `tokenizers` file holding a CLIP BPE or a WordPiece model, its added tokens at their ids."""
    text = _read_text(path, error, "a `tokenizers` tokenizer.json")
    try:
        data = json.loads(text)
        backend = Tokenizer.from_str(text)
    except Exception as exc:   # json.JSONDecodeError, or the Rust parser's Exception
        raise error(f"{path}: corrupt ({str(exc)[:200]}); expected a `tokenizers` tokenizer.json") from None
    model = data.get("model") if isinstance(data, dict) else None
    found = model.get("type") if isinstance(model, dict) else None
    wanted = "BPE" if kind == "clip" else "WordPiece"
    if found != wanted or (kind == "clip" and model.get("end_of_word_suffix") != END_OF_WORD):
        raise error(f"{path}: holds a {found} tokenizer{'' if found != 'BPE' else ' with end_of_word_suffix ' + repr(model.get('end_of_word_suffix'))}; "
                    f"the text encoder needs a {'CLIP byte-level BPE (</w>)' if kind == 'clip' else 'WordPiece'} tokenizer")
    for entry in data.get("added_tokens") or []:
        content, index = entry.get("content"), entry.get("id")
        if backend.token_to_id(content) != index:
            raise error(f"{path}: added token {content!r} is declared with id {index}, but it takes id "
                        f"{backend.token_to_id(content)}; the file was edited or is corrupt, re-export it")
    return backend


def _read_text(path: Path, error: type[LdmrtError], what: str) -> str:
    if not path.is_file():
        raise error(f"{path}: missing; expected {what}. Re-export the bundle or copy the file "
                    f"from the model's tokenizer/ folder")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{path}: unreadable as UTF-8 text ({exc}); expected {what}") from None


def read_clip_vocab(path: Path, error: type[LdmrtError]) -> dict[str, int]:
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
    missing = [char for char in BYTE_TO_CHAR.values() for token in (char, char + END_OF_WORD)
               if token not in vocab]
    if missing:
        raise error(f"{path}: corrupt, {len(missing)} of the 512 byte-level base tokens are missing "
                    f"(first: {missing[0]!r})")
    return vocab


def read_merges(path: Path, vocab: Mapping[str, int], error: type[LdmrtError]) -> list[tuple[str, str]]:
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


def read_wordpiece_vocab(path: Path, error: type[LdmrtError]) -> dict[str, int]:
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


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character map, printable bytes first (vocab order)."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    mapping = {byte: chr(byte) for byte in printable}
    for byte in range(256):
        if byte not in mapping:
            mapping[byte] = chr(256 + len(mapping) - len(printable))
    return mapping


BYTE_TO_CHAR = bytes_to_unicode()
