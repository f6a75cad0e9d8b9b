r"""Seeded corruptions: reproducible for a seed, different across seeds, the identity at severity 0."""

import pytest
import torch

from hfprune.analysis.corruptions import (
    CORRUPTIONS,
    case_change,
    char_drop,
    char_swap,
    corrupt,
    token_dropout,
)
from hfprune.evaluation import evaluation_windows


TEXT = "The pruned model keeps two of every four weights along each row.\n" * 8
TEXT_CORRUPTIONS = [name for name, c in CORRUPTIONS.items() if c.on == "text"]


def ids() -> torch.Tensor:
    return torch.randint(1, 128, (4, 32), generator=torch.Generator().manual_seed(3))


def test_the_registry_is_explicit():
    assert list(CORRUPTIONS) == ["char_swap", "char_drop", "case_change", "token_dropout"]
    assert {name: c.on for name, c in CORRUPTIONS.items()}["token_dropout"] == "ids"
    assert all(c.name == name for name, c in CORRUPTIONS.items())


@pytest.mark.parametrize("name", TEXT_CORRUPTIONS)
def test_text_corruptions_are_seeded(name):
    first = corrupt(name, TEXT, 0.2, seed=1)
    assert first == corrupt(name, TEXT, 0.2, seed=1)
    assert first != corrupt(name, TEXT, 0.2, seed=2)
    assert first != TEXT
    assert corrupt(name, TEXT, 0.0, seed=1) == TEXT


def test_token_dropout_is_seeded_and_keeps_the_shape():
    clean = ids()
    first = token_dropout(clean, 0.25, seed=1, fill_id=0)
    assert first.shape == clean.shape and first.dtype == clean.dtype
    assert torch.equal(first, token_dropout(clean, 0.25, seed=1, fill_id=0))
    assert not torch.equal(first, token_dropout(clean, 0.25, seed=2, fill_id=0))
    changed = first != clean
    assert torch.all(first[changed] == 0)
    assert 0.1 < changed.float().mean().item() < 0.4  # about a quarter of 128 tokens
    assert torch.equal(token_dropout(clean, 0.0, seed=1), clean)
    assert torch.equal(token_dropout(clean, 1.0, seed=1, fill_id=7), torch.full_like(clean, 7))
    assert torch.equal(corrupt("token_dropout", clean, 0.25, seed=1, fill_id=0), first)


def test_what_each_text_corruption_does():
    assert char_swap("pruning", 1.0) == "rpnunig"  # pairs (p r) (u n) (i n) swap, g is left over
    assert char_swap("a b", 1.0) == "a b"  # a space never moves
    assert char_drop("two of four", 1.0) == "  "
    assert case_change("Sparse 2:4", 1.0) == "sPARSE 2:4"
    swapped = char_swap(TEXT, 0.3, seed=5)
    assert sorted(swapped) == sorted(TEXT) and swapped.split(" ")[0] != "" and len(swapped) == len(TEXT)
    assert [len(w) for w in swapped.split()] == [len(w) for w in TEXT.split()]  # words keep their lengths
    dropped = char_drop(TEXT, 0.3, seed=5)
    assert dropped.count("\n") == TEXT.count("\n") and len(dropped) < len(TEXT)
    changed = case_change(TEXT, 0.3, seed=5)
    assert changed.lower() == TEXT.lower() and changed != TEXT


def test_corrupted_text_is_cut_into_fixed_windows(char_tokenizer):
    for name in TEXT_CORRUPTIONS:
        corrupted = corrupt(name, TEXT, 0.3, seed=0)
        tokens = torch.tensor(char_tokenizer(corrupted)["input_ids"])  # one token per character
        windows = evaluation_windows(tokens, char_tokenizer, 16)
        assert windows.shape == (len(corrupted) // 16, 16), name
        assert "".join(char_tokenizer.convert_ids_to_tokens(windows[0].tolist())) == corrupted[:16]


def test_bad_arguments():
    with pytest.raises(ValueError, match="severity"):
        char_swap(TEXT, 1.5)
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt("blur", TEXT, 0.1)
    with pytest.raises(TypeError, match="corrupts ids"):
        corrupt("token_dropout", TEXT, 0.1)
    with pytest.raises(TypeError, match="corrupts text"):
        corrupt("char_drop", ids(), 0.1)
