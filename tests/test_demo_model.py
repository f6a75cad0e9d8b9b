r"""The demo-model builder (examples/build_demo_model.py): text extraction, split, tokenizer, and a tiny build."""

import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module")
def builder():
    spec = importlib.util.spec_from_file_location("build_demo_model", EXAMPLES / "build_demo_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SOURCE = b'''"""Module summary.

More about the module.
"""
import os  # an inline comment

# First comment line
# second line of the same block.
#
# ---------------------------------
def f():
    """Function docstring."""
    # Inside f.
    return 1


class C:
    """Class docstring."""

    #: 42
'''


def test_module_text_keeps_docstrings_and_comment_blocks_in_source_order(builder):
    text = builder.module_text(SOURCE)
    assert text.split("\n\n") == [
        "Module summary.",
        "More about the module.",
        "an inline comment",  # the blank line after it ends its block
        "First comment line second line of the same block.",  # consecutive lines merge; '#' and '---' are dropped
        "Function docstring.",
        "Inside f.",
        "Class docstring.",
    ]


def test_collect_documents_sorts_paths_and_skips_tests_and_invalid_files(builder, tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "tests").mkdir()
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "zeta.py").write_text('"""Zeta."""\n')
    (tmp_path / "alpha.py").write_text('"""Alpha."""\n# alpha comment\n')
    (tmp_path / "pkg" / "mod.py").write_text('def g():\n    """In a package."""\n')
    (tmp_path / "tests" / "test_x.py").write_text('"""Skipped: tests."""\n')
    (tmp_path / "__pycache__" / "cached.py").write_text('"""Skipped: cache."""\n')
    (tmp_path / "py2.py").write_text('print "Python 2"\n')  # a syntax error: skipped
    (tmp_path / "empty.py").write_text("x = 1\n")  # no text: skipped
    (tmp_path / "notes.txt").write_text('"""Not Python."""\n')
    assert builder.collect_documents(tmp_path) == [
        ("alpha.py", "Alpha.\n\nalpha comment"),
        ("pkg/mod.py", "In a package."),
        ("zeta.py", "Zeta."),
    ]


def test_split_is_a_stable_partition_with_the_documented_fractions(builder):
    names = [f"pkg{i // 50}/module_{i}.py" for i in range(4000)]
    splits = [builder.split_of(name) for name in names]
    assert splits == [builder.split_of(name) for name in names]
    counts = {s: splits.count(s) for s in ("train", "calib", "eval")}
    assert sum(counts.values()) == 4000
    assert 0.04 < counts["eval"] / 4000 < 0.06
    assert 0.09 < counts["calib"] / 4000 < 0.11
    # The assignment depends on the module path only, not on which other modules exist.
    documents = [(name, f"text of {name}") for name in names[:300]]
    grouped = builder.split_documents(documents)
    assert grouped["eval"] == [f"text of {n}" for n in names[:300] if builder.split_of(n) == "eval"]


def test_tokenizer_round_trips_through_auto_tokenizer(builder, tmp_path):
    rng = random.Random(0)
    words = [
        "the",
        "return",
        "value",
        "of",
        "a",
        "function",
        "is",
        "an",
        "object",
        "that",
        "the",
        "caller",
        "uses",
        "again",
    ]
    texts = [" ".join(rng.choice(words) for _ in range(60)) for _ in range(50)]
    tokenizer = builder.train_tokenizer(texts, vocab_size=400)
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(loaded, PreTrainedTokenizerFast)
    assert len(loaded) == len(tokenizer) <= 400  # BPE stops early when every word is a single token
    assert loaded.eos_token == loaded.bos_token == loaded.pad_token == "<|endoftext|>"
    assert loaded.eos_token_id == 0
    sample = "Return the object.\n\n    Ünïcode → bytes, tabs\tand <|endoftext|> too."
    ids = loaded(sample)["input_ids"]
    assert loaded.decode(ids) == sample  # byte-level: every string round-trips
    assert len(loaded(" the function")["input_ids"]) == 2  # frequent words became single tokens


def _fake_stdlib(root: Path) -> Path:
    root.mkdir()
    rng = random.Random(0)
    words = [
        "open",
        "read",
        "write",
        "close",
        "file",
        "path",
        "name",
        "value",
        "return",
        "object",
        "list",
        "dict",
        "string",
        "number",
        "error",
    ]
    for i in range(240):
        sentences = [" ".join(rng.choice(words) for _ in range(12)).capitalize() + "." for _ in range(30)]
        (root / f"module_{i:03d}.py").write_text('"""' + " ".join(sentences) + '"""\n# A comment.\n')
    return root


def test_tiny_build_is_complete_loadable_reused_and_deterministic(builder, tmp_path):
    stdlib = _fake_stdlib(tmp_path / "stdlib")
    kwargs = {"steps": 3, "batch_size": 2, "seed": 0, "stdlib": stdlib, "vocab_size": 300, "threads": 1}
    folder = builder.build_demo_model(tmp_path / "a", **kwargs)
    assert builder.is_complete(folder)
    info = json.loads((folder / "build_info.json").read_text())
    assert info["steps"] == 3 and info["modules"]["train"] + info["modules"]["calib"] + info["modules"]["eval"] == 240
    assert info["modules"]["eval"] > 0 and info["modules"]["calib"] > 0
    assert 1 < info["eval_perplexity"] < 300 * 1.5  # three steps barely move it from uniform over 300 tokens

    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.config.vocab_size == len(tokenizer) == 300
    assert model.config.max_position_embeddings == 256
    eval_paragraphs = set((folder / "eval.txt").read_text().split("\n\n")) - {"A comment."}
    calib_paragraphs = set((folder / "calib.txt").read_text().split("\n\n")) - {"A comment."}
    assert eval_paragraphs and calib_paragraphs and not eval_paragraphs & calib_paragraphs

    # A complete build is reused as is; a missing marker means "incomplete" and triggers a rebuild.
    stamp = (folder / "build_info.json").stat().st_mtime_ns
    assert builder.build_demo_model(tmp_path / "a", **kwargs) == folder
    assert (folder / "build_info.json").stat().st_mtime_ns == stamp
    (folder / "build_info.json").unlink()
    assert not builder.is_complete(folder)

    # Same seed, same data order and initialization: identical weights.
    again = builder.build_demo_model(tmp_path / "b", **kwargs)
    reloaded = AutoModelForCausalLM.from_pretrained(again)
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_build_refuses_to_replace_a_folder_that_is_not_a_build(builder, tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="holds no demo-model build"):
        builder.build_demo_model(tmp_path, steps=1, stdlib=tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "keep me"
