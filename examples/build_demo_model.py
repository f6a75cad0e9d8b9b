# /// script
# requires-python = ">=3.10"
# dependencies = ["hfprune"]
# ///
r"""Builds the offline demo model: a small Llama trained from scratch on the Python standard library's own text.

The repository ships the result in `examples/demo-model/` (built with Python 3.11, see its `build_info.json`), so
`examples/demo.py` and the recipes never need this script. It is here to show how the model was made, and to
rebuild it. Every Python install ships the text: the docstrings and comments of the standard library's `.py` files.
The build

1. walks the stdlib in sorted order and turns each module into one document (its docstrings and comment blocks in
   source order); a stable hash of the module path sends 5% of the modules to evaluation, 10% to calibration, and
   the rest to training,
2. trains a byte-level BPE tokenizer on the training documents and saves it as a `PreTrainedTokenizerFast`,
3. trains a `LlamaForCausalLM` (float32) with AdamW and a cosine schedule for a fixed number of steps on seeded
   random windows of all the training text (2 CPU threads: 8 to 13 minutes on 2 cores),
4. saves the model (float32 safetensors), the tokenizer, small excerpts of whole documents from each split
   (`calib.txt`, `eval.txt` and `train.txt`, at most 300 kB each: the text that the demo and the recipes read), the
   Python license that covers the text, a `README.md`, and last `build_info.json` (the completeness marker, with the
   perplexity on `eval.txt`).

Same Python version + same seed + same thread count = same documents, same tokenizer, same data order, same
weights. Another Python version ships other docstrings, so a rebuild there gives other text, other weights and other
numbers than the shipped folder. Run again and it returns at once.

    python examples/build_demo_model.py [--output-dir .cache/demo-model] [--steps 400] [--force]
    python examples/build_demo_model.py --output-dir examples/demo-model --force   # replace the shipped model
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import math
import os
import shutil
import sys
import sysconfig
import textwrap
import time
import tokenize
import zlib
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parent.parent
SHIPPED_DIR = REPO_ROOT / "examples" / "demo-model"  # the build that the repository ships
DEFAULT_OUTPUT_DIR = REPO_ROOT / ".cache" / "demo-model"  # a rebuild goes here unless told otherwise
MARKER = "build_info.json"
BUILD_VERSION = 2  # bump when the recipe below changes, so old caches are rebuilt
EOS = "<|endoftext|>"
SKIP_DIRS = {"__pycache__", "site-packages", "dist-packages", "test", "tests", "idle_test"}

# 0.85 M parameters in the 4 blocks + a 0.26 M embedding tied to lm_head; 400 steps x 16 x 256 = 1.6 M tokens.
MODEL_CONFIG = {
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 256,
    "tie_word_embeddings": True,
}
VOCAB_SIZE = 2048
# UTF-8 bytes of whole documents written per split. With Python 3.11 the calibration and evaluation splits fit whole
# (about 280 and 250 kB); 250 kB of docstrings is about 70 k tokens, well over the demo's 128 calibration windows of
# 256 tokens (33 k). `train.txt` is an excerpt of the 3.1 MB training text, for the recipes' continued training.
TEXT_BYTES = {"calib": 300_000, "eval": 300_000, "train": 300_000}


def stdlib_root() -> Path:
    r"""The standard library folder of the running Python (also right inside a virtual environment)."""
    return Path(sysconfig.get_paths()["stdlib"])


def module_text(source: bytes) -> str:
    r"""A module's docstrings and comment blocks, in source order, separated by blank lines."""
    tree = ast.parse(source)
    pieces: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and node.body:
                pieces.append((node.body[0].lineno, doc.strip()))
    block: list[str] = []
    block_start = last_line = -2
    for token in tokenize.tokenize(io.BytesIO(source).readline):
        if token.type != tokenize.COMMENT:
            continue
        text = token.string.lstrip("#!").strip()
        if not any(c.isalpha() for c in text):
            continue
        if token.start[0] != last_line + 1 and block:
            pieces.append((block_start, " ".join(block)))
            block = []
        if not block:
            block_start = token.start[0]
        block.append(text)
        last_line = token.start[0]
    if block:
        pieces.append((block_start, " ".join(block)))
    return "\n\n".join(text for _, text in sorted(pieces, key=lambda p: p[0]))


