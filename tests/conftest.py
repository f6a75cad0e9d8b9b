r"""Shared fixtures: tiny causal LMs built from configs (offline), a character-level tokenizer, calibration ids."""

import string

import pytest
import torch


# Tests run under pytest-xdist on small machines: one intra-op thread per worker is faster than oversubscribing.
torch.set_num_threads(1)

VOCAB_SIZE = 128
MAX_POSITIONS = 64

# Every architecture: hidden 64, 4 heads, 2 decoder blocks, vocab 128, 64 positions. Input sizes of the prunable
# modules are 64, 128 or 256, so 2:4 and 4:8 divide all of them.
TINY_CONFIGS = {
    "llama": (
        "LlamaConfig",
        {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2},
    ),
    "qwen2": (
        "Qwen2Config",
        {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2},
    ),
    "mistral": (
        "MistralConfig",
        {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2},
    ),
    "opt": ("OPTConfig", {"hidden_size": 64, "ffn_dim": 128, "num_attention_heads": 4, "word_embed_proj_dim": 64}),
    "gpt2": (
        "GPT2Config",
        {"n_embd": 64, "n_head": 4, "n_layer": 2, "n_positions": MAX_POSITIONS, "bos_token_id": 0, "eos_token_id": 0},
    ),
    "gpt_neox": ("GPTNeoXConfig", {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4}),
    "phi": ("PhiConfig", {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4}),
    "gemma": (
        "GemmaConfig",
        {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
        },
    ),
    "falcon": ("FalconConfig", {"hidden_size": 64, "num_attention_heads": 4}),  # MLP 4 x hidden = 256
}
ARCHITECTURES = tuple(TINY_CONFIGS)


def build_tiny_model(arch: str = "llama", **overrides):
    r"""A randomly initialised `AutoModelForCausalLM` of `arch` (a key of `TINY_CONFIGS`), in eval mode."""
    import transformers

    class_name, kwargs = TINY_CONFIGS[arch]
    config_class = getattr(transformers, class_name, None)
    if config_class is None:
        pytest.skip(f"transformers {transformers.__version__} has no {class_name}")
    kwargs = {"vocab_size": VOCAB_SIZE, **kwargs, **overrides}
    if arch != "gpt2":
        kwargs.setdefault("num_hidden_layers", 2)
        kwargs.setdefault("max_position_embeddings", MAX_POSITIONS)
    try:
        model = transformers.AutoModelForCausalLM.from_config(config_class(**kwargs))
    except (ImportError, NotImplementedError) as e:  # an optional kernel package this architecture requires
        pytest.skip(f"cannot build a tiny {arch} offline: {e}")
    return model.eval()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _no_deepspeed_config_left():
    r"""`TrainingArguments(deepspeed=...)` registers a process-wide DeepSpeed config (even when it then fails because
    DeepSpeed is not installed); a model built later in the same worker would read it. Drop it after every test."""
    yield
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


@pytest.fixture
def tiny_model():
    r"""Factory: `tiny_model("opt", num_hidden_layers=3)` builds a fresh tiny model (seeded by `_seed`)."""
    return build_tiny_model


@pytest.fixture(params=ARCHITECTURES)
def arch(request) -> str:
    return request.param


@pytest.fixture
def calibration_ids() -> torch.Tensor:
    r"""8 sequences of 32 random token ids, `(8, 32)`."""
    return torch.randint(0, VOCAB_SIZE, (8, 32), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def char_tokenizer():
    r"""A character-level `PreTrainedTokenizerFast` built in memory: 97 ids, `<unk>` = 0 for anything else."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = ["<unk>"] + list(string.ascii_letters + string.digits + string.punctuation + " \n")
    backend = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one token per character
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


@pytest.fixture
def calibration_text() -> list[str]:
    r"""A few short documents (about 1,300 characters in all once joined with blank lines)."""
    words = ("the", "pruned", "model", "keeps", "two", "of", "every", "four", "weights", "along", "each", "row")
    generator = torch.Generator().manual_seed(2)
    docs = []
    for _ in range(6):
        picks = torch.randint(0, len(words), (40,), generator=generator).tolist()
        docs.append(" ".join(words[i] for i in picks) + ".")
    return docs
