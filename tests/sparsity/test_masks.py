import pytest
import torch

from hfprune.sparsity import (
    SparsityTarget,
    keep_mask_from_scores,
    nm_keep_mask,
    nm_violations,
    num_to_prune,
    sparsity_of,
    unstructured_keep_mask,
)


# --- hand-computed masks ---------------------------------------------------------------------------------------


def test_nm_keep_mask_2_4_on_1_to_8():
    weight = torch.arange(1.0, 9.0)[None]  # (1, 8): 1..8
    keep_mask = nm_keep_mask(weight.abs(), 2, 4)
    assert keep_mask.dtype == torch.bool
    assert (weight * keep_mask).tolist() == [[0, 0, 3, 4, 0, 0, 7, 8]]


def test_nm_keep_mask_1_4_keeps_one_not_prunes_one():
    # N counts the weights *kept*: 1:4 keeps 4 and 8 (75% sparsity), not three of every four.
    weight = torch.arange(1.0, 9.0)[None]
    assert (weight * nm_keep_mask(weight, 1, 4)).tolist() == [[0, 0, 0, 4, 0, 0, 0, 8]]
    assert SparsityTarget.parse("1:4").sparsity == 0.75


def test_nm_keep_mask_groups_are_consecutive_inputs_of_each_row():
    scores = torch.tensor(
        [
            [8.0, 1.0, 7.0, 2.0, 0.1, 0.4, 0.3, 0.2],
            [1.0, 2.0, 3.0, 4.0, 5.0, -1.0, -2.0, 9.0],
        ]
    )
    assert nm_keep_mask(scores, 2, 4).int().tolist() == [
        [1, 0, 1, 0, 0, 1, 1, 0],
        [0, 0, 1, 1, 1, 0, 0, 1],
    ]
    # 4:8 on the same scores is one group per row: the four highest of eight.
    assert nm_keep_mask(scores, 4, 8).int().tolist() == [
        [1, 1, 1, 1, 0, 0, 0, 0],
        [0, 0, 1, 1, 1, 0, 0, 1],
    ]


def test_unstructured_keep_mask_per_matrix_and_per_row_differ():
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]])
    # Per matrix, the 4 lowest are all in row 0; per row, each row loses its 2 lowest.
    assert unstructured_keep_mask(scores, 0.5).int().tolist() == [[0, 0, 0, 0], [1, 1, 1, 1]]
    assert unstructured_keep_mask(scores, 0.5, per_row=True).int().tolist() == [[0, 0, 1, 1], [0, 0, 1, 1]]


def test_keep_mask_from_scores_dispatches_on_target():
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]])
    assert keep_mask_from_scores(scores, SparsityTarget.parse("1:2")).int().tolist() == [[0, 1, 0, 1], [0, 1, 0, 1]]
    assert keep_mask_from_scores(scores, SparsityTarget.parse(0.25)).int().tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    assert keep_mask_from_scores(scores, SparsityTarget.parse(0.25), per_row=True).int().tolist() == [
        [0, 1, 1, 1],
        [0, 1, 1, 1],
    ]


def test_nm_keep_mask_rejects_incompatible_width():
    with pytest.raises(ValueError, match="multiple of 4"):
        nm_keep_mask(torch.rand(2, 6), 2, 4)