def collect_documents(root: str | os.PathLike | None = None) -> list[tuple[str, str]]:
    r"""`(relative path, text)` for every parsable `.py` file under `root` (default: the stdlib), sorted by path."""
    root = Path(root) if root is not None else stdlib_root()
    documents = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for filename in sorted(filenames):
            if not filename.endswith(".py"):
                continue
            path = Path(dirpath) / filename
            try:
                text = module_text(path.read_bytes())
            except (SyntaxError, ValueError, UnicodeDecodeError, tokenize.TokenError):
                continue  # a few files are deliberately invalid (e.g. test data in Python 2 syntax)
            if text:
                documents.append((path.relative_to(root).as_posix(), text))
    return sorted(documents)


def split_of(name: str) -> str:
    r"""`"eval"` for 5% of module paths, `"calib"` for 10%, else `"train"`; stable across runs and machines."""
    bucket = zlib.crc32(name.encode("utf-8")) % 100
    return "eval" if bucket < 5 else "calib" if bucket < 15 else "train"


def split_documents(documents: list[tuple[str, str]]) -> dict[str, list[str]]:
    splits: dict[str, list[str]] = {"train": [], "calib": [], "eval": []}
    for name, text in documents:
        splits[split_of(name)].append(text)
    return splits


def excerpt(documents: list[tuple[str, str]], max_bytes: int) -> str:
    r"""Whole documents of `(path, text)` that fit in `max_bytes` of UTF-8, joined by blank lines in path order.

    Documents are tried in the order of a stable hash of their path (a spread over the whole stdlib rather than its
    first folders); one that no longer fits is skipped and the next is tried.
    """
    chosen, used = [], 0
    for name, text in sorted(documents, key=lambda d: (zlib.crc32(b"excerpt:" + d[0].encode("utf-8")), d[0])):
        size = len(text.encode("utf-8")) + (2 if chosen else 0)  # 2 bytes: the "\n\n" before it
        if used + size <= max_bytes:
            chosen.append((name, text))
            used += size
    return "\n\n".join(text for _, text in sorted(chosen))


