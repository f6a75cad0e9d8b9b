import copy
import json
import os

import pytest

from hfprune import PruningConfig, prune, save_pruned
from hfprune.commands import build_parser
from hfprune.commands.common import CommandError


def parse(argv):
    return build_parser().parse_args(argv)


@pytest.fixture
def folders(tmp_path, tiny_model, char_tokenizer, calibration_text):
    dense = tiny_model("llama")
    dense.save_pretrained(tmp_path / "dense")
    char_tokenizer.save_pretrained(tmp_path / "dense")
    pruned = copy.deepcopy(dense)
    config = PruningConfig(method="magnitude", sparsity="2:4")
    report = prune(pruned, config, progress=False, return_masks=True)
    save_pruned(pruned, tmp_path / "pruned", config, report, char_tokenizer, format="compact")
    (tmp_path / "eval.txt").write_text("\n\n".join(calibration_text))
    return tmp_path


def test_compare_command_writes_the_report_and_json(folders, capsys):
    pytest.importorskip("matplotlib")
    out = folders / "report"
    args = parse(
        [
            "compare",
            str(folders / "dense"),
            str(folders / "pruned"),
            "--data",
            str(folders / "eval.txt"),
            "--output",
            str(out),
            "--seq-len",
            "32",
            "--max-windows",
            "8",
            "--device",
            "cpu",
            "--json",
            "--quiet",
        ]
    )
    assert args.func(args) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((out / "report.json").read_text())
    # the file names its files relative to its folder; the printed JSON gives where they are
    assert saved["files"] == {k: os.path.relpath(v, out) for k, v in printed["files"].items()}
    assert printed["files"]["markdown"] == str(out / "report.md")
    assert [m["files"] for m in saved["models"]] == [saved["files"]]
    assert printed == {**saved, "files": printed["files"], "models": printed["models"]}
    assert printed["models"] == [{**m, "files": printed["files"]} for m in saved["models"]]
    assert printed["num_windows"] == 8 and printed["seq_len"] == 32
    assert {p.name for p in out.iterdir()} == {
        "report.md",
        "report.json",
        "layers.png",
        "blocks.png",
        "loss_increase.png",
        "geometry.png",
    }
    layers = {layer["name"]: layer for layer in printed["layers"]}
    # The compact folder was loaded with its record: patterns of the pruned modules, lm_head untouched.
    assert layers["model.layers.0.mlp.down_proj"]["pattern"] == "2:4"
    assert layers["model.layers.0.mlp.down_proj"]["sparsity"] == 0.5
    assert layers["lm_head"]["pattern"] is None and layers["lm_head"]["sparsity"] == 0.0
    assert printed["pruned_perplexity"] != printed["dense_perplexity"]


