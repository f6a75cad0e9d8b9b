r"""The shipped demo model and the recipes that use it, and its builder (examples/build_demo_model.py): text
extraction, split, excerpts, tokenizer, and a tiny build."""

import importlib.util
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerFast

from hfprune import perplexity


REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
SHIPPED = EXAMPLES / "demo-model"
RECIPES = sorted(p for p in (REPO / "recipes").rglob("*.yaml") if "accelerate" not in p.parts)
# The one recipe that names a Hub model and a Hub dataset instead of files of the repository.
HUB_RECIPES = {
    "recipes/qwen2.5-0.5b/sparsegpt_finetune_2of4.yaml": {
        "model_name_or_path": "Qwen/Qwen2.5-0.5B",
        "train_file": "Salesforce/wikitext:wikitext-2-raw-v1",
        "eval_file": "Salesforce/wikitext:wikitext-2-raw-v1",
    }
}


def _load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def builder():
    return _load_example("build_demo_model")


@pytest.fixture(scope="module")
def training_example():
    return _load_example("sparse_training")


# --- the shipped model ----------------------------------------------------------------------------------------------
def test_shipped_model_loads_with_plain_from_pretrained_in_float32(builder):
    info = json.loads((SHIPPED / "build_info.json").read_text())
    assert builder.is_complete(SHIPPED) and info["build_version"] == builder.BUILD_VERSION
    model = AutoModelForCausalLM.from_pretrained(SHIPPED)  # no dtype: the stored one
    tokenizer = AutoTokenizer.from_pretrained(SHIPPED)
    assert type(model) is LlamaForCausalLM and model.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == info["parameters"]
    assert model.config.vocab_size == len(tokenizer) == builder.VOCAB_SIZE
    for key, value in builder.MODEL_CONFIG.items():
        assert getattr(model.config, key) == value, key
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied, stored once
    ids = tokenizer("Return the absolute value of the argument.")["input_ids"]
    assert tokenizer.decode(ids) == "Return the absolute value of the argument."