# --- N:M invariants on random matrices -------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "m"), [(1, 4), (2, 4), (4, 8), (1, 8)])
def test_nm_keep_mask_invariants(n, m):
    scores = torch.randn(32, 64)
    keep_mask = nm_keep_mask(scores, n, m)
    groups = keep_mask.view(32, 64 // m, m)  # (out, in/m, m)
    assert (groups.sum(-1) == n).all()  # exactly N kept in every group
    # The kept entries are the N largest of their group: every kept score beats every pruned one.
    grouped = scores.view(32, 64 // m, m)
    lowest_kept = grouped.masked_fill(~groups, float("inf")).amin(-1)
    highest_pruned = grouped.masked_fill(groups, float("-inf")).amax(-1)
    if n < m:
        assert (lowest_kept > highest_pruned).all()
    weight = torch.randn(32, 64) * keep_mask
    assert nm_violations(weight, n, m) == 0
    assert sparsity_of(weight) == pytest.approx(1 - n / m)


def test_nm_violations_counts_groups_over_n():
    weight = torch.tensor([[1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0]])
    assert nm_violations(weight, 2, 4) == 2  # row 0 group 0 (3 nonzeros), row 1 group 0 (4)
    assert nm_violations(weight, 3, 4) == 1
    assert nm_violations(weight, 4, 8) == 1  # row 1 has 6 nonzeros in its single group
    # Groups run along the input dimension (dim 1): the transpose of a valid 1:2 matrix is not valid.
    valid = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    assert nm_violations(valid, 1, 2) == 0
    assert nm_violations(valid.t().contiguous(), 1, 2) == 1
    # A width that M does not divide counts every (partial) group as a violation.
    assert nm_violations(torch.zeros(3, 6), 2, 4) == 6


# --- exact unstructured sparsity -------------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.25, 0.29, 0.5, 0.57, 0.58, 0.9, 0.99])
def test_unstructured_sparsity_is_exact(sparsity):
    scores = torch.rand(10, 100)
    expected_per_row = round(sparsity * 100)  # these fractions times 100 are whole numbers
    keep_mask = unstructured_keep_mask(scores, sparsity)
    assert int((~keep_mask).sum()) == expected_per_row * 10
    keep_mask = unstructured_keep_mask(scores, sparsity, per_row=True)
    assert ((~keep_mask).sum(1) == expected_per_row).all()
    # The pruned entries of a row are its lowest scores.
    if 0 < expected_per_row < 100:
        highest_pruned = scores.masked_fill(keep_mask, float("-inf")).amax(1)
        lowest_kept = scores.masked_fill(~keep_mask, float("inf")).amin(1)
        assert (highest_pruned < lowest_kept).all()


def test_per_row_prunes_the_exact_total_when_rows_cannot_split_it_evenly():
    torch.manual_seed(0)
    scores = torch.rand(6, 10)
    keep_mask = unstructured_keep_mask(scores, 0.75, per_row=True)  # 45 of 60: 7.5 per row
    pruned = (~keep_mask).sum(1)
    assert int(pruned.sum()) == 45
    assert sorted(pruned.tolist()) == [7, 7, 7, 8, 8, 8]
    ranked = scores.sort(1).values
    # each row prunes its lowest scores; the rows pruning 8 are the 3 with the lowest 8th-lowest score
    for row in range(6):
        assert set(scores[row][~keep_mask[row]].tolist()) == set(ranked[row, : int(pruned[row])].tolist())
    assert set((pruned == 8).nonzero().squeeze(1).tolist()) == set(ranked[:, 7].argsort()[:3].tolist())


def test_per_row_extra_prune_tie_goes_to_the_higher_row():
    scores = torch.tensor([[1.0, 5.0, 6.0], [1.0, 5.0, 6.0], [1.0, 5.0, 6.0]])
    keep_mask = unstructured_keep_mask(scores, 0.45, per_row=True)  # floor(4.05) = 4: one per row, then one more
    assert keep_mask.int().tolist() == [[0, 1, 1], [0, 1, 1], [0, 0, 1]]


def test_num_to_prune_floors_the_decimal_value():
    assert num_to_prune(100, 0.57) == 57  # 0.57 * 100 == 56.99999999999999 in floats
    assert num_to_prune(100, 0.29) == 29
    assert num_to_prune(7, 0.5) == 3
    assert num_to_prune(10, 0.0) == 0
    assert num_to_prune(3, 0.999) == 2


def test_unstructured_keep_mask_global_threshold():
    scores = torch.rand(8, 16)
    keep_mask = unstructured_keep_mask(scores, 0.75)
    assert int((~keep_mask).sum()) == 96
    assert scores[~keep_mask].max() < scores[keep_mask].min()


def test_sparsity_of():
    assert sparsity_of(torch.tensor([[0.0, 1.0], [0.0, -0.0]])) == 0.75
    assert sparsity_of(torch.ones(3, 3)) == 0.0


# --- SparsityTarget parsing ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2:4", SparsityTarget(0.5, 2, 4)),
        (" 4 : 8 ", SparsityTarget(0.5, 4, 8)),
        ("1:4", SparsityTarget(0.75, 1, 4)),
        ("1:8", SparsityTarget(0.875, 1, 8)),
        ("50%", SparsityTarget(0.5)),
        ("12.5%", SparsityTarget(0.125)),
        (0.5, SparsityTarget(0.5)),
        ("0.5", SparsityTarget(0.5)),
        (0, SparsityTarget(0.0)),
        ("0", SparsityTarget(0.0)),
    ],
)
def test_sparsity_target_parse(value, expected):
    target = SparsityTarget.parse(value)
    assert target == expected
    assert target.is_nm == (expected.m is not None)
    assert SparsityTarget.parse(target) is target


def test_sparsity_target_str_and_json():
    assert str(SparsityTarget.parse("2:4")) == "2:4"
    assert SparsityTarget.parse("2:4").to_json() == "2:4"
    assert str(SparsityTarget.parse("50%")) == "0.5"
    assert SparsityTarget.parse("50%").to_json() == 0.5
    assert SparsityTarget.parse(str(SparsityTarget.parse(0.125))) == SparsityTarget.parse(0.125)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("5:4", r"N \(5\) is larger than M \(4\)"),
        ("2:0", "M must be at least 1"),
        ("0:4", "N must be at least 1"),
        ("1.0", r"must be in \[0, 1\)"),
        (1, r"must be in \[0, 1\)"),
        (-0.1, r"must be in \[0, 1\)"),
        ("150%", r"must be in \[0, 1\)"),
        ("nan", r"must be in \[0, 1\)"),
        (float("inf"), r"must be in \[0, 1\)"),
        ("half", "neither a fraction"),
        ("2:4:8", "neither a fraction"),
        ("2/4", "neither a fraction"),
        ("", "neither a fraction"),
        (True, "must be in"),
        (None, r"must be in \[0, 1\)"),
    ],
)
def test_sparsity_target_errors_name_the_field(value, message):
    with pytest.raises(ValueError, match=message) as excinfo:
        SparsityTarget.parse(value, field="sparsity_overrides['down_proj']")
    assert "`sparsity_overrides['down_proj']`" in str(excinfo.value)
    with pytest.raises(ValueError, match="^`sparsity`"):
        SparsityTarget.parse(value)
