"""Deterministic synthetic tokenizer assets for the random-weight presets (export and tests).

A vocabulary of the preset's size is learned from a small fixed corpus (CLIP byte-level BPE
merges, BERT WordPiece pieces), so random-weight bundles tokenize real prompts the way real
ones do. Not part of the lean runtime: the Triton repository does not carry it. Torch-free.
"""
from __future__ import annotations

import heapq
import json
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterable

from tokenizers import Tokenizer
from tokenizers.models import BPE, WordPiece

from ldmrt.config import ClipTextConfig
from ldmrt.errors import ConfigError
from ldmrt.tokenizer import (BERT_SPECIALS, BYTE_TO_CHAR, CLIP_BOS, CLIP_EOS, END_OF_WORD, MERGES_HEADER,
                             TOKENIZER_FILE, WORDPIECE_PREFIX, TextConfig, build_clip, build_wordpiece,
                             clip_pipeline, clip_specials, wordpiece_pipeline, wordpiece_specials)


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


def synthetic_clip_vocab(vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP-style vocabulary of exactly `vocab_size` tokens and its merges.

    Layout as in CLIP: 256 byte characters, the same with </w>, one token per merge, then
    <|startoftext|> = vocab_size - 2 and <|endoftext|> = vocab_size - 1 (the presets' bos/eos).
    Merges are learned by BPE on SYNTHETIC_CORPUS; when it runs out, filler merges of two base
    tokens (in vocab order) complete the vocabulary. Deterministic: same size, same tokens.
    """
    base = [*BYTE_TO_CHAR.values(), *(char + END_OF_WORD for char in BYTE_TO_CHAR.values())]
    merge_count = vocab_size - len(base) - 2
    if merge_count < 0:
        raise ConfigError(f"write_synthetic_clip_assets: vocab_size must be >= {len(base) + 2}, found {vocab_size}")
    words = _corpus_words(clip_pipeline(Tokenizer(BPE())))
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
    return {token: index for index, token in enumerate(tokens)}, merges


def write_synthetic_clip_assets(folder: Path, vocab_size: int) -> Path:
    """synthetic_clip_vocab as transformers' classic files: vocab.json + merges.txt in `folder`."""
    vocab, merges = synthetic_clip_vocab(vocab_size)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = [MERGES_HEADER, *(f"{left} {right}" for left, right in merges)]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def synthetic_wordpiece_vocab(vocab_size: int) -> dict[str, int]:
    """A bert-style vocabulary of exactly `vocab_size` tokens.

    Layout: [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4, single characters, the same with ##,
    word pieces learned by BPE on SYNTHETIC_CORPUS (the WordPiece trainer's method), then
    [unused0], [unused1], ... to reach `vocab_size`. Deterministic.
    """
    words = _corpus_words(wordpiece_pipeline(Tokenizer(WordPiece(vocab={"[UNK]": 0}, unk_token="[UNK]"))))
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
    return {token: index for index, token in enumerate(tokens)}


def write_synthetic_wordpiece_assets(folder: Path, vocab_size: int) -> Path:
    """synthetic_wordpiece_vocab as a bert-style vocab.txt of exactly `vocab_size` lines in `folder`."""
    tokens = synthetic_wordpiece_vocab(vocab_size)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("".join(token + "\n" for token in tokens), encoding="utf-8")
    return folder


def write_synthetic_tokenizer(folder: Path, config: TextConfig) -> str:
    """The random-weight presets' tokenizer as a bundle holds it: `folder`/tokenizer.json; returns the kind."""
    if isinstance(config, ClipTextConfig):
        vocab, merges = synthetic_clip_vocab(config.vocab_size)
        backend = build_clip(vocab, merges, clip_specials(vocab, config.pad_token_id), "synthetic", ConfigError)
    else:
        vocab = synthetic_wordpiece_vocab(config.vocab_size)
        backend = build_wordpiece(vocab, wordpiece_specials(vocab), "synthetic", ConfigError)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / TOKENIZER_FILE).write_text(backend.to_str(), encoding="utf-8")
    return "clip" if isinstance(config, ClipTextConfig) else "wordpiece"


def _corpus_words(backend: Tokenizer) -> list[str]:
    """SYNTHETIC_CORPUS normalized and pre-tokenized by `backend`'s pipeline (CLIP: byte characters)."""
    normalized = backend.normalizer.normalize_str(SYNTHETIC_CORPUS)
    return [word for word, _ in backend.pre_tokenizer.pre_tokenize_str(normalized)]


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
