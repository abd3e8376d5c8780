"""A checkpoint's tokenizer folder -> token ids for the config, and the files the lean runtime reads.

Two layouts exist in the wild: the classic files (CLIP: vocab.json + merges.txt; BERT: vocab.txt)
and transformers 5's `tokenizer.json` alone. Either is turned into the classic files, which
`ldmrt.runtime.tokenizer.load_tokenizer` reads, and checked by loading them.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from ldmrt.config import BertConfig, ClipTextConfig
from ldmrt.errors import CheckpointError
from ldmrt.runtime.tokenizer import CLIP_BOS, CLIP_EOS, MERGES_HEADER, load_tokenizer

TextConfig = Union[ClipTextConfig, BertConfig]


@dataclass(frozen=True)
class TokenizerFolder:
    """What a tokenizer folder holds: its kind, layout and the special-token ids it defines."""
    folder: Path
    kind: str                      # "clip" | "wordpiece"
    layout: str                    # "classic" (vocab.json/merges.txt or vocab.txt) | "tokenizer.json"
    vocab: dict[str, int]
    pad_token: str | None          # from tokenizer_config.json / special_tokens_map.json

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
    """The tokenizer in `folder`, without transformers; CheckpointError names what is missing."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: expected a tokenizer folder, found none")
    pad = _special_token(folder, "pad_token")
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return TokenizerFolder(folder, "clip", "classic", _read_json(folder / "vocab.json"), pad)
    if (folder / "vocab.txt").is_file():
        try:
            lines = (folder / "vocab.txt").read_text(encoding="utf-8").split("\n")
        except (OSError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{folder / 'vocab.txt'}: unreadable as UTF-8 text ({exc})") from None
        lines = lines[:-1] if lines and lines[-1] == "" else lines
        return TokenizerFolder(folder, "wordpiece", "classic", {t: i for i, t in enumerate(lines)}, pad)
    if (folder / "tokenizer.json").is_file():
        model = _tokenizer_json_model(folder / "tokenizer.json")
        kind = "clip" if model["type"] == "BPE" else "wordpiece"
        return TokenizerFolder(folder, kind, "tokenizer.json", model["vocab"], pad)
    raise CheckpointError(f"{folder}: no tokenizer files; expected vocab.json + merges.txt (CLIP), "
                          f"vocab.txt (BERT) or tokenizer.json")


def write_runtime_assets(source: Path, dest: Path, config: TextConfig) -> str:
    """Write the files the runtime tokenizer reads into `dest`, check them, return the kind."""
    info = read_tokenizer_folder(source)
    wanted = "clip" if isinstance(config, ClipTextConfig) else "wordpiece"
    if info.kind != wanted:
        raise CheckpointError(f"{source}: holds a {info.kind} tokenizer but the text encoder needs "
                              f"a {wanted} tokenizer")
    dest.mkdir(parents=True, exist_ok=True)
    if info.layout == "classic":
        for name in (("vocab.json", "merges.txt") if wanted == "clip" else ("vocab.txt",)):
            shutil.copyfile(source / name, dest / name)
    else:
        _convert_tokenizer_json(source / "tokenizer.json", dest, wanted)
    load_tokenizer(dest, config, error=CheckpointError)   # the bundle must load; fail here otherwise
    return wanted


def _convert_tokenizer_json(path: Path, dest: Path, kind: str) -> None:
    model = _tokenizer_json_model(path)
    vocab = model["vocab"]
    if kind == "clip":
        (dest / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        (dest / "merges.txt").write_text("\n".join([MERGES_HEADER, *merges]) + "\n", encoding="utf-8")
        return
    ordered = sorted(vocab.items(), key=lambda item: item[1])
    if [index for _, index in ordered] != list(range(len(ordered))):
        raise CheckpointError(f"{path}: WordPiece ids are not 0..{len(ordered) - 1} without gaps; "
                              f"cannot write a vocab.txt")
    (dest / "vocab.txt").write_text("".join(token + "\n" for token, _ in ordered), encoding="utf-8")


def _tokenizer_json_model(path: Path) -> dict[str, Any]:
    data = _read_json(path)
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or not isinstance(model.get("vocab"), dict):
        raise CheckpointError(f"{path}: expected a `tokenizers` file with a model.vocab object")
    kind = model.get("type")
    if kind == "BPE" and (model.get("end_of_word_suffix") != "</w>"
                          or model.get("continuing_subword_prefix") not in (None, "")):
        raise CheckpointError(f"{path}: a BPE tokenizer that is not CLIP's (end_of_word_suffix "
                              f"{model.get('end_of_word_suffix')!r}); ldmrt runs CLIP and BERT tokenizers")
    if kind not in ("BPE", "WordPiece"):
        raise CheckpointError(f"{path}: tokenizer model type {kind!r}; expected BPE (CLIP) or WordPiece (BERT)")
    vocab = dict(model["vocab"])
    for added in data.get("added_tokens") or []:   # specials listed only here still have ids
        if isinstance(added, dict) and isinstance(added.get("content"), str) and isinstance(added.get("id"), int):
            vocab.setdefault(added["content"], int(added["id"]))
    return {**model, "vocab": vocab}


def _special_token(folder: Path, name: str) -> str | None:
    for file in ("special_tokens_map.json", "tokenizer_config.json"):
        if (folder / file).is_file():
            value = _read_json(folder / file).get(name)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                return value
    return None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable JSON ({exc})") from None
