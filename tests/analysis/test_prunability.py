r"""The prunability sweep: one cell against a plain reference, the fixed-mask fine-tunings, the cache (resume, a
killed sweep, extension, refusal), the reading into regimes, and every bad input refused before any work."""

import json
import math
import os
import string

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import hfprune.analysis.prunability as prunability_module
import hfprune.analysis.prunability_cell as cell_module
from hfprune import perplexity
from hfprune.analysis import (
    PrunabilityCell,
    PrunabilityConfig,
    PrunabilityResult,
    checkpoints_from_folder,
    is_matplotlib_available,
    prunability_sweep,
)
from hfprune.analysis.prunability_cell import CellJob, fine_tune, measure_cell
from hfprune.analysis.prunability_inputs import SweepData, all_windows


SEQ_LEN = 32
FAST = {
    "recovery_steps": 2,
    "recovery_batch_size": 2,
    "recovery_learning_rate": 1e-2,
    "seq_len": SEQ_LEN,
    "num_calibration_samples": 4,
    "eval_windows": 4,
    "cka_tokens": 64,
}


def words(count: int, seed: int) -> str:
    vocabulary = ["the", "pruned", "model", "keeps", "two", "of", "every", "four", "weights", "along", "each", "row"]
    picks = torch.randint(0, len(vocabulary), (count,), generator=torch.Generator().manual_seed(seed)).tolist()
    return " ".join(vocabulary[i] for i in picks)


@pytest.fixture
def texts(tmp_path):
    (tmp_path / "calib.txt").write_text(words(600, 1))  # about 3,200 characters: 100 windows of 32
    (tmp_path / "eval.txt").write_text(words(300, 2))
    return tmp_path / "calib.txt", tmp_path / "eval.txt"


@pytest.fixture
def checkpoints(tmp_path, tiny_model, char_tokenizer):
    r"""Factory: `checkpoints(3)` saves three tiny Llamas of different initializations (the "temperatures")."""

    def make(count: int = 2, **overrides) -> list[str]:
        paths = []
        for index in range(count):
            torch.manual_seed(100 + index)
            path = tmp_path / f"model-{index}-{len(os.listdir(tmp_path))}"
            tiny_model("llama", **overrides).save_pretrained(path)
            char_tokenizer.save_pretrained(path)
            paths.append(str(path))
        return paths

    return make


class CellCounter:
    r"""Wraps `measure_cell` in the sweep module: counts the cells measured, and can fail at the n-th."""

    def __init__(self, monkeypatch, fail_at: int | None = None):
        self.calls, self.fail_at = [], fail_at
        monkeypatch.setattr(prunability_module, "measure_cell", self)

    def __call__(self, checkpoint, load, job):
        self.calls.append((os.path.basename(checkpoint), load))
        if self.fail_at is not None and len(self.calls) == self.fail_at:
            raise KeyboardInterrupt  # the sweep is killed while it measures this cell
        return measure_cell(checkpoint, load, job)


