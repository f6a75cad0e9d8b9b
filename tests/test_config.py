import dataclasses
import json

import pytest
from transformers import HfArgumentParser, TrainingArguments

import hfprune
from hfprune import PruningConfig, SparsityTarget
from hfprune.config import CONFIG_NAME


def test_defaults_and_parsed_target():
    config = PruningConfig()
    assert config.method is None
    assert config.target == SparsityTarget(0.5)
    assert config.ignore == ["lm_head", "gate", "shared_expert_gate", r".*\.router(\..+)?"]
    assert config.hfprune_version == hfprune.__version__
    config = PruningConfig(method="SparseGPT", sparsity="2:4")
    assert config.method == "sparsegpt"
    assert (config.target.n, config.target.m, config.target.sparsity) == (2, 4, 0.5)
    assert PruningConfig(sparsity=0.75).sparsity == "0.75"  # numbers are kept as their string form


def test_every_field_has_help_text():
    missing = [f.name for f in dataclasses.fields(PruningConfig) if not f.metadata.get("help")]
    assert missing == []


# --- validation: every error names its field -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "obs"}, r"^`method`='obs' is unknown; choose one of admm, magnitude, sparsegpt, wanda"),
        ({"sparsity": "5:4"}, r"^`sparsity`='5:4': N \(5\) is larger than M \(4\)"),
        ({"sparsity": "1.5"}, r"^`sparsity` must be in \[0, 1\)"),
        ({"sparsity": "two:four"}, r"^`sparsity`='two:four' is neither"),
        ({"sparsity": "2:4", "block_size": 130}, r"^`block_size`=130 must be a multiple of M=4.*`block_size`=128"),
        ({"sparsity": "4:8", "block_size": 4}, r"^`block_size`=4 must be a multiple of M=8"),
        (
            {"sparsity_overrides": {"down_proj": "1:8"}, "block_size": 4},
            r"^`block_size`=4 must be a multiple of M=8",
        ),
        ({"sparsity_overrides": {"down_proj": "4:2"}}, r"^`sparsity_overrides\['down_proj'\]`='4:2': N \(4\)"),
        ({"sparsity_overrides": {"[": "2:4"}}, r"^`sparsity_overrides` entry '\[' is not a valid regex"),
        ({"block_size": 0}, r"^`block_size` must be a positive integer, got 0"),
        ({"num_calibration_samples": -1}, r"^`num_calibration_samples` must be a positive integer"),
        ({"calibration_batch_size": 2.5}, r"^`calibration_batch_size` must be a positive integer"),
        ({"calibration_seq_len": 0}, r"^`calibration_seq_len` must be a positive integer"),
        ({"dampening": -0.01}, r"^`dampening` must be in \[0, 1\), got -0.01"),
        ({"dampening": 1.0}, r"^`dampening` must be in \[0, 1\), got 1.0"),
        ({"dense_fraction": 1.0}, r"^`dense_fraction` must be in \[0, 1\)"),
        ({"finetune_fraction": -0.1}, r"^`finetune_fraction` must be in \[0, 1\)"),
        ({"schedule_initial_sparsity": 1.2}, r"^`schedule_initial_sparsity` must be in \[0, 1\)"),
        ({"dense_fraction": 0.6, "finetune_fraction": 0.4}, r"^`dense_fraction` \(0.6\) \+ `finetune_fraction`"),
        ({"decay_end_fraction": 0.0}, r"^`decay_end_fraction` must be in \(0, 1\]"),
        ({"decay_coef": 0.0}, r"^`decay_coef` \(beta\) must be > 0"),
        ({"srste_decay": -1.0}, r"^`srste_decay` must be >= 0"),
        ({"sdgf_geometric_k": 12, "sparsity": "1:8"}, r"^`sdgf_geometric_k` must be a power of two"),
        ({"schedule_start_fraction": 0.9, "schedule_end_fraction": 0.5}, r"^`schedule_start_fraction` must be <"),
        ({"gradient_flow": "magic"}, r"^`gradient_flow`='magic' is unknown; choose one of none, ste, srste"),
        ({"sparsity_schedule": "linear"}, r"^`sparsity_schedule`='linear' is unknown"),
        ({"mdgf_backward": "exact"}, r"^`mdgf_backward`='exact' is unknown"),
        ({"sparsity_schedule": "cubic", "sparsity": "2:4"}, r"^`sparsity_schedule`='cubic' .* `sparsity`='2:4'"),
        ({"gradient_flow": "sdgf_stepwise", "sparsity": "0.5"}, r"^`gradient_flow`='sdgf_stepwise' steps an N:M"),
        ({"targets": ["q_proj", "(v|k"]}, r"^`targets` entry '\(v\|k' is not a valid regex"),
        ({"ignore": "*"}, r"^`ignore` entry '\*' is not a valid regex"),
        ({"schedule_frequency": 0}, r"^`schedule_frequency` must be a positive integer"),
    ],
)
def test_validation_errors_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PruningConfig(**kwargs)


def test_block_size_multiple_of_m_is_accepted():
    assert PruningConfig(sparsity="4:8", block_size=64).block_size == 64
    assert PruningConfig(sparsity="0.5", block_size=100).block_size == 100  # unstructured has no groups


# --- serialization ---------------------------------------------------------------------------------------------


