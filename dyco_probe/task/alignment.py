"""Ground-truth roles of the synthetic task, aligned from words to a tokenizer's tokens.

The task's grammar labels *words* (`problems.label_words`); traces are per *token*. Any completion
(gold or generated) is aligned in three steps:

1. the completion's token ids are decoded and each token gets its character span in that text: the
   tokenizer's offsets mapping when re-tokenising the text gives back the same ids (always for the
   built-in word-level tokenizer, and for canonical BPE / SentencePiece outputs), else incremental
   decoding (`decode(ids[:k+1])` minus `decode(ids[:k])`);
2. the text, with special tokens (EOS, ...) blanked out, is split into whitespace-separated words,
   which `label_words` labels by the template grammar;
3. each token takes the role of the word(s) its span overlaps (visual > text > neutral if a token
   spans several words; tokens of no word, such as EOS, are neutral). A word split into several
   tokens gives its role to all of them (`subwords="all"`) or only to its first token
   (`subwords="first"`: the later pieces complete a word already decided).

Relevant image tokens: a visual word's relevant cells (row-major cells of the task grid) are mapped to
the image tokens whose centres lie in those cells, for any merged-token grid (`cell_image_tokens`).
For the built-in model (28 px cells, one merged Qwen2.5-VL token per cell) that is the identity.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from dyco_probe.roles import Role
from dyco_probe.task.problems import ROLE_TEXT, ROLE_VISUAL, Problem, Word, label_words

__all__ = [
    "TokenRoles",
    "align_roles",
    "cell_image_tokens",
    "token_char_spans",
    "words_with_spans",
]

_ROLE_CODE = {ROLE_VISUAL: int(Role.VISUAL), ROLE_TEXT: int(Role.TEXT)}
_PRIORITY = {int(Role.VISUAL): 2, int(Role.TEXT): 1, int(Role.NEUTRAL): 0}
SUBWORDS = ("all", "first")


@dataclass(frozen=True)
class TokenRoles:
    """Ground truth of one completion, per token.

    Attributes:
        roles: `Role` code of each token.
        cells: relevant grid cells of each token (non-empty for visual tokens of a parsed look-up).
        word_index: index into `words` of the (first) word each token overlaps, -1 for none.
        lookup: `"read"` or `"copied"` for the tokens of a look-up's value word, else `""`.
        note: `"true"` or `"false"` for the value tokens of the noted object's look-up, else `""`.
        words: the completion's labelled words.
        text: the decoded completion (special tokens included) the spans refer to.
        spans: `(start, end)` character span of each token in `text`.
    """

    roles: list[int]
    cells: list[tuple[int, ...]]
    word_index: list[int]
    words: list[Word]
    text: str
    spans: list[tuple[int, int]]
    lookup: list[str] = ()
    note: list[str] = ()


def _decode(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def token_char_spans(tokenizer, ids: Sequence[int]) -> tuple[str, list[tuple[int, int]]]:
    """The decoded text of `ids` and each token's `(start, end)` character span in it.

    Uses the offsets mapping of a fast tokenizer when re-tokenising the text reproduces `ids`;
    otherwise incremental decoding (a token that changes earlier characters, e.g. a byte-level piece
    completing a multi-byte character, is given the span from the first changed character).
    """
    ids = [int(x) for x in ids]
    text = _decode(tokenizer, ids)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        if list(enc["input_ids"]) == ids:
            return text, [(int(s), int(e)) for s, e in enc["offset_mapping"]]
    spans, prev = [], ""
    for k in range(len(ids)):
        cur = _decode(tokenizer, ids[: k + 1])
        start = len(prev) if cur.startswith(prev) else len(_common_prefix(prev, cur))
        spans.append((min(start, len(cur)), len(cur)))
        prev = cur
    return text, spans


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def words_with_spans(text: str, blanked: Sequence[tuple[int, int]] = ()) -> list[tuple[str, int, int]]:
    """Whitespace-separated words of `text` with their character spans, ignoring the `blanked` spans
    (special tokens)."""
    chars = list(text)
    for s, e in blanked:
        chars[s:e] = " " * (e - s)
    return [(m.group(), m.start(), m.end()) for m in re.finditer(r"\S+", "".join(chars))]


def align_roles(tokenizer, ids: Sequence[int], problem: Problem, *, subwords: str = "all") -> TokenRoles:
    """Ground-truth role and relevant cells of every token of one completion of `problem`.

    Args:
        tokenizer: the model's tokenizer (fast tokenizers use their offsets mapping).
        ids: the completion's token ids (`o_1..o_T`, EOS included or not).
        problem: the synthetic problem the completion answers.
        subwords: `"all"` tokens of a word carry its role, or only the `"first"`.
    """
    if subwords not in SUBWORDS:
        raise ValueError(f"subwords must be one of {SUBWORDS}, got {subwords!r}")
    ids = [int(x) for x in ids]
    text, spans = token_char_spans(tokenizer, ids)
    special = set(getattr(tokenizer, "all_special_ids", ()) or ())
    blanked = [span for tok, span in zip(ids, spans) if tok in special]
    found = words_with_spans(text, blanked)
    words = label_words([w for w, _, _ in found], problem)
    roles, cells, word_index, lookup, note = [], [], [], [], []
    started: set[int] = set()
    for tok, (s, e) in zip(ids, spans):
        hit = [] if tok in special else [k for k, (_, ws, we) in enumerate(found) if ws < e and we > s]
        if subwords == "first":
            hit = [k for k in hit if k not in started]
        started.update(hit)
        codes = [_ROLE_CODE.get(words[k].role, int(Role.NEUTRAL)) for k in hit]
        role = max(codes, key=_PRIORITY.__getitem__, default=int(Role.NEUTRAL))
        roles.append(role)
        relevant = sorted({c for k in hit if words[k].role == ROLE_VISUAL for c in words[k].cells})
        cells.append(tuple(relevant) if role == int(Role.VISUAL) else ())
        word_index.append(hit[0] if hit else -1)
        value = next((words[k] for k in hit if words[k].lookup), None)
        lookup.append(value.lookup if value else "")
        note.append(value.note if value else "")
    return TokenRoles(roles, cells, word_index, words, text, spans, lookup, note)


def cell_image_tokens(
    cells: Sequence[int], grid: int, num_image_tokens: int, token_grid: tuple[int, int] | None = None
) -> list[int]:
    """Image-token indices (row-major over the merged token grid of the first image) whose centres lie
    in the given task-grid cells.

    Args:
        cells: row-major cell indices of a `grid x grid` scene.
        grid: cells per side.
        num_image_tokens: tokens of the image (used to infer a square token grid).
        token_grid: `(rows, cols)` of merged image tokens; default: square, `sqrt(num_image_tokens)`.
    """
    if token_grid is None:
        side = math.isqrt(num_image_tokens)
        if side * side != num_image_tokens:
            raise ValueError(
                f"{num_image_tokens} image tokens is not a square grid; pass token_grid=(rows, cols)"
            )
        token_grid = (side, side)
    rows, cols = token_grid
    out = []
    for cell in cells:
        r, c = divmod(int(cell), grid)
        for i in range(rows):
            if not r <= (i + 0.5) * grid / rows < r + 1:
                continue
            for j in range(cols):
                if c <= (j + 0.5) * grid / cols < c + 1:
                    out.append(i * cols + j)
    return sorted(set(out))
