"""Ground-truth roles aligned from the task's words to tokens, for word-level and sub-word tokenizers."""

import pytest

from dyco_probe.roles import Role
from dyco_probe.task.alignment import align_roles, cell_image_tokens, token_char_spans, words_with_spans
from dyco_probe.task.problems import ROLE_NEUTRAL, ROLE_TEXT, ROLE_VISUAL, generate_problem, make_split

CODE = {ROLE_NEUTRAL: Role.NEUTRAL, ROLE_VISUAL: Role.VISUAL, ROLE_TEXT: Role.TEXT}


@pytest.fixture(scope="module")
def word_tok():
    from dyco_probe.models.builtin import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="module")
def bpe_tok():
    """A byte-level BPE (GPT-2 / Qwen style) with a small vocabulary, so words split into pieces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from dyco_probe.models.builtin import task_corpus

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|im_end|>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    core.train_from_iterator(task_corpus(200), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def test_word_level_gold_chain_is_the_chain(word_tok):
    for p in make_split("test", 10):
        ids = word_tok(p.completion, add_special_tokens=False)["input_ids"] + [word_tok.eos_token_id]
        aligned = align_roles(word_tok, ids, p)
        assert aligned.roles[:-1] == [CODE[w.role] for w in p.chain]
        assert aligned.cells[:-1] == [w.cells for w in p.chain]
        assert aligned.roles[-1] == Role.NEUTRAL and aligned.word_index[-1] == -1  # EOS is no word
        assert aligned.word_index[:-1] == list(range(len(p.chain)))


def test_subword_pieces_inherit_their_word_role(bpe_tok):
    p = generate_problem(5)
    ids = bpe_tok(p.completion, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(p.chain)  # words really are split
    aligned = align_roles(bpe_tok, ids, p)
    for tok, role, k, cells in zip(ids, aligned.roles, aligned.word_index, aligned.cells):
        if k < 0:  # a bare space piece
            assert bpe_tok.decode([tok]).strip() == "" and role == Role.NEUTRAL
            continue
        word = p.chain[k]
        assert role == CODE[word.role] and cells == (word.cells if word.role == ROLE_VISUAL else ())
    # every visual word is covered by at least one visual token
    visual_words = {k for k, w in enumerate(p.chain) if w.role == ROLE_VISUAL}
    assert visual_words == {k for k, r in zip(aligned.word_index, aligned.roles) if r == Role.VISUAL}


def test_subwords_first_labels_only_a_words_first_piece(bpe_tok):
    p = generate_problem(5)
    ids = bpe_tok(p.completion, add_special_tokens=False)["input_ids"]
    all_ = align_roles(bpe_tok, ids, p)
    first = align_roles(bpe_tok, ids, p, subwords="first")
    seen = set()
    for k, a, f in zip(all_.word_index, all_.roles, first.roles):
        assert f == (a if k >= 0 and k not in seen else Role.NEUTRAL)
        seen.add(k)
    with pytest.raises(ValueError, match="subwords"):
        align_roles(bpe_tok, ids, p, subwords="last")


def test_non_canonical_ids_fall_back_to_incremental_decoding(bpe_tok):
    """Sampled ids need not be the tokenizer's own split of their text; spans still cover the words."""

    def first_visual(p):
        return next(i for i, w in enumerate(p.chain) if w.role == ROLE_VISUAL)

    # a problem whose first visual word the tokenizer keeps in fewer pieces than its letters
    p = next(
        p
        for p in map(generate_problem, range(100))
        if len(bpe_tok(" " + p.chain[first_visual(p)].text, add_special_tokens=False)["input_ids"])
        < len(p.chain[first_visual(p)].text)
    )
    text = p.completion
    canonical = bpe_tok(text, add_special_tokens=False)["input_ids"]
    # spell that word one byte-level character at a time
    k = first_visual(p)
    head = " ".join(w.text for w in p.chain[:k])
    word = p.chain[k].text
    tail = " " + " ".join(w.text for w in p.chain[k + 1 :])
    ids = (
        bpe_tok(head, add_special_tokens=False)["input_ids"]
        + [bpe_tok.convert_tokens_to_ids("Ġ")]
        + [bpe_tok.convert_tokens_to_ids(c) for c in word]
        + bpe_tok(tail, add_special_tokens=False)["input_ids"]
    )
    assert ids != canonical and bpe_tok.decode(ids) == text
    text_out, spans = token_char_spans(bpe_tok, ids)
    assert text_out == text and spans[-1][1] == len(text)
    aligned = align_roles(bpe_tok, ids, p)
    visual = [i for i, r in enumerate(aligned.roles) if r == Role.VISUAL and aligned.word_index[i] == k]
    assert len(visual) == len(word)  # every letter piece of the word
    assert all(aligned.cells[i] == p.chain[k].cells for i in visual)


def test_offsets_and_incremental_spans_agree_on_canonical_ids(word_tok):
    p = generate_problem(11)
    ids = word_tok(p.completion, add_special_tokens=False)["input_ids"]
    text, spans = token_char_spans(word_tok, ids)

    class Slow:  # the same tokenizer seen as a slow one: incremental decoding only
        is_fast = False

        def decode(self, *a, **k):
            return word_tok.decode(*a, **k)

    text2, spans2 = token_char_spans(Slow(), ids)
    assert text == text2
    # incremental spans include the separating space; the word itself is the same
    assert [text[s:e].strip() for s, e in spans] == [text2[s:e].strip() for s, e in spans2]


def test_generated_garbage_and_special_tokens(word_tok):
    p = generate_problem(3)
    words = ["<think>", "triangle", "blue", ";", "7", "+", "<|endoftext|>", "2", "</think>"]
    ids = [word_tok.convert_tokens_to_ids(w) for w in words]
    aligned = align_roles(word_tok, ids, p)
    assert aligned.roles[6] == Role.NEUTRAL and aligned.word_index[6] == -1  # special token: no word
    assert aligned.roles[4] == Role.TEXT and aligned.roles[5] == Role.TEXT  # numbers and operators


def test_words_with_spans_blanks_special_spans():
    assert words_with_spans("a bc<x>d", [(4, 7)]) == [("a", 0, 1), ("bc", 2, 4), ("d", 7, 8)]


def test_cell_image_tokens():
    # one merged token per cell (the built-in model): identity
    assert [cell_image_tokens([c], 4, 16) for c in range(16)] == [[c] for c in range(16)]
    # a finer token grid: each cell covers 2x2 tokens
    assert cell_image_tokens([5], 4, 64) == [18, 19, 26, 27]
    assert cell_image_tokens([0, 15], 4, 64) == [0, 1, 8, 9, 54, 55, 62, 63]
    # a rectangular grid given explicitly
    assert cell_image_tokens([1], 2, 8, token_grid=(2, 4)) == [2, 3]
    with pytest.raises(ValueError, match="square"):
        cell_image_tokens([0], 4, 12)