def test_save_and_load_round_trip(tmp_path):
    config = PruningConfig(
        method="wanda",
        sparsity="4:8",
        targets=["q_proj", r".*\.mlp\..*"],
        ignore=["lm_head", "layers.0.self_attn.o_proj"],
        sparsity_overrides={"down_proj": "2:8", r".*\.layers\.0\..*": "0.25"},
        calibration_seq_len=256,
        dampening=0.05,
        gradient_flow="mdgf_exp",
        decay_coef=1e-3,
    )
    config.save_pretrained(tmp_path)
    with open(tmp_path / CONFIG_NAME, encoding="utf-8") as f:
        on_disk = json.load(f)
    assert on_disk["sparsity_overrides"] == {"down_proj": "2:8", r".*\.layers\.0\..*": "0.25"}
    assert on_disk["hfprune_version"] == hfprune.__version__
    assert [p.name for p in tmp_path.iterdir()] == [CONFIG_NAME]  # no temporary file left behind

    loaded = PruningConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert loaded.target == config.target
    # The override order survives the file: the first match wins, so order is meaning.
    assert loaded.overrides == config.overrides
    assert list(loaded.sparsity_overrides) == ["down_proj", r".*\.layers\.0\..*"]
    assert loaded.target_for("model.layers.0.mlp.down_proj") == SparsityTarget(0.75, 2, 8)
    assert PruningConfig.from_pretrained(tmp_path / CONFIG_NAME).to_dict() == config.to_dict()  # a file path too
    assert list(json.loads(config.to_json_string())["sparsity_overrides"]) == list(config.sparsity_overrides)


def test_from_pretrained_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"has no {CONFIG_NAME}"):
        PruningConfig.from_pretrained(tmp_path)


def test_from_dict_ignores_unknown_keys():
    data = PruningConfig(method="magnitude", sparsity="1:4").to_dict()
    data.update(modules={"model.layers.0.mlp.down_proj": {"sparsity": 0.75}}, future_option=True)
    config = PruningConfig.from_dict(data)
    assert config.method == "magnitude" and config.target == SparsityTarget(0.75, 1, 4)
    assert not hasattr(config, "future_option")


def test_an_older_version_stamp_is_kept():
    data = PruningConfig().to_dict() | {"hfprune_version": "0.0.1"}
    assert PruningConfig.from_dict(data).hfprune_version == "0.0.1"


# --- per-module resolution -------------------------------------------------------------------------------------


def test_target_for_first_matching_override_wins():
    config = PruningConfig(
        sparsity="2:4",
        sparsity_overrides={
            r"model\.layers\.0\..*": "0.25",  # regex: everything in block 0
            "down_proj": "1:4",  # suffix
            "mlp.up_proj": "4:8",  # dotted suffix
        },
    )
    assert config.target_for("model.layers.0.mlp.down_proj") == SparsityTarget(0.25)  # the regex comes first
    assert config.target_for("model.layers.1.mlp.down_proj") == SparsityTarget(0.75, 1, 4)
    assert config.target_for("model.layers.1.mlp.up_proj") == SparsityTarget(0.5, 4, 8)
    assert config.target_for("model.layers.1.mlp.gate_proj") == SparsityTarget(0.5, 2, 4)  # the default
    assert config.target_for("model.layers.1.mlp.xdown_proj") == SparsityTarget(0.5, 2, 4)  # not a suffix match
    # Override values are normalised once: a float and its string give the same record.
    assert PruningConfig(sparsity_overrides={"down_proj": 0.25}).sparsity_overrides == {"down_proj": "0.25"}


def test_is_target_suffix_regex_and_ignore():
    config = PruningConfig(targets=["q_proj", r".*\.mlp\.(gate|up)_proj"], ignore=["lm_head", r".*\.layers\.3\..*"])
    assert config.is_target("model.layers.0.self_attn.q_proj")
    assert config.is_target("q_proj")
    assert not config.is_target("model.layers.0.self_attn.k_proj")
    assert not config.is_target("model.layers.0.self_attn.qq_proj")  # a suffix must start at a dot
    assert config.is_target("model.layers.2.mlp.gate_proj")
    assert not config.is_target("model.layers.2.mlp.down_proj")
    assert not config.is_target("model.layers.3.self_attn.q_proj")  # ignore wins over targets
    assert not config.is_target("lm_head")

    everything = PruningConfig()  # targets=None: every module name but the ignored ones
    assert everything.is_target("transformer.h.0.attn.c_attn")
    assert not everything.is_target("lm_head")
    assert PruningConfig(targets="fc1").targets == ["fc1"]  # a single string becomes a list


# --- one command line with TrainingArguments -------------------------------------------------------------------


def test_field_names_do_not_collide_with_training_arguments():
    training = {f.name for f in dataclasses.fields(TrainingArguments)}
    pruning = {f.name for f in dataclasses.fields(PruningConfig)}
    assert training & pruning == set()


def test_hf_argument_parser_builds_both(tmp_path):
    parser = HfArgumentParser((TrainingArguments, PruningConfig))
    training_args, pruning_config = parser.parse_args_into_dataclasses(
        [
            "--output_dir",
            str(tmp_path),
            "--method",
            "wanda",
            "--sparsity",
            "4:8",
            "--targets",
            "q_proj",
            "v_proj",
            "--dampening",
            "0.02",
            "--skip_incompatible",
            "--learning_rate",
            "1e-4",
        ]
    )
    assert training_args.output_dir == str(tmp_path) and training_args.learning_rate == 1e-4
    assert pruning_config.method == "wanda" and pruning_config.target == SparsityTarget(0.5, 4, 8)
    assert pruning_config.targets == ["q_proj", "v_proj"]
    assert pruning_config.dampening == 0.02 and pruning_config.skip_incompatible is True
    with pytest.raises(ValueError, match="^`method`"):
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--method", "obs"])
