r"""Schedules are pure functions of (step, max_steps, config): phases, alpha, SDGF stages, cubic sparsity."""

import math

import pytest

from hfprune import PruningConfig, SparsityTarget
from hfprune.training.schedules import (
    cubic_sparsity,
    decay_coefficient,
    pattern_at,
    phase_boundaries,
    schedule_at,
    sdgf_stage_index,
    sdgf_stages,
    uses_max_steps,
)


def test_phase_boundaries_in_whole_steps():
    config = PruningConfig(dense_fraction=0.1, finetune_fraction=0.2)
    assert phase_boundaries(100, config) == (10, 80)
    # 0.29 * 100 is 28.999...: rounded, not truncated
    assert phase_boundaries(100, PruningConfig(dense_fraction=0.29)) == (29, 100)
    phases = [schedule_at(step, 100, config).phase for step in (0, 9, 10, 79, 80, 99)]
    assert phases == ["dense", "dense", "decay", "decay", "finetune", "finetune"]


def test_phases_that_leave_no_decay_step_name_the_fields():
    config = PruningConfig(dense_fraction=0.4, finetune_fraction=0.4)
    with pytest.raises(ValueError, match=r"`dense_fraction`=0.4.*`finetune_fraction`=0.4.*no step to sparsify"):
        phase_boundaries(2, config)  # round(0.8) = 1 dense step, 1 fine-tune step, nothing in between
    assert phase_boundaries(10, config) == (4, 6)


def test_unknown_run_length():
    assert phase_boundaries(None, PruningConfig(gradient_flow="srste")) == (0, math.inf)
    assert schedule_at(10**6, None, PruningConfig(sparsity="2:4")).phase == "decay"
    for config, field in [
        (PruningConfig(dense_fraction=0.1), "`dense_fraction`"),
        (PruningConfig(gradient_flow="mdgf_exp"), "`decay_coef`"),
        (PruningConfig(sparsity="1:8", gradient_flow="sdgf_stepwise"), "sdgf_stepwise"),
        (PruningConfig(sparsity="0.9", sparsity_schedule="cubic"), "`sparsity_schedule`='cubic'"),
    ]:
        with pytest.raises(ValueError, match=f"(?s){field}.*`max_steps`"):
            phase_boundaries(None, config)
    # an explicit beta needs no run length
    assert uses_max_steps(PruningConfig(gradient_flow="mdgf_exp", decay_coef=1e-3)) == []


def test_derived_decay_coefficient():
    linear = PruningConfig(gradient_flow="mdgf_linear", dense_fraction=0.1, decay_end_fraction=0.6)
    assert decay_coefficient(100, linear) == pytest.approx(1 / 50)  # alpha hits 0 after 60 - 10 steps
    exp = PruningConfig(gradient_flow="mdgf_exp", dense_fraction=0.1, decay_end_fraction=0.6)
    assert decay_coefficient(100, exp) == pytest.approx(math.log(1000) / 50)
    assert decay_coefficient(100, PruningConfig(gradient_flow="mdgf_exp", decay_coef=3e-3)) == 3e-3
    too_early = PruningConfig(gradient_flow="mdgf_exp", dense_fraction=0.5, decay_end_fraction=0.5)
    with pytest.raises(ValueError, match="`decay_end_fraction`=0.5 must come after the dense phase"):
        decay_coefficient(100, too_early)


def test_beta_must_be_positive():
    with pytest.raises(ValueError, match="`decay_coef`"):
        PruningConfig(gradient_flow="mdgf_exp", decay_coef=0.0)
    with pytest.raises(ValueError, match="`decay_coef`"):
        PruningConfig(gradient_flow="mdgf_linear", decay_coef=-1e-3)


