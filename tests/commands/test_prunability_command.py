r"""`hfprune prunability`: a small sweep end to end, the summary and JSON it prints, and its mistakes answered at once
with the option's name, before any cell is measured."""

import json
import os

import pytest
import torch

import hfprune.analysis.prunability as prunability_module
from hfprune.commands import build_parser, main


FAST = ["--recovery-steps", "2", "--recovery-batch-size", "2", "--seq-len", "32", "--num-samples", "4"]
FAST += ["--eval-windows", "4", "--cka-tokens", "64", "--recovery-lr", "1e-2", "--device", "cpu"]


@pytest.fixture
def folders(tmp_path, tiny_model, char_tokenizer):
    r"""Two tiny Llamas (the "temperatures"), a calibration text and an evaluation text."""
    generator = torch.Generator().manual_seed(4)
    vocabulary = ["a", "sparse", "model", "trains", "with", "its", "mask", "fixed"]
    for name, count in (("calib.txt", 700), ("eval.txt", 300)):
        picks = torch.randint(0, len(vocabulary), (count,), generator=generator).tolist()
        (tmp_path / name).write_text(" ".join(vocabulary[i] for i in picks))
    for index in range(2):
        torch.manual_seed(index)
        tiny_model("llama").save_pretrained(tmp_path / f"m{index}")
        char_tokenizer.save_pretrained(tmp_path / f"m{index}")
    return tmp_path


def sweep_args(folders, *extra, temperatures=("0.01", "0.001"), loads=("0.5",), data=None):
    argv = ["prunability", "--models", str(folders / "m0"), str(folders / "m1"), "--temperatures", *temperatures]
    argv += [
        "--loads",
        *loads,
        "--calibration",
        str(folders / "calib.txt"),
        "--data",
        data or str(folders / "eval.txt"),
    ]
    return argv + ["--output", str(folders / "sweep"), *FAST, *extra]


def test_the_command_runs_a_sweep_and_prints_its_result(folders, capsys):
    assert main(sweep_args(folders, "--json", "--quiet")) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((folders / "sweep" / "results.json").read_text())
    # the file names its files relative to its folder; the printed JSON gives where they are
    assert saved["files"] == {k: os.path.relpath(v, folders / "sweep") for k, v in printed["files"].items()}
    assert printed["files"]["json"] == str(folders / "sweep" / "results.json")
    assert printed == {**saved, "files": printed["files"]}
    assert [(c["temperature"], c["load"]) for c in printed["cells"]] == [(0.001, "0.5"), (0.01, "0.5")]
    assert printed["knob"] == "lr" and printed["config"]["recovery_steps"] == 2
    assert printed["ranking"]["load"] == "0.5" and len(printed["ranking"]["checkpoints"]) == 2
    written = {"sweep.json", "cells", "results.json", "prunability.md", "phase_diagram.png"}
    assert set(os.listdir(folders / "sweep")) == written

    # again, without --json: every cell comes from the cache, and the summary names the regimes and the ranking
    assert main(sweep_args(folders, "--quiet", "--no-plots")) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "regimes (lr across, load down):" and lines[1].split() == ["load", "0.001", "0.01"]
    assert lines[2].split() == ["0.5", *printed["regimes"]["0.5"]]
    best = printed["best_temperatures"]["0.5"]
    assert f"best lr per load: 0.5: {best:g}" in out and "checkpoints at load 0.5, best first:" in out


def test_the_help_says_the_sweep_is_expensive(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["prunability", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "EXPENSIVE by nature" in text and "run the same command again to resume" in text


@pytest.fixture
def no_work(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a cell was measured before the mistake was found")

    monkeypatch.setattr(prunability_module, "measure_cell", refuse)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"temperatures": ["0.01"]}, "--models lists 2 folders but --temperatures 1 values"),
        ({"extra": ["--recovery-lr", "0"]}, "`recovery_learning_rate` (--recovery-lr) must be > 0, got 0.0."),
        ({"loads": ["0.5", "mlp=0.5"]}, "`loads` (--loads) mixes sparsities and structures"),
        ({"extra": ["--target-load", "0.7"]}, "`target_load` (--target-load)='0.7' is not among `loads` (0.5)"),
        ({"data": "missing.txt"}, "--data missing.txt: no such text file or dataset folder"),
    ],
)
def test_a_mistake_is_one_line_naming_the_option(folders, capsys, no_work, change, message):
    change = dict(change)
    extra = change.pop("extra", [])
    assert main(sweep_args(folders, *extra, **change)) == 2
    err = capsys.readouterr().err
    assert err.startswith("hfprune prunability: error: ") and message in err and "Traceback" not in err
    assert not (folders / "sweep").exists()


def test_a_folder_of_checkpoints_and_a_folder_of_other_settings(folders, capsys, no_work):
    run = folders / "run"
    run.mkdir()
    os.rename(folders / "m0", run / "checkpoint-5")
    os.rename(folders / "m1", run / "checkpoint-20")
    argv = ["prunability", "--checkpoints-folder", str(run), "--temperatures", "1", "2", "--loads", "0.5"]
    argv += ["--data", str(folders / "eval.txt"), "--output", str(folders / "sweep")]
    assert main(argv) == 2
    assert "--temperatures goes with --models" in capsys.readouterr().err

    sweep = folders / "sweep"
    sweep.mkdir()
    (sweep / "sweep.json").write_text(json.dumps({"fingerprint": "0" * 64, "settings": {"recovery_steps": 50}}))
    argv = ["prunability", "--checkpoints-folder", str(run), "--loads", "0.5", "--output", str(sweep)]
    argv += ["--calibration", str(folders / "calib.txt"), "--data", str(folders / "eval.txt"), *FAST]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert (
        'holds a sweep with other settings (method: null there, "wanda" here; recovery_steps: 50 there, 2 here;' in err
    )
    assert "the calibration, recovery, evaluation text differs); its 0 cells would mix with these." in err
    assert "Pass `overwrite=True` (CLI: --overwrite)" in err
