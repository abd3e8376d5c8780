"""A checkpoint's tokenizer folder -> the bundle's tokenizer.json, with the ids transformers gives.

Layouts in the wild, read as transformers 5 reads them (its `from_pretrained` is the reference):
`tokenizer.json` (transformers' fast tokenizers, and every save of transformers 5), else the classic
files (CLIP: vocab.json + merges.txt; BERT: vocab.txt). Added tokens (textual inversion: diffusers'
`load_textual_inversion` calls `tokenizer.add_tokens`, then `save_pretrained` writes them) come from
tokenizer_config.json's `added_tokens_decoder` where it has one (transformers >= 4.34), else from
added_tokens.json (older slow tokenizers) and tokenizer.json's `added_tokens`. Special tokens are
named by special_tokens_map.json over tokenizer_config.json. The result is rebuilt with the runtime's
pipelines (`ldmrt.tokenizer`), written as one tokenizer.json and checked by loading it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ldmrt.config import ClipTextConfig
from ldmrt.errors import CheckpointError
from ldmrt.tokenizer import (
    CLIP_BOS, CLIP_EOS, END_OF_WORD, TOKENIZER_FILE, TextConfig, TokenSpec, build_clip, build_wordpiece,
    clip_specials, load_tokenizer, read_clip_vocab, read_merges, read_wordpiece_vocab)

# special-token roles and transformers' defaults for them
_SPECIAL_ROLES = {
    "clip": {"bos_token": CLIP_BOS, "eos_token": CLIP_EOS, "unk_token": CLIP_EOS, "pad_token": CLIP_EOS},
    "wordpiece": {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
                  "mask_token": "[MASK]"},
}
_FLAGS = ("special", "normalized", "lstrip", "rstrip", "single_word")


@dataclass(frozen=True)
class TokenizerFolder:
    """What a tokenizer folder holds: its kind, layout, tokens and the special tokens it names."""
    folder: Path
    kind: str                      # "clip" | "wordpiece"
    layout: str                    # "classic" (vocab.json/merges.txt or vocab.txt) | "tokenizer.json"
    vocab: dict[str, int]          # the model's vocabulary and the added tokens
    pad_token: str | None          # from special_tokens_map.json / tokenizer_config.json
    merges: tuple[tuple[str, str], ...] = ()
    added: tuple[TokenSpec, ...] = ()   # added tokens (specials included) with their matching rules
    lowercase: bool = True         # BERT: tokenizer_config.json's do_lower_case
    base_vocab: dict[str, int] = field(default_factory=dict)

    def token_id(self, token: str) -> int:
        if token not in self.vocab:
            raise CheckpointError(f"{self.folder}: the vocabulary has no {token!r} token")
        return self.vocab[token]

    def clip_ids(self) -> dict[str, int]:
        """bos/eos ids of a CLIP tokenizer, and the pad id where the folder names a pad token."""
        if self.kind != "clip":
            raise CheckpointError(f"{self.folder}: holds a {self.kind} tokenizer; the text encoder is CLIP")
        ids = {"bos_token_id": self.token_id(CLIP_BOS), "eos_token_id": self.token_id(CLIP_EOS)}
        if self.pad_token:
            ids["pad_token_id"] = self.token_id(self.pad_token)
        return ids


def read_tokenizer_folder(folder: Path) -> TokenizerFolder:
    """The tokenizer in `folder`, without transformers; CheckpointError names what is missing or wrong."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: expected a tokenizer folder, found none")
    data: dict[str, Any] = {}
    merges: list[tuple[str, str]] = []
    if (folder / TOKENIZER_FILE).is_file():     # transformers 5 reads it first, as here
        data = _read_json(folder / TOKENIZER_FILE)
        vocab, merges = _tokenizer_json_model(folder / TOKENIZER_FILE, data)
        kind, layout = "clip" if data["model"]["type"] == "BPE" else "wordpiece", TOKENIZER_FILE
    elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        kind, layout = "clip", "classic"
        vocab = read_clip_vocab(folder / "vocab.json", CheckpointError)
        merges = read_merges(folder / "merges.txt", vocab, CheckpointError)
    elif (folder / "vocab.txt").is_file():
        kind, layout = "wordpiece", "classic"
        vocab = read_wordpiece_vocab(folder / "vocab.txt", CheckpointError)
    else:
        raise CheckpointError(f"{folder}: no tokenizer files; expected vocab.json + merges.txt (CLIP), "
                              f"vocab.txt (BERT) or tokenizer.json")
    config = _read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    added = _added_tokens(folder, kind, vocab, config, data)
    lowercase = config.get("do_lower_case", True) if isinstance(config, dict) else True
    if not isinstance(lowercase, bool):
        raise CheckpointError(f"{folder / 'tokenizer_config.json'}: do_lower_case must be true or false, "
                              f"found {lowercase!r}")
    pad = _special_names(folder, kind, defaults=False).get("pad_token")
    return TokenizerFolder(folder, kind, layout, {**vocab, **{t.content: t.id for t in added}}, pad,
                           tuple(merges), tuple(added), lowercase, dict(vocab))