def test_compare_command_with_several_models_and_corruptions(folders, capsys, tiny_model, char_tokenizer):
    # A second pruned model, in a folder with the same last name as the first one.
    dense = tiny_model("llama")
    config = PruningConfig(method="magnitude", sparsity="0.7")
    report = prune(dense, config, progress=False)
    save_pruned(dense, folders / "other" / "pruned", config, report, char_tokenizer)
    common = ["--data", str(folders / "eval.txt"), "--seq-len", "32", "--max-windows", "6", "--device", "cpu"]
    args = parse(
        ["compare", str(folders / "dense"), str(folders / "pruned"), str(folders / "other" / "pruned"), *common]
        + ["--corruptions", "all", "--severity", "0.2", "--no-plots", "--json", "--quiet"]
    )
    assert args.func(args) == 0
    printed = json.loads(capsys.readouterr().out)
    names = [str(folders / "pruned"), str(folders / "other" / "pruned")]  # same folder name: whole paths
    assert [m["name"] for m in printed["models"]] == names
    assert "pruned_perplexity" not in printed  # several models: per-model numbers only under "models"
    assert [c["name"] for c in printed["models"][1]["corruptions"]] == [
        "char_swap",
        "char_drop",
        "case_change",
        "token_dropout",
    ]
    assert printed["models"][1]["corruptions"][0]["severity"] == 0.2
    assert printed["similarity"]["names"] == names
    assert printed["token_dropout_fill_id"] == char_tokenizer.unk_token_id
    # --names, and the text summary names every model.
    args = parse(
        ["compare", str(folders / "dense"), str(folders / "pruned"), str(folders / "other" / "pruned"), *common]
        + ["--names", "2:4", "70%", "--output", str(folders / "several"), "--no-plots"]
    )
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "2:4: perplexity" in text and "70%: perplexity" in text and "fragile tokens" in text
    markdown = (folders / "several" / "report.md").read_text()
    assert "# Dense vs 2 pruned models" in markdown and "| 70% | " in markdown


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--names", "a"], "--names gives 1 names for 2 pruned models"),
        (["--names", "2:4", "2:4"], "distinct names"),
        ([], "distinct names"),  # the same folder twice, no --names
        (["--names", "a", "dense"], "not 'dense'"),
        (["--names", "a", "b", "--corruptions", "char_swap", "--severity", "0"], "--severity 0.0 must be in"),
        (["--names", "a", "b", "--damage-threshold", "-1"], "--damage-threshold -1.0 must be > 0"),
        (["--names", "a", "b", "--severity", "0.2"], "--severity only apply with --corruptions"),
        (["--names", "a", "b", "--max-windows", "0"], "--max-windows 0 must be at least 1"),
    ],
)
def test_compare_command_refuses_bad_options_before_loading(folders, extra, message, monkeypatch):
    from hfprune.commands import compare as command

    def fail(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(command, "load_model", fail)
    argv = ["compare", str(folders / "dense"), str(folders / "pruned"), str(folders / "pruned")]
    args = parse([*argv, "--data", str(folders / "eval.txt"), "--json", *extra])
    with pytest.raises(CommandError, match=message):
        args.func(args)


def test_compare_command_needs_an_output(folders):
    args = parse(["compare", str(folders / "dense"), str(folders / "pruned"), "--data", str(folders / "eval.txt")])
    with pytest.raises(CommandError, match="--output"):
        args.func(args)


def test_sensitivity_command(folders, capsys):
    args = parse(
        [
            "sensitivity",
            str(folders / "dense"),
            "--method",
            "magnitude",
            "--sparsity",
            "0.8",
            "--by",
            "module_kind",
            "--data",
            str(folders / "eval.txt"),
            "--seq-len",
            "32",
            "--device",
            "cpu",
            "--no-plots",
            "--output",
            str(folders / "sens"),
            "--quiet",
        ]
    )
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "dense perplexity" in printed and "mlp.down_proj" in printed
    saved = json.loads((folders / "sens" / "sensitivity.json").read_text())
    assert [g["name"] for g in saved["groups"]][:2] == ["self_attn.q_proj", "self_attn.k_proj"]
    assert all(len(g["modules"]) == 2 for g in saved["groups"])
    assert sorted(p.name for p in (folders / "sens").iterdir()) == ["sensitivity.json", "sensitivity.md"]


@pytest.mark.slow  # indexes every built-in lm-evaluation-harness task (about 15 s)
def test_eval_tasks_command(folders, capsys, tmp_path):
    pytest.importorskip("lm_eval")
    # A tokenizer with an EOS token, and a two-question local task.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folders / "dense")
    tokenizer.add_special_tokens({"eos_token": "</s>"})
    tokenizer.save_pretrained(folders / "dense")
    data = tmp_path / "qa.json"
    data.write_text(json.dumps([{"q": "ab", "c": ["a", "b"], "t": 0}, {"q": "ba", "c": ["a", "b"], "t": 1}]))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "qa.yaml").write_text(
        "task: hfprune_cli_qa\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\n  cache_dir: {tmp_path / 'cache'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{q}}"\ndoc_to_choice: "{{c}}"\ndoc_to_target: "{{t}}"\n'
        "metric_list:\n  - metric: acc\n"
    )
    args = parse(
        ["eval", str(folders / "dense"), "--tasks", "hfprune_cli_qa", "--include-path", str(tmp_path / "tasks")]
        + ["--data", str(folders / "eval.txt"), "--seq-len", "32", "--device", "cpu", "--json", "--quiet"]
    )
    assert args.func(args) == 0
    printed = json.loads(capsys.readouterr().out)
    # The same numbers as the library calls on the same model.
    from hfprune import perplexity
    from hfprune.analysis import evaluate_tasks
    from hfprune.commands.common import load_model

    model, tokenizer = load_model(str(folders / "dense"), device="cpu")
    expected = evaluate_tasks(
        model, tokenizer, ["hfprune_cli_qa"], include_path=str(tmp_path / "tasks"), include_defaults=False
    )
    assert printed["tasks"] == expected
    assert printed["tasks"]["hfprune_cli_qa"]["num_samples"] == 2
    assert printed["perplexity"] == pytest.approx(
        perplexity(model, tokenizer, str(folders / "eval.txt"), seq_len=32, progress=False), rel=1e-6
    )