def test_mdgf_alpha_starts_after_the_dense_phase():
    config = PruningConfig(sparsity="1:8", gradient_flow="mdgf_linear", decay_coef=0.25, dense_fraction=0.1)
    # dense_end = 2: t = step - 2, alpha = max(0, 1 - t / 4)
    assert [schedule_at(s, 20, config).alpha for s in range(8)] == [1.0, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    exp = PruningConfig(gradient_flow="mdgf_exp", dense_fraction=0.1, decay_end_fraction=0.6, finetune_fraction=0.3)
    assert schedule_at(10, 100, exp).alpha == 1.0  # t = 0: still dense in effect
    assert schedule_at(35, 100, exp).alpha == pytest.approx(math.exp(-math.log(1000) * 25 / 50))
    assert schedule_at(60, 100, exp).alpha == pytest.approx(1e-3)  # ~0 at decay_end_fraction
    assert schedule_at(69, 100, exp).alpha > 0
    assert schedule_at(70, 100, exp).alpha == 0.0  # fine-tune: binary mask


def test_binary_flows_have_alpha_zero_once_sparse():
    for flow in ("ste", "srste", "none"):
        config = PruningConfig(gradient_flow=flow, dense_fraction=0.5)
        assert [schedule_at(s, 4, config).alpha for s in range(4)] == [1.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize(
    "target, flow, k, stages",
    [
        ("1:8", "sdgf_stepwise", 16, [(7, 8), (4, 8), (2, 8), (1, 8)]),
        ("1:16", "sdgf_stepwise", 16, [(15, 16), (8, 16), (4, 16), (2, 16), (1, 16)]),
        ("2:8", "sdgf_stepwise", 16, [(7, 8), (4, 8), (2, 8)]),
        ("3:8", "sdgf_stepwise", 16, [(7, 8), (4, 8), (3, 8)]),
        ("2:4", "sdgf_stepwise", 16, [(3, 4), (2, 4)]),
        ("3:4", "sdgf_stepwise", 16, [(3, 4)]),
        ("1:8", "sdgf_geometric", 16, [(16, 128), (8, 64), (4, 32), (2, 16), (1, 8)]),  # the paper
        ("1:8", "sdgf_geometric", 8, [(8, 64), (4, 32), (2, 16), (1, 8)]),  # the reference code
        ("2:4", "sdgf_geometric", 4, [(8, 16), (4, 8), (2, 4)]),
        ("1:8", "sdgf_geometric", 1, [(1, 8)]),
    ],
)
def test_sdgf_stages(target, flow, k, stages):
    assert sdgf_stages(SparsityTarget.parse(target), flow, k) == stages


def test_sdgf_needs_an_nm_target():
    with pytest.raises(ValueError, match="N:M"):
        sdgf_stages(SparsityTarget.parse("0.5"), "sdgf_stepwise")


def test_sdgf_frames_split_the_decay_phase_evenly():
    config = PruningConfig(sparsity="1:8", gradient_flow="sdgf_stepwise")
    # 10 decay steps, 4 stages: frames start at floor(k * 10 / 4) = 0, 2, 5, 7
    stages = [sdgf_stage_index(schedule_at(step, 10, config), 4) for step in range(10)]
    assert stages == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]


def test_sdgf_pattern_through_all_phases():
    config = PruningConfig(sparsity="1:8", gradient_flow="sdgf_stepwise", dense_fraction=0.1, finetune_fraction=0.2)
    target = config.target
    # decay phase: steps 10..79 (70 steps); frames start at 10 + floor(k * 70 / 4) = 10, 27, 45, 62
    expected = {5: None, 10: "7:8", 26: "7:8", 27: "4:8", 44: "4:8", 45: "2:8", 61: "2:8", 62: "1:8", 80: "1:8"}
    for step, pattern in expected.items():
        got = pattern_at(schedule_at(step, 100, config), target, config)
        assert (str(got) if got is not None else None) == pattern, step
    # a module with its own (override) target gets its own stages
    assert str(pattern_at(schedule_at(10, 100, config), SparsityTarget.parse("2:4"), config)) == "3:4"


def test_cubic_sparsity_by_hand():
    config = PruningConfig(
        sparsity="0.9",
        sparsity_schedule="cubic",
        schedule_start_fraction=0.1,
        schedule_end_fraction=0.5,
        schedule_frequency=10,
    )
    # t0 = 10, end = 50, updates every 10 steps: s = 0.9 - 0.9 (1 - p)^3
    expected = {
        0: 0.0,
        9: 0.0,
        10: 0.0,
        19: 0.0,
        20: 0.9 - 0.9 * 0.75**3,
        35: 0.9 - 0.9 * 0.5**3,
        49: 0.9 - 0.9 * 0.25**3,
    }
    for step, sparsity in expected.items():
        assert cubic_sparsity(step, 100, config, 0.9) == pytest.approx(sparsity), step
    assert cubic_sparsity(50, 100, config, 0.9) == 0.9
    assert cubic_sparsity(99, 100, config, 0.9) == 0.9
    values = [cubic_sparsity(step, 100, config, 0.9) for step in range(100)]
    assert values == sorted(values)  # never decreases


def test_cubic_sparsity_reaches_the_target_when_the_span_is_not_a_multiple_of_the_frequency():
    config = PruningConfig(
        sparsity="0.9", sparsity_schedule="cubic", schedule_start_fraction=0.1, schedule_end_fraction=0.5
    )
    config.schedule_frequency = 15  # updates at 10, 25, 40 and the end step 50
    assert cubic_sparsity(49, 100, config, 0.9) == pytest.approx(0.9 - 0.9 * 0.25**3)
    assert cubic_sparsity(50, 100, config, 0.9) == 0.9


def test_cubic_pattern_and_initial_sparsity():
    config = PruningConfig(
        sparsity="0.8",
        sparsity_schedule="cubic",
        schedule_initial_sparsity=0.2,
        schedule_start_fraction=0.0,
        schedule_end_fraction=1.0,
        schedule_frequency=1,
    )
    schedule = schedule_at(5, 10, config)
    assert schedule.sparsity == pytest.approx(0.8 - 0.6 * 0.5**3)
    assert pattern_at(schedule, config.target, config).sparsity == pytest.approx(0.725)
    assert schedule_at(0, 10, config).sparsity == pytest.approx(0.2)