def write_runtime_assets(source: Path, dest: Path, config: TextConfig) -> str:
    """Write the bundle's tokenizer.json into `dest` from the folder `source`, check it, return the kind."""
    info = read_tokenizer_folder(source)
    wanted = "clip" if isinstance(config, ClipTextConfig) else "wordpiece"
    if info.kind != wanted:
        raise CheckpointError(f"{source}: holds a {info.kind} tokenizer but the text encoder needs "
                              f"a {wanted} tokenizer")
    where = str(source)
    if wanted == "clip":
        # the config's pad token is special too where the folder names none (as the runtime always did)
        named = {t.content for t in info.added}
        added = [*info.added, *(t for t in clip_specials(info.vocab, config.pad_token_id) if t.content not in named)]
        backend = build_clip(info.base_vocab, info.merges, added, where, CheckpointError)
    else:
        backend = build_wordpiece(info.base_vocab, info.added, where, CheckpointError, lowercase=info.lowercase)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / TOKENIZER_FILE).write_text(backend.to_str(), encoding="utf-8")
    load_tokenizer(dest, config, error=CheckpointError)   # ids vs the text encoder: fail here, not at run time
    return wanted


def _added_tokens(folder: Path, kind: str, vocab: Mapping[str, int], config: Any,
                  data: Mapping[str, Any]) -> list[TokenSpec]:
    """Every added token with its id and rules, as transformers 5's from_pretrained assembles them."""
    decoder: dict[int, TokenSpec] = {}
    names = _special_names(folder, kind)
    if isinstance(config, dict) and "added_tokens_decoder" in config:
        entries = config["added_tokens_decoder"]
        if not isinstance(entries, dict):
            raise CheckpointError(f"{folder / 'tokenizer_config.json'}: added_tokens_decoder must map ids to "
                                  f"tokens, found {type(entries).__name__}")
        for index, entry in entries.items():
            decoder[_token_id(index, folder / "tokenizer_config.json")] = _spec(entry, index, folder / "tokenizer_config.json")
    else:
        if (folder / "added_tokens.json").is_file():
            specials = set(names.values())
            entries = _read_json(folder / "added_tokens.json")
            if not isinstance(entries, dict):
                raise CheckpointError(f"{folder / 'added_tokens.json'}: expected a token -> id map")
            for content, index in entries.items():
                special = content in specials
                decoder[_token_id(index, folder / "added_tokens.json")] = TokenSpec(
                    content, _token_id(index, folder / "added_tokens.json"), special=special, normalized=not special)
        for entry in data.get("added_tokens") or []:
            spec = _spec(entry, entry.get("id") if isinstance(entry, dict) else None, folder / TOKENIZER_FILE)
            decoder[spec.id] = spec
    for spec in decoder.values():
        if spec.content in vocab and vocab[spec.content] != spec.id:
            raise CheckpointError(f"{folder}: added token {spec.content!r} has id {spec.id}, but the vocabulary "
                                  f"gives it id {vocab[spec.content]}; the tokenizer files disagree")
    # special tokens named by the folder (or transformers' defaults) that no added entry describes:
    # matched on the raw text whatever special_tokens_map.json says (as transformers 5 does)
    listed = {spec.content for spec in decoder.values()}
    for content in names.values():
        if content not in listed and content in vocab:
            decoder[vocab[content]] = TokenSpec(content, vocab[content], special=True)
            listed.add(content)
    return sorted(decoder.values(), key=lambda spec: spec.id)