def test_shipped_folder_is_what_the_builder_writes(builder):
    info = json.loads((SHIPPED / "build_info.json").read_text())
    names = {p.name for p in SHIPPED.iterdir()}
    assert names == {
        ".gitattributes",
        "LICENSE-PYTHON.txt",
        "README.md",
        "build_info.json",
        "calib.txt",
        "config.json",
        "eval.txt",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "train.txt",
    }
    assert (SHIPPED / "README.md").read_text(encoding="utf-8") == builder.model_card(info)
    assert (SHIPPED / ".gitattributes").read_text() == builder.GITATTRIBUTES
    # transformers 4 does not know the class name that transformers 5 saves (`TokenizersBackend`).
    assert json.loads((SHIPPED / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert json.loads((SHIPPED / "config.json").read_text())["dtype"] == "float32"


def test_shipped_text_is_small_and_is_what_the_build_recorded(builder):
    info = json.loads((SHIPPED / "build_info.json").read_text())
    for name, max_bytes in builder.TEXT_BYTES.items():
        data = (SHIPPED / f"{name}.txt").read_bytes()
        assert len(data) == info["text_bytes"][name] <= max_bytes, name
        assert b"\r" not in data, name  # a checkout that rewrote line endings would change every number
    assert (SHIPPED / "model.safetensors").stat().st_size < 5_000_000


@pytest.mark.parametrize(
    "max_windows, key",
    [(16, "eval_perplexity_16_windows"), pytest.param(None, "eval_perplexity", marks=pytest.mark.slow)],
)
def test_shipped_model_scores_the_recorded_perplexity_on_the_shipped_eval_text(max_windows, key):
    info = json.loads((SHIPPED / "build_info.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(SHIPPED)
    tokenizer = AutoTokenizer.from_pretrained(SHIPPED)
    eval_file = str(SHIPPED / "eval.txt")
    ppl = perplexity(model, tokenizer, eval_file, seq_len=256, max_windows=max_windows, progress=False)
    assert ppl == pytest.approx(info[key], abs=2e-3)  # recorded to 3 decimals at build time
    assert ppl < 0.1 * model.config.vocab_size  # far better than uniform over the vocabulary


@pytest.mark.slow
def test_demo_prints_the_documented_table():
    # The numbers of the README; the shipped files alone decide them, whatever the machine or the thread count.
    expected = [
        "                  perplexity  vs dense  sparsity",
        "dense                  78.12     +0.0%      0.0%",
        "sparsegpt 2:4          79.26     +1.5%     50.0%",
        "magnitude 2:4          83.48     +6.9%     50.0%",
    ]
    for threads in ("1", "2"):
        out = subprocess.run(
            [sys.executable, str(EXAMPLES / "demo.py"), "--threads", threads],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()
        start = out.index(expected[0])
        assert out[start : start + 4] == expected, threads


# --- recipes --------------------------------------------------------------------------------------------------------
def test_every_recipe_names_files_of_the_repository_or_the_documented_hub_ids():
    assert len(RECIPES) >= 20
    assert {p.relative_to(REPO).as_posix() for p in RECIPES} >= set(HUB_RECIPES)
    for path in RECIPES:
        recipe = yaml.safe_load(path.read_text())
        name = path.relative_to(REPO).as_posix()
        assert recipe["output_dir"].startswith("outputs/"), name  # ignored by git
        if name in HUB_RECIPES:
            assert {key: recipe[key] for key in HUB_RECIPES[name]} == HUB_RECIPES[name]
            continue
        assert (REPO / recipe["model_name_or_path"] / "config.json").is_file(), name
        for key in ("train_file", "eval_file"):
            if recipe.get(key) is not None:
                assert (REPO / recipe[key]).is_file(), (name, key)


def test_every_demo_model_recipe_fits_the_shipped_model(training_example):
    from hfprune.training.gradient_flow import GradientFlow

    model = AutoModelForCausalLM.from_pretrained(SHIPPED)
    # the structured + distillation recipe runs with its own example (tests/training/test_distillation.py)
    demo_recipes = [p for p in RECIPES if p.parent.name == "demo-model" and "distill" not in p.name]
    assert len(demo_recipes) == 19
    for path in demo_recipes:
        model_args, pruning_config, distillation, args = training_example.parse_recipe([str(path)])
        assert model_args.teacher_model_name_or_path is None and distillation.distillation_temperature == 1.0, path
        assert (REPO / model_args.model_name_or_path).resolve() == SHIPPED.resolve(), path
        assert pruning_config.target.is_nm and args.max_steps > 0, path
        assert path.name.startswith(pruning_config.method or pruning_config.gradient_flow), path
        assert f"{pruning_config.target.n}of{pruning_config.target.m}" in path.name, path
        GradientFlow(model, pruning_config)  # every SDGF stage divides the input sizes 128 and 384


def test_command_line_options_override_the_recipe(training_example, tmp_path):
    recipe = REPO / "recipes" / "demo-model" / "ste_2of4.yaml"
    model_args, pruning_config, _, args = training_example.parse_recipe([str(recipe)])
    assert (model_args.model_name_or_path, pruning_config.sparsity, args.max_steps) == (
        "examples/demo-model",
        "2:4",
        150,
    )
    options = ["--model_name_or_path", "other", "--sparsity", "1:8", "--max_steps", "7", "--learning_rate", "3e-4"]
    model_args, pruning_config, _, args = training_example.parse_recipe([str(recipe), *options])
    assert (model_args.model_name_or_path, model_args.train_file) == ("other", "examples/demo-model/train.txt")
    assert (pruning_config.target.n, pruning_config.target.m, pruning_config.gradient_flow) == (1, 8, "ste")
    assert (args.max_steps, args.learning_rate, args.per_device_train_batch_size) == (7, 3e-4, 8)

    (tmp_path / "typo.yaml").write_text("model_name_or_path: x\ntrain_file: y\noutput_dir: z\nmax_step: 3\n")
    with pytest.raises(ValueError, match=r"\['max_step'\]"):
        training_example.parse_recipe([str(tmp_path / "typo.yaml")])
    with pytest.raises(SystemExit):
        training_example.parse_recipe(["--max_steps", "3"])


# --- the builder ----------------------------------------------------------------------------------------------------
def test_excerpt_keeps_whole_documents_within_the_budget_in_path_order(builder):
    documents = [(f"m{i}.py", f"doc {i} " + "x" * (10 * i)) for i in range(1, 9)]  # 16, 26, ..., 86 bytes
    everything = "\n\n".join(text for _, text in documents)
    assert builder.excerpt(documents, len(everything.encode())) == everything  # all fit: the whole split
    assert builder.excerpt(list(reversed(documents)), 10_000) == everything  # path order, whatever the input order
    assert builder.excerpt(documents, 15) == ""  # not even the smallest document fits

    for budget in (30, 60, 100, 200):
        text = builder.excerpt(documents, budget)
        assert len(text.encode()) <= budget
        kept = text.split("\n\n")
        assert all(doc in dict(documents).values() for doc in kept)  # whole documents only
        assert kept == sorted(kept, key=lambda doc: int(doc.split()[1]))  # in path order
        # Greedy: no document left out would still have fit.
        left = [t for _, t in documents if t not in kept]
        assert all(len(text.encode()) + 2 + len(t.encode()) > budget for t in left)

    # A document too large for what is left is skipped, and a later smaller one still fills the budget.
    big_first = [("a.py", "A" * 90), ("b.py", "B" * 8)]
    assert builder.excerpt(big_first, 50) == "B" * 8
    assert builder.excerpt([("é.py", "é" * 10)], 19) == ""  # the budget counts UTF-8 bytes (20), not characters


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
    for i in range(120):
        sentences = [" ".join(rng.choice(words) for _ in range(12)).capitalize() + "." for _ in range(15)]
        (root / f"module_{i:03d}.py").write_text('"""' + " ".join(sentences) + '"""\n# A comment.\n')
    return root


def test_tiny_build_is_complete_loadable_reused_and_deterministic(builder, tmp_path):
    stdlib = _fake_stdlib(tmp_path / "stdlib")
    kwargs = {"steps": 3, "batch_size": 2, "seed": 0, "stdlib": stdlib, "vocab_size": 300, "threads": 1}
    folder = builder.build_demo_model(tmp_path / "a", **kwargs)
    assert builder.is_complete(folder)
    info = json.loads((folder / "build_info.json").read_text())
    assert info["steps"] == 3 and info["modules"]["train"] + info["modules"]["calib"] + info["modules"]["eval"] == 120
    assert info["modules"]["eval"] > 0 and info["modules"]["calib"] > 0
    assert 1 < info["eval_perplexity"] < 300 * 1.5  # three steps barely move it from uniform over 300 tokens
    assert 1 < info["eval_perplexity_16_windows"] < 300 * 1.5

    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.config.vocab_size == len(tokenizer) == 300
    assert model.config.max_position_embeddings == 256
    assert json.loads((folder / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (folder / "README.md").read_text(encoding="utf-8") == builder.model_card(info)
    assert f"perplexity {info['eval_perplexity']:.2f}" in builder.model_card(info)
    assert (folder / ".gitattributes").is_file() and not (folder / "LICENSE-PYTHON.txt").exists()  # no LICENSE.txt
    assert info["text_bytes"] == {
        name: len((folder / f"{name}.txt").read_bytes()) for name in ("calib", "eval", "train")
    }
    assert 0 < info["text_bytes"]["train"] <= builder.TEXT_BYTES["train"]
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