@pytest.fixture
def no_work(monkeypatch):
    r"""Measuring a cell or reading a checkpoint's weights fails the test: every check must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("the sweep started working before the mistake was found")

    monkeypatch.setattr(prunability_module, "measure_cell", refuse)
    monkeypatch.setattr(prunability_module, "checkpoint_digest", refuse)


def reference_loss_and_error(model, windows):
    logits = model(input_ids=windows).logits[:, :-1]  # (windows, seq_len - 1, vocab)
    targets = windows[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)).item()
    return loss, (logits.argmax(-1) != targets).double().mean().item()


def reference_cka(x, y):
    r"""Linear CKA from the (n, n) Gram matrices with an explicit centring matrix H = I - 1 1^T / n."""
    x, y = x.double(), y.double()
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    k, l = h @ (x @ x.T) @ h, h @ (y @ y.T) @ h  # noqa: E741
    return ((k * l).sum() / ((k * k).sum().sqrt() * (l * l).sum().sqrt())).item()


@torch.no_grad()
def test_one_cell_matches_a_plain_reference(monkeypatch, checkpoints, texts, char_tokenizer):
    (path,) = checkpoints(1)
    config = PrunabilityConfig(loads=["0.5"], method="magnitude", **FAST)
    evaluation = all_windows(str(texts[1]), char_tokenizer, SEQ_LEN)[:4]  # (4, 32)
    data = SweepData(SEQ_LEN, None, all_windows(str(texts[0]), char_tokenizer, SEQ_LEN), evaluation)
    job = CellJob(config, data, torch.device("cpu"), torch.float32)
    pruned_states, endpoints = [], []

    def fake_fine_tune(model, load, keep_masks, job, seed):
        r"""Moves every kept weight by seeded noise: a stand-in for training that keeps the masks."""
        pruned_states.append({k: v.clone() for k, v in model.state_dict().items()})
        generator = torch.Generator().manual_seed(seed)
        for name, parameter in model.named_parameters():
            noise = 0.05 * torch.randn(parameter.shape, generator=generator)
            module = name.removesuffix(".weight")
            parameter.add_(noise * keep_masks[module] if module in keep_masks else noise)
        endpoints.append({k: v.clone() for k, v in model.state_dict().items()})
        return 1.0 + seed

    monkeypatch.setattr(cell_module, "fine_tune", fake_fine_tune)
    cell = measure_cell(path, "0.5", job)

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    dense = reference_loss_and_error(model, evaluation)
    assert (cell["dense_loss"], cell["dense_error"]) == pytest.approx(dense, rel=1e-6)
    ppl = perplexity(model, data=evaluation.reshape(-1), seq_len=SEQ_LEN, progress=False)
    assert math.log(ppl) == pytest.approx(cell["dense_loss"], rel=1e-6)  # the standard protocol agrees
    # both copies start from the same pruned model; its zeros are exactly half of every pruned weight
    assert all(torch.equal(pruned_states[0][k], pruned_states[1][k]) for k in pruned_states[0])
    q_proj = pruned_states[0]["model.layers.0.self_attn.q_proj.weight"]
    assert (q_proj == 0).sum().item() == q_proj.numel() // 2 and cell["kept"] == 0.5
    model.load_state_dict(pruned_states[0])
    assert (cell["pruned_loss"], cell["pruned_error"]) == pytest.approx(reference_loss_and_error(model, evaluation))

    down_zeros = pruned_states[0]["model.layers.1.mlp.down_proj.weight"] == 0
    assert down_zeros.sum().item() == down_zeros.numel() // 2
    line = []
    for k in range(11):
        t = k / 10
        state = {key: (1 - t) * endpoints[0][key] + t * endpoints[1][key] for key in endpoints[0]}
        model.load_state_dict(state)
        line.append(reference_loss_and_error(model, evaluation))
        # the shared mask: every point of the line keeps the pruned model's zeros
        assert torch.all(model.model.layers[1].mlp.down_proj.weight[down_zeros] == 0)
    assert cell["line_loss"] == pytest.approx([loss for loss, _ in line], rel=1e-5)
    assert cell["line_error"] == pytest.approx([error for _, error in line])
    assert cell["losses"] == [cell["line_loss"][0], cell["line_loss"][-1]] and cell["train_loss"] == [1.0, 2.0]
    mean = (line[0][0] + line[-1][0]) / 2
    farthest = max(line, key=lambda v: abs(mean - v[0]))[0]
    assert cell["mc_loss"] == pytest.approx(mean - farthest, rel=1e-5)

    ids = evaluation.reshape(-1)[:64].view(2, 32)  # the first 64 held-out tokens
    states = []
    for endpoint in endpoints:
        model.load_state_dict(endpoint)
        hidden = model.model(input_ids=ids).last_hidden_state.reshape(64, -1)  # after the final norm
        states.append((hidden, model(input_ids=ids).logits.reshape(64, -1).softmax(-1)))
    assert cell["cka_hidden"] == pytest.approx(reference_cka(states[0][0], states[1][0]), rel=1e-6)
    assert cell["cka_output"] == pytest.approx(reference_cka(states[0][1], states[1][1]), rel=1e-6)
    assert 0.0 < cell["cka_hidden"] < 1.0


def test_the_fine_tunings_keep_the_mask_and_differ_only_by_their_seed(checkpoints, texts, char_tokenizer):
    from hfprune import PruningConfig, prune

    (path,) = checkpoints(1)
    config = PrunabilityConfig(loads=["2:4"], method="magnitude", **{**FAST, "recovery_steps": 4})
    recovery = all_windows(str(texts[0]), char_tokenizer, SEQ_LEN)
    job = CellJob(config, SweepData(SEQ_LEN, None, recovery, recovery[:2]), torch.device("cpu"), torch.float32)
    model = AutoModelForCausalLM.from_pretrained(path)
    keep_masks = dict(
        prune(model, PruningConfig(method="magnitude", sparsity="2:4"), progress=False, return_masks=True).keep_masks
    )
    start = {k: v.clone() for k, v in model.state_dict().items()}
    copies = []
    for seed in (0, 1, 0):
        model.load_state_dict(start)
        fine_tune(model, "2:4", keep_masks, job, seed)
        copies.append({k: v.clone() for k, v in model.state_dict().items()})
    for name, keep in keep_masks.items():
        for copy in copies:
            weight = copy[f"{name}.weight"]
            assert torch.all(weight[~keep] == 0), name  # pruned weights stay exactly zero
            assert torch.count_nonzero(weight).item() == weight.numel() // 2, name
    moved = [k for k in start if not torch.equal(copies[0][k], copies[1][k])]
    assert moved, "two data orders gave the same copy"
    assert all(torch.equal(copies[0][k], copies[2][k]) for k in start), "the same seed must give the same copy"
    assert all(not torch.equal(copies[0][k], start[k]) for k in moved)


def test_a_sweep_writes_every_cell_and_resumes_after_a_kill(monkeypatch, checkpoints, texts, tmp_path):
    paths = checkpoints(2)
    output = tmp_path / "sweep"
    kwargs = {"output_dir": output, "knob": "lr", "loads": ["0.5", "2:4"], "plots": False, **FAST}
    killed = CellCounter(monkeypatch, fail_at=3)
    with pytest.raises(KeyboardInterrupt):
        prunability_sweep(paths, [3e-3, 1e-3], *texts, **kwargs)
    # measured in ascending temperature: the second checkpoint (1e-3) first, both loads, then the first one
    assert killed.calls == [(os.path.basename(paths[1]), "0.5"), (os.path.basename(paths[1]), "2:4")] + [
        (os.path.basename(paths[0]), "0.5")
    ]
    finished = sorted(os.listdir(output / "cells"))
    assert len(finished) == 2 and all(not name.startswith(".") for name in finished)
    partial = json.loads((output / "results.json").read_text())
    assert [(c["temperature"], c["load"]) for c in partial["cells"]] == [(1e-3, "0.5"), (1e-3, "2:4")]
    first = json.loads((output / "cells" / finished[0]).read_text())
    assert first["measurement"]["line_loss"] and len(first["measurement"]["line_loss"]) == 11

    resumed = CellCounter(monkeypatch)
    result = prunability_sweep(paths, [3e-3, 1e-3], *texts, **kwargs)
    assert resumed.calls == [(os.path.basename(paths[0]), "0.5"), (os.path.basename(paths[0]), "2:4")]
    assert len(result.cells) == 4 and result.temperatures == [1e-3, 3e-3]
    saved = json.loads((output / "results.json").read_text())
    assert saved["files"] == {"markdown": "prunability.md", "json": "results.json"}  # relative: the folder can move
    assert saved == {**json.loads(json.dumps(result.to_dict())), "files": saved["files"]}
    assert saved["regimes"] == {load: [result.cell(t, load).regime for t in (1e-3, 3e-3)] for load in ("0.5", "2:4")}
    for cell in result.cells:
        expected = "I" if cell.mc_loss < 0 else ("II-A" if cell.cka_hidden < 0.9 else "II-B")
        assert cell.regime == expected and len(cell.line_loss) == 11

    again = CellCounter(monkeypatch)  # everything cached: a rerun measures nothing and reads the same numbers
    assert prunability_sweep(paths, [3e-3, 1e-3], *texts, **kwargs).to_dict() == result.to_dict()
    assert again.calls == []

    extended = CellCounter(monkeypatch)  # one more load: only its cells are measured
    more = prunability_sweep(paths, [3e-3, 1e-3], *texts, **{**kwargs, "loads": ["0.5", "2:4", "0.75"]})
    assert sorted(extended.calls) == sorted((os.path.basename(p), "0.75") for p in paths)
    assert more.cell(1e-3, "0.5").line_loss == result.cell(1e-3, "0.5").line_loss


def test_a_folder_of_other_settings_is_refused_unless_overwrite(monkeypatch, checkpoints, texts, tmp_path):
    paths = checkpoints(1)
    kwargs = {"output_dir": tmp_path / "sweep", "loads": ["0.5"], "plots": False, **FAST}
    prunability_sweep(paths, [1.0], *texts, **kwargs)
    with pytest.raises(ValueError) as error:
        prunability_sweep(paths, [1.0], *texts, **{**kwargs, "recovery_steps": 3})
    assert "recovery_steps: 2 there, 3 here" in str(error.value) and "its 1 cells" in str(error.value)
    assert "overwrite=True" in str(error.value)
    # reading settings (thresholds, similarity) are not part of the fingerprint: the cache serves them
    counter = CellCounter(monkeypatch)
    loose = prunability_sweep(paths, [1.0], *texts, **{**kwargs, "cka_threshold": 1.0, "similarity": "output"})
    assert counter.calls == [] and loose.cells[0].regime in ("I", "II-A")
    prunability_sweep(paths, [1.0], *texts, **{**kwargs, "recovery_steps": 3}, overwrite=True)
    assert len(counter.calls) == 1
    settings = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["settings"]
    assert settings["recovery_steps"] == 3 and len(os.listdir(tmp_path / "sweep" / "cells")) == 1

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds no prunability sweep"):
        prunability_sweep(paths, [1.0], *texts, **{**kwargs, "output_dir": tmp_path / "other"}, overwrite=True)
    assert os.listdir(tmp_path / "other") == ["notes.txt"]


def test_a_structured_load_gives_a_smaller_model_and_its_cells(monkeypatch, checkpoints, texts, tmp_path):
    paths = checkpoints(1)
    result = prunability_sweep(paths, [1.0], *texts, output_dir=tmp_path / "s", loads=["mlp=0.5"], plots=False, **FAST)
    (cell,) = result.cells
    # MLP 128 -> 64 channels in both blocks: gate, up and down each lose 64 x 64 weights, in 2 blocks
    total = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(paths[0]).parameters())
    assert cell.kept == pytest.approx((total - 2 * 3 * 64 * 64) / total)
    assert cell.load == "mlp=0.5" and len(cell.line_loss) == 11


def cell(temperature, load, loss, dense, mc, cka):
    r"""A hand-made cell: fine-tuned copies at `loss` -/+ 0.1, `mc` of the loss, `cka` of the hidden states."""
    return PrunabilityCell(
        checkpoint=f"ckpt-{temperature}",
        temperature=temperature,
        load=load,
        dense_loss=dense,
        dense_error=0.5,
        pruned_loss=loss + 1,
        pruned_error=0.5,
        losses=[loss - 0.1, loss + 0.1],
        errors=[0.4, 0.4],
        line_loss=[loss] * 11,
        line_error=[0.4] * 11,
        mc_loss=mc,
        mc_error=-mc,
        cka_hidden=cka,
        cka_output=cka / 2,
        train_loss=[1.0, 1.0],
        kept=0.5,
        seconds={"total": 1.0},
    )


def test_the_reading_regimes_advice_best_temperatures_and_ranking(tmp_path):
    config = PrunabilityConfig(loads=["0.5", "0.9"], knob="batch_size", cka_threshold=0.8, barrier_threshold=0.01)
    cells = [
        cell(32, "0.5", loss=3.0, dense=2.0, mc=0.02, cka=0.95),  # II-B
        cell(64, "0.5", loss=2.9, dense=2.1, mc=-0.005, cka=0.5),  # within the barrier tolerance: II-A
        cell(32, "0.9", loss=4.0, dense=2.0, mc=-0.3, cka=0.99),  # a barrier: I
        cell(64, "0.9", loss=3.5, dense=2.1, mc=0.1, cka=0.85),  # II-B
    ]
    result = PrunabilityResult.read(config, cells)
    assert [c.regime for c in cells] == ["II-B", "II-A", "I", "II-B"]
    assert result.grid(lambda c: c.regime) == [["II-B", "II-A"], ["I", "II-B"]]
    # batch size: a larger batch is a lower temperature, so "raise the temperature" means a smaller batch
    assert result.advice("I") == "raise temperature (smaller batch_size)"
    assert result.advice("II-A") == "lower temperature (larger batch_size)" and result.advice("II-B") == "keep"
    assert PrunabilityResult.read(PrunabilityConfig(loads=["0.5"], knob="lr"), []).advice("I") == (
        "raise temperature (larger lr)"
    )
    assert result.best_temperatures() == {"0.5": 64, "0.9": 64}
    ranking = result.ranking()  # the target load defaults to the last: 0.9
    assert [(r["rank"], r["temperature"], r["dense_rank"], r["regime"]) for r in ranking] == [
        (1, 64, 2, "II-B"),
        (2, 32, 1, "I"),
    ]
    markdown = result.to_markdown(plots=False)
    assert "| load \\ batch_size | 32 | 64 |" in markdown and "| 0.9 | I | II-B |" in markdown
    assert "| 1 | 64 | 3.5000 | 2.1000 (2) | II-B | keep |" in markdown and "barrier: mc < -0.01" in markdown
    partial = PrunabilityResult.read(config, cells[:3])
    assert partial.grid(lambda c: c.regime) == [["II-B", "II-A"], ["I", None]]
    if is_matplotlib_available():
        files = partial.save(tmp_path, plots=True)
        with open(files["plot"], "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        assert "![phase diagram](phase_diagram.png)" in (tmp_path / "prunability.md").read_text()


def test_loads_are_checked_and_spelled_one_way():
    config = PrunabilityConfig(loads=["0.50", "2:4"], target_load="0.5")
    assert config.loads == ["0.5", "2:4"] and config.target_load == "0.5" and config.kind == "sparsity"
    assert PrunabilityConfig(loads=["blocks=1,mlp=.5"]).loads == ["mlp=0.5,blocks=1"]
    with pytest.raises(ValueError, match="`loads` lists 0.5 more than once"):
        PrunabilityConfig(loads=["0.5", "0.50"])
    with pytest.raises(ValueError, match="mixes sparsities and structures"):
        PrunabilityConfig(loads=["0.5", "mlp=0.5"])
    with pytest.raises(ValueError, match=r"`loads` entry '1\.5': `sparsity` must be in \[0, 1\)"):
        PrunabilityConfig(loads=["1.5"])
    with pytest.raises(ValueError, match="`target_load`='0.7' is not among `loads` \\(0.5\\)"):
        PrunabilityConfig(loads=["0.5"], target_load="0.7")
    with pytest.raises(ValueError, match="`seeds` must be two different integers"):
        PrunabilityConfig(loads=["0.5"], seeds=(1, 1))
    with pytest.raises(ValueError, match="`loads` is empty"):
        PrunabilityConfig()
    with pytest.raises(ValueError, match="Select the GPU with CUDA_VISIBLE_DEVICES and pass `device`='cuda'"):
        PrunabilityConfig(loads=["0.5"], device="cuda:1")


def other_tokenizer():
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = ["<unk>"] + list(reversed(string.ascii_letters + string.digits + string.punctuation + " \n"))
    backend = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


def test_bad_input_is_refused_before_any_work(no_work, checkpoints, texts, tmp_path):
    output = tmp_path / "sweep"
    paths = checkpoints(2)

    def sweep(models=paths, temperatures=(1.0, 2.0), calibration=texts[0], data=texts[1], **kwargs):
        settings = {"output_dir": output, "loads": ["0.5"], "plots": False, **FAST, **kwargs}
        return prunability_sweep(models, temperatures, calibration, data, **settings)

    with pytest.raises(ValueError, match="2 checkpoints but 3 temperatures; give one temperature per checkpoint"):
        sweep(temperatures=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"temperatures \[1.0\] appear more than once"):
        sweep(temperatures=[1.0, 1.0])
    wider = checkpoints(1, intermediate_size=96)
    with pytest.raises(ValueError) as error:
        sweep(models=[paths[0], *wider])
    assert "are different architectures (model.layers.0.mlp.gate_proj.weight: (128, 64) vs (96, 64))" in str(
        error.value
    )
    other_tokenizer().save_pretrained(paths[1])
    with pytest.raises(ValueError, match="has another vocabulary"):
        sweep()
    paths[1:] = checkpoints(1)
    with pytest.raises(ValueError, match="load 'heads=0.3' cannot be reached on LlamaForCausalLM: .*Head fractions"):
        sweep(loads=["heads=0.3"])
    with pytest.raises(ValueError, match="load '1:3' cannot be reached.* not a multiple of M=3"):
        sweep(loads=["1:3"])
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match=r"the evaluation set \(`data`, CLI: --data\) is too small"):
        sweep(data=tmp_path / "empty.txt")
    with pytest.raises(ValueError, match="`cka_tokens`=1000 but the 4 evaluation windows hold 128 tokens"):
        sweep(cka_tokens=1000)
    (tmp_path / "short.txt").write_text(words(20, 3))
    with pytest.raises(ValueError, match="fewer than two batches of `recovery_batch_size`=2"):
        sweep(recovery_data=tmp_path / "short.txt")
    with pytest.raises(ValueError, match="`method`='wanda' needs `calibration` data"):
        sweep(calibration=None)
    with pytest.raises(FileNotFoundError, match="no model folder with a config.json"):
        sweep(models=[paths[0], tmp_path / "missing"])
    assert not output.exists()


def test_checkpoints_of_a_training_run_are_found_by_step(tmp_path):
    for step in (10, 2, 300):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "config.json").write_text("{}")
    (tmp_path / "checkpoint-7").mkdir()  # no config: not a checkpoint
    (tmp_path / "runs").mkdir()
    paths, steps = checkpoints_from_folder(tmp_path)
    assert steps == [2, 10, 300] and [os.path.basename(p) for p in paths] == [f"checkpoint-{s}" for s in steps]
    with pytest.raises(ValueError, match="holds no `checkpoint-STEP` folder"):
        checkpoints_from_folder(tmp_path / "runs")