def train_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE):
    r"""A byte-level BPE tokenizer trained on `texts`, wrapped as a `PreTrainedTokenizerFast`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer, length=len(texts))
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOS,
        eos_token=EOS,
        unk_token=EOS,
        pad_token=EOS,
        model_max_length=MODEL_CONFIG["max_position_embeddings"],
    )


def train_model(ids, tokenizer, steps: int, batch_size: int, lr: float, seed: int, log_every: int = 50):
    r"""Trains a fresh Llama on seeded random windows of `ids` `(tokens,)`; returns the model in eval mode."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **MODEL_CONFIG,
    )
    model = LlamaForCausalLM(config)
    seq_len = config.max_position_embeddings
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))
    warmup = max(steps // 20, 1)

    def schedule(step: int) -> float:  # linear warmup, then cosine down to 10% of the peak
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(steps - warmup, 1)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    generator = torch.Generator().manual_seed(seed)  # the data order depends on the seed only
    offsets = torch.arange(seq_len)
    model.train()
    start, ema = time.perf_counter(), None
    for step in range(steps):
        starts = torch.randint(0, ids.numel() - seq_len, (batch_size,), generator=generator)
        batch = ids[starts[:, None] + offsets[None, :]]  # (batch, seq_len)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        value = loss.item()
        ema = value if ema is None else 0.95 * ema + 0.05 * value
        if (step + 1) % log_every == 0 or step + 1 == steps:
            rate = (step + 1) * batch_size * seq_len / (time.perf_counter() - start)
            print(f"  step {step + 1:>5}/{steps}  loss {ema:.3f}  {rate:,.0f} tokens/s", flush=True)
    return model.eval()


def portable_tokenizer_config(output_dir: str | os.PathLike) -> None:
    r"""Names the tokenizer class `PreTrainedTokenizerFast`, which transformers 4 and 5 both load from `tokenizer.json`.

    transformers 5 saves its own class name, `TokenizersBackend`, which transformers 4 does not know; version 5 reads
    `PreTrainedTokenizerFast` as the same class.
    """
    path = Path(output_dir) / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


GITATTRIBUTES = """\
# Byte-exact on every platform: the demo's numbers depend on these files, so no line-ending conversion.
* -text
"""


def model_card(info: dict) -> str:
    r"""The folder's `README.md`: what the model is, what each file holds, and how it was built."""
    c, size = MODEL_CONFIG, info["text_bytes"]
    eos = EOS.replace("|", "\\|")  # a `|` inside a table cell must be escaped, even in code
    intro = (
        f"A {info['parameters'] / 1e6:.2f} M-parameter Llama ({c['num_hidden_layers']} blocks, hidden size "
        f"{c['hidden_size']}, MLP {c['intermediate_size']}, {c['num_attention_heads']} heads, vocabulary {VOCAB_SIZE}, "
        f"{c['max_position_embeddings']} positions, embeddings tied to `lm_head`), trained from scratch in float32 for "
        f"{info['steps']} steps of {info['batch_size']} x 256 tokens on the docstrings and comments of the Python "
        f"{info['python']} standard library by `examples/build_demo_model.py`. It is here so that `examples/demo.py` "
        "and the recipes in `recipes/demo-model/` run offline, on CPU, in about a minute, with the same numbers on "
        "every machine; it is not meant for anything else."
    )
    rows = [
        (
            "`model.safetensors`, `config.json`, `generation_config.json`",
            "the model in float32; plain `AutoModelForCausalLM.from_pretrained` loads it",
        ),
        (
            "`tokenizer.json`, `tokenizer_config.json`",
            f"byte-level BPE, {VOCAB_SIZE} tokens, `{eos}` as BOS, EOS and padding",
        ),
        ("`calib.txt`", f"calibration text for one-shot pruning ({size['calib']:,} bytes of whole modules)"),
        (
            "`eval.txt`",
            f"held-out text ({size['eval']:,} bytes): perplexity {info['eval_perplexity']:.2f} (256-token windows)",
        ),
        ("`train.txt`", f"an excerpt of the training text ({size['train']:,} bytes), for the recipes' training"),
        ("`build_info.json`", "the build's settings and results; written last, it marks a complete build"),
        ("`LICENSE-PYTHON.txt`", "the license of the text, which comes from CPython's standard library"),
    ]
    table = ["| file | contents |", "| --- | --- |"] + [f"| {name} | {contents} |" for name, contents in rows]
    splits = (
        "The three text files hold whole modules from disjoint splits: a stable hash of the module path sends 5% of the "
        "modules to evaluation, 10% to calibration and the rest to training."
    )
    rebuild = (
        "Rebuild with `python examples/build_demo_model.py --output-dir examples/demo-model --force`. The same Python "
        "version, seed and thread count give the same files; another Python version ships other docstrings, so its "
        "text, weights and numbers all differ from these."
    )
    front = "---\nlibrary_name: transformers\ntags: [hfprune, demo]\n---"
    paragraphs = [front, "# hfprune demo model", textwrap.fill(intro, 119), "\n".join(table)]
    paragraphs += [textwrap.fill(splits, 119), textwrap.fill(rebuild, 119)]
    return "\n\n".join(paragraphs) + "\n"


def is_complete(output_dir: str | os.PathLike) -> bool:
    r"""Whether `output_dir` holds a finished build of the current recipe (the marker is written last)."""
    marker = Path(output_dir) / MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("build_version") == BUILD_VERSION
    except json.JSONDecodeError:
        return False


def build_demo_model(
    output_dir: str | os.PathLike = DEFAULT_OUTPUT_DIR,
    steps: int = 400,
    batch_size: int = 16,
    lr: float = 5e-3,
    seed: int = 0,
    force: bool = False,
    stdlib: str | os.PathLike | None = None,
    vocab_size: int = VOCAB_SIZE,
    threads: int = 2,
) -> Path:
    r"""Builds the demo model into `output_dir` unless a complete build is already there; returns the folder.

    Args:
        output_dir (`str` or `os.PathLike`, *optional*, defaults to `.cache/demo-model` in the repository):
            Where the model, tokenizer, `calib.txt`, `eval.txt`, `train.txt` and `build_info.json` go (the layout
            of the shipped `examples/demo-model`).
        steps (`int`, *optional*, defaults to 400): optimizer steps.
        batch_size (`int`, *optional*, defaults to 16): windows of 256 tokens per step.
        lr (`float`, *optional*, defaults to 5e-3): peak learning rate.
        seed (`int`, *optional*, defaults to 0): seeds the initialization and the data order.
        force (`bool`, *optional*, defaults to `False`): rebuild even when a complete build exists.
        stdlib (*optional*): the folder to read instead of the running Python's standard library.
        vocab_size (`int`, *optional*, defaults to 2048): BPE vocabulary size.
        threads (`int`, *optional*, defaults to 2): torch CPU threads (results are reproducible for a fixed count).
    """
    import torch

    from hfprune import perplexity
    from hfprune.calibration.data import tokenize_text

    output_dir = Path(output_dir)
    if is_complete(output_dir) and not force:
        return output_dir
    if output_dir.exists():  # an interrupted or outdated build: start again, but never delete unrelated files
        if any(output_dir.iterdir()) and not any((output_dir / f).exists() for f in (MARKER, "config.json")):
            raise FileExistsError(f"{output_dir} is not empty and holds no demo-model build; choose another folder.")
        shutil.rmtree(output_dir)
    torch.set_num_threads(threads)
    start = time.perf_counter()

    def log(message: str) -> None:
        print(f"[demo model {time.perf_counter() - start:4.0f} s] {message}", flush=True)

    log(f"1/4 reading the docstrings and comments under {stdlib or stdlib_root()}")
    documents = collect_documents(stdlib)
    splits = split_documents(documents)
    text = {name: "\n\n".join(docs) for name, docs in splits.items()}
    sizes = ", ".join(f"{name} {len(splits[name])} modules / {len(text[name]) / 1e6:.2f} MB" for name in splits)
    log(f"{len(documents)} modules: {sizes}")
    log(f"2/4 training a byte-level BPE tokenizer (vocab {vocab_size})")
    tokenizer = train_tokenizer(splits["train"], vocab_size)
    ids = tokenize_text(text["train"], tokenizer)  # (tokens,)
    log(f"{ids.numel():,} training tokens")
    log(f"3/4 training a Llama for {steps} steps of {batch_size} x 256 tokens")
    model = train_model(ids, tokenizer, steps=steps, batch_size=batch_size, lr=lr, seed=seed)

    log("4/4 evaluating and saving")
    excerpts = {
        name: excerpt([d for d in documents if split_of(d[0]) == name], max_bytes)
        for name, max_bytes in TEXT_BYTES.items()
    }
    eval_ppl = perplexity(model, tokenizer, [excerpts["eval"]], seq_len=256, progress=False)
    quick_ppl = perplexity(model, tokenizer, [excerpts["eval"]], seq_len=256, max_windows=16, progress=False)
    output_dir.mkdir(parents=True)
    model.save_pretrained(output_dir)  # float32, as trained
    tokenizer.save_pretrained(output_dir)
    portable_tokenizer_config(output_dir)
    for name, text_of_split in excerpts.items():
        (output_dir / f"{name}.txt").write_text(text_of_split, encoding="utf-8", newline="\n")
    python_license = (Path(stdlib) if stdlib is not None else stdlib_root()) / "LICENSE.txt"
    if python_license.is_file():  # the text is CPython's: its license travels with it
        shutil.copyfile(python_license, output_dir / "LICENSE-PYTHON.txt")
    (output_dir / ".gitattributes").write_text(GITATTRIBUTES)
    info = {
        "build_version": BUILD_VERSION,
        "python": sys.version.split()[0],
        "seed": seed,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "threads": threads,
        "modules": {name: len(docs) for name, docs in splits.items()},
        "text_bytes": {name: len(text_of_split.encode("utf-8")) for name, text_of_split in excerpts.items()},
        "train_tokens": ids.numel(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "eval_perplexity": round(eval_ppl, 3),
        "eval_perplexity_16_windows": round(quick_ppl, 3),  # a quick check that a machine loads the same model
        "seconds": round(time.perf_counter() - start, 1),
    }
    (output_dir / "README.md").write_text(model_card(info), encoding="utf-8")
    (output_dir / MARKER).write_text(json.dumps(info, indent=2) + "\n")
    log(f"done: held-out perplexity {eval_ppl:.2f} (vocab {len(tokenizer)}) in {output_dir}")
    return output_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default=str(DEFAULT_OUTPUT_DIR))
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--force", action="store_true", help="rebuild even if a complete build exists")
    args = parser.parse_args()
    folder = build_demo_model(
        args.output_dir, args.steps, args.batch_size, args.lr, args.seed, args.force, threads=args.threads
    )
    print(json.loads((folder / MARKER).read_text()))


if __name__ == "__main__":
    main()