def _special_names(folder: Path, kind: str, defaults: bool = True) -> dict[str, str]:
    """role (bos_token, pad_token, ...) -> content; special_tokens_map.json wins over tokenizer_config.json."""
    names = dict(_SPECIAL_ROLES[kind]) if defaults else {}
    for file in ("tokenizer_config.json", "special_tokens_map.json"):
        if not (folder / file).is_file():
            continue
        data = _read_json(folder / file)
        for role in _SPECIAL_ROLES[kind]:
            value = data.get(role) if isinstance(data, dict) else None
            if isinstance(value, dict) and isinstance(value.get("content"), str):
                names[role] = value["content"]
            elif isinstance(value, str):
                names[role] = value
    return names


def _spec(entry: Any, index: Any, path: Path) -> TokenSpec:
    if not isinstance(entry, dict) or not isinstance(entry.get("content"), str):
        raise CheckpointError(f"{path}: added token {index!r} must be an object with a string content, "
                              f"found {entry!r}")
    special = bool(entry.get("special", False))
    flags = {key: bool(entry[key]) for key in _FLAGS if key in entry}
    flags.setdefault("normalized", not special)    # AddedToken's default
    return TokenSpec(entry["content"], _token_id(index, path), **{"special": special, **flags})


def _token_id(value: Any, path: Path) -> int:
    try:
        index = int(value)
    except (TypeError, ValueError):
        index = -1
    if isinstance(value, bool) or index < 0 or str(index) != str(value).strip():
        raise CheckpointError(f"{path}: token id {value!r}: expected a non-negative integer")
    return index


def _tokenizer_json_model(path: Path, data: Any) -> tuple[dict[str, int], list[tuple[str, str]]]:
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or not isinstance(model.get("vocab"), dict):
        raise CheckpointError(f"{path}: expected a `tokenizers` file with a model.vocab object")
    kind = model.get("type")
    if kind == "BPE" and (model.get("end_of_word_suffix") != END_OF_WORD
                          or model.get("continuing_subword_prefix") not in (None, "")):
        raise CheckpointError(f"{path}: a BPE tokenizer that is not CLIP's (end_of_word_suffix "
                              f"{model.get('end_of_word_suffix')!r}); ldmrt runs CLIP and BERT tokenizers")
    if kind not in ("BPE", "WordPiece"):
        raise CheckpointError(f"{path}: tokenizer model type {kind!r}; expected BPE (CLIP) or WordPiece (BERT)")
    vocab = model["vocab"]
    if not all(isinstance(index, int) and not isinstance(index, bool) and index >= 0 for index in vocab.values()):
        raise CheckpointError(f"{path}: model.vocab must map tokens to non-negative integer ids")
    merges = []
    for merge in model.get("merges") or []:
        parts = merge.split(" ") if isinstance(merge, str) else list(merge)
        if len(parts) != 2 or not all(isinstance(part, str) and part for part in parts):
            raise CheckpointError(f"{path}: merge {merge!r}: expected two tokens")
        merges.append((parts[0], parts[1]))
    return dict(vocab), merges


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable JSON ({exc})") from None
