r"""The mistakes a new user makes in the first hour, each answered at once: the message names the path or the option,
no network connection is tried, no model's weights load, and nothing is written."""

import json
import socket
import time

import pytest

import hfprune.commands.common
import hfprune.commands.prune
from hfprune.commands import main


DEMO = "examples/demo-model"


@pytest.fixture
def offline(monkeypatch):
    r"""Any attempt to reach a host fails the test loudly (DNS lookups included)."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"a network connection was tried: {args[:2]}")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture
def no_weights(monkeypatch):
    r"""Loading a model's weights fails the test: every check must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model's weights were loaded before the mistake was found")

    monkeypatch.setattr(hfprune.commands.common, "load_model", refuse)
    monkeypatch.setattr(hfprune.commands.prune, "load_model", refuse)


@pytest.fixture
def repo(monkeypatch):
    r"""Run from the repository root, where the README's relative paths point."""
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parents[2])


def run(capsys, *argv):
    start = time.perf_counter()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err, time.perf_counter() - start


def test_a_mistyped_model_folder_is_named_with_the_nearest_one(capsys, tmp_path, offline, no_weights, repo):
    code, _, err, seconds = run(
        capsys, "prune", "examples/demo-modle", "--method", "magnitude", "--output", tmp_path / "out"
    )
    assert code == 2
    assert "examples/demo-modle: no such model folder" in err and "Did you mean 'examples/demo-model'?" in err
    assert "internet" not in err and "Traceback" not in err and "Hub" not in err
    assert seconds < 5 and not (tmp_path / "out").exists()


def test_a_missing_calibration_file_is_named_with_its_option(capsys, tmp_path, offline, no_weights, repo):
    code, _, err, seconds = run(
        capsys, "prune", DEMO, "--method", "sparsegpt", "--calibration", "calib.txt", "--output", tmp_path / "out"
    )
    assert code == 2
    assert "--calibration calib.txt: no such text file or dataset folder ('calib.txt' does not exist)" in err
    assert "Retry" not in err and "internet" not in err
    assert seconds < 5 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("option", ["--eval", "--calibration"])
def test_a_missing_file_in_a_folder_is_named(capsys, tmp_path, offline, no_weights, repo, option):
    missing = f"{DEMO}/evall.txt"
    argv = ["prune", DEMO, "--method", "sparsegpt", "--output", tmp_path / "out", option, missing]
    if option == "--eval":
        argv += ["--calibration", f"{DEMO}/calib.txt"]
    code, _, err, _ = run(capsys, *argv)
    assert code == 2 and f"{option} {missing}: no such text file" in err and "eval.txt" in err  # the nearest name


def test_a_hub_name_while_the_hub_is_switched_off_is_refused_at_once(capsys, tmp_path, offline, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err, seconds = run(capsys, "prune", "someone/some-model", "--method", "magnitude", "--output", tmp_path)
    assert code == 2 and "someone/some-model" in err and "HF_HUB_OFFLINE=1" in err
    assert seconds < 5


def test_eval_takes_tasks_as_the_readme_writes_them(capsys, offline, no_weights, repo, monkeypatch):
    import hfprune.analysis.lm_eval

    monkeypatch.setattr(hfprune.analysis.lm_eval, "hub_reachable", lambda timeout=3.0: False)  # no network here
    code, out, err, seconds = run(capsys, "eval", DEMO, "--tasks", "arc_easy", "hellaswag", "--json")
    assert code == 2
    assert "task(s) arc_easy, hellaswag read their data from the Hugging Face Hub, which cannot be reached" in err
    assert "--include-path" in err and json.loads(out)["error"].startswith("lm-evaluation-harness task(s)")
    assert seconds < 5


def test_a_structure_the_config_refuses_is_refused_before_the_weights_or_the_evaluation(
    capsys, tmp_path, offline, no_weights, repo
):
    code, _, err, _ = run(
        capsys, "prune", DEMO, "--structure", "mlp=0.5,heads=0.25,blocks=1", "--method", "sparsegpt",
        "--calibration", f"{DEMO}/calib.txt", "--eval", f"{DEMO}/eval.txt", "--output", tmp_path / "out",
    )  # fmt: skip
    assert code == 2
    assert "`heads`=0.25 removes 1 of 4 heads" in err and "Head fractions that work: 0.5, 0.75" in err


def test_a_sparsity_beside_a_structure_is_refused(capsys, tmp_path, offline, no_weights, repo):
    code, _, err, _ = run(
        capsys, "prune", DEMO, "--sparsity", "0.5", "--structure", "mlp=0.5", "--method", "magnitude",
        "--output", tmp_path / "out",
    )  # fmt: skip
    assert code == 2 and "`sparsity`='0.5' and `structure`=" in err and "drop --sparsity" in err


@pytest.mark.parametrize("option", [["--format", "compact"], ["--push-to-hub", "me/x"]])
def test_sparse_checkpoint_options_beside_a_structure_are_refused(capsys, tmp_path, offline, no_weights, repo, option):
    code, _, err, _ = run(
        capsys, "prune", DEMO, "--structure", "mlp=0.5", "--method", "magnitude", *option, "--output", tmp_path
    )
    assert code == 2 and f"{option[0]}" in err and "--structure writes a smaller dense model" in err


def test_too_little_calibration_text_is_refused_before_the_weights(capsys, tmp_path, offline, no_weights, repo):
    code, _, err, _ = run(
        capsys, "prune", DEMO, "--method", "wanda", "--calibration", f"{DEMO}/calib.txt", "--num-samples", 100000,
        "--output", tmp_path / "out",
    )  # fmt: skip
    assert code == 2 and "100000 were requested" in err and "--num-samples" in err


def test_help_names_every_command_every_method_and_the_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    top = capsys.readouterr().out
    for command in ("prune", "eval", "verify", "report", "compare", "sensitivity"):
        assert command in top
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "[`" not in out and "taylor" in out and "admm" in out
    assert "(default: 128)" in out and "(default: 0.01)" in out and "{uniform,owl}" in out
