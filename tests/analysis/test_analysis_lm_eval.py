import json
import string

import pytest
import torch


TASK_YAML = """\
task: hfprune_tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
# Continuations of different lengths; the answer is the one the test's model is taught to prefer.
EXAMPLES = [
    {"question": "aaaa", "choices": ["b", "a"], "answer": 1},
    {"question": "aaa", "choices": ["a", "c"], "answer": 0},
    {"question": "aa", "choices": ["d", "e", "a"], "answer": 2},
    {"question": "aaaaa", "choices": ["a", "f"], "answer": 0},
]


@pytest.fixture
def eos_tokenizer():
    r"""Character-level, with `</s>` as EOS (the harness prefixes an empty context with BOS or EOS)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = ["<unk>", *string.ascii_letters, *string.digits, *string.punctuation, " ", "\n", "</s>"]
    backend = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")


@pytest.fixture
def local_task(tmp_path):
    data = tmp_path / "tiny_choice.json"
    data.write_text(json.dumps(EXAMPLES))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_choice.yaml").write_text(TASK_YAML.format(data=data, cache=tmp_path / "cache"))
    return str(tmp_path / "tasks")


def test_local_multiple_choice_task(tiny_model, eos_tokenizer, local_task, monkeypatch):
    pytest.importorskip("lm_eval")
    from hfprune.analysis import evaluate_tasks

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model = tiny_model("llama")
    # A model whose next token is "a" whatever the context: with the blocks' output projections zeroed the residual
    # stream is the embedding, every embedding is the constant vector 1/8 (RMS-normed to all ones), and only the
    # LM head row of "a" is nonzero: logit 100 * 64 / 8 = 800 for "a", 0 for every other token.
    a = eos_tokenizer.convert_tokens_to_ids("a")
    hidden = torch.full((64,), 1 / 8)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.copy_(hidden.expand_as(model.model.embed_tokens.weight))
        model.model.norm.weight.fill_(1.0)
        model.lm_head.weight.zero_()
        model.lm_head.weight[a] = 100.0 * hidden
    results = evaluate_tasks(
        model, eos_tokenizer, "hfprune_tiny_choice", include_path=local_task, include_defaults=False, batch_size=2
    )
    assert set(results) == {"hfprune_tiny_choice"}
    metrics = results["hfprune_tiny_choice"]
    assert metrics["acc"] == 1.0
    assert metrics["num_samples"] == len(EXAMPLES)
    # The preference turned the other way (logit -800 for "a"): every "a" choice loses, accuracy 0.
    with torch.no_grad():
        model.lm_head.weight[a] = -hidden * 100.0
    results = evaluate_tasks(
        model, eos_tokenizer, ["hfprune_tiny_choice"], include_path=local_task, include_defaults=False
    )
    assert results["hfprune_tiny_choice"]["acc"] == 0.0
    assert model.training is False


def test_unknown_task_and_missing_tokens(tiny_model, eos_tokenizer, char_tokenizer, local_task):
    pytest.importorskip("lm_eval")
    from hfprune.analysis import evaluate_tasks

    model = tiny_model("llama")
    with pytest.raises(ValueError, match="no_such_task"):
        evaluate_tasks(model, eos_tokenizer, "no_such_task", include_path=local_task, include_defaults=False)
    with pytest.raises(ValueError, match="BOS nor an EOS"):
        evaluate_tasks(model, char_tokenizer, "hfprune_tiny_choice", include_path=local_task, include_defaults=False)
    with pytest.raises(ValueError, match="empty"):
        evaluate_tasks(model, eos_tokenizer, " , ")


def test_missing_harness_names_the_extra(monkeypatch):
    from hfprune.analysis import lm_eval as module

    monkeypatch.setattr(module, "is_lm_eval_available", lambda: False)
    with pytest.raises(ImportError, match=r"pip install hfprune\[eval\]"):
        module.evaluate_tasks(None, None, ["arc_easy"])
