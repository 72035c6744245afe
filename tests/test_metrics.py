"""Kaggle mAP@100 / GAP and revisited Oxford/Paris mAP against cases worked out by hand."""

import numpy as np
import pytest

from landmark_tf.errors import UserError
from landmark_tf.retrieval import metrics, revisitop, solutions

# ---------------------------------------------------------------- retrieval mAP@100


def test_ap_precision_at_each_hit_over_relevant_count():
    # Hits at ranks 1 and 3: (1/1 + 2/3) / 2.
    assert metrics.average_precision(["a", "x", "b"], {"a", "b"}) == pytest.approx(5 / 6)


def test_ap_duplicates_score_once_but_keep_their_rank():
    # "a" repeated at rank 2 is skipped, "b" is still at rank 3: (1 + 2/3) / 2, not (1 + 1 + 1)/2.
    assert metrics.average_precision(["a", "a", "b"], {"a", "b"}) == pytest.approx(5 / 6)


def test_ap_fewer_predictions_than_relevant():
    # One hit at rank 2 of 3 relevant images: (1/2) / 3.
    assert metrics.average_precision(["x", "a"], {"a", "b", "c"}) == pytest.approx(1 / 6)


def test_ap_divides_by_at_most_100_and_ignores_rank_101():
    relevant = {f"r{i}" for i in range(150)}
    assert metrics.average_precision(["r0", "r1"], relevant) == pytest.approx(2 / 100)
    late = [f"x{i}" for i in range(100)] + ["r0"]
    assert metrics.average_precision(late, relevant) == 0.0


def test_map_ignores_queries_without_relevant_and_zeroes_missing_predictions():
    solution = {"q1": {"a"}, "q2": set(), "q3": {"b"}}
    # q2 has no relevant image: left out. q3 has no prediction: scores 0. Mean over q1, q3.
    assert metrics.mean_average_precision({"q1": ["a"], "q2": ["z"]}, solution) == 0.5
    with pytest.raises(ValueError):
        metrics.mean_average_precision({}, {"q": set()})


def test_map_with_short_cutoff():
    solution = {"q": {"a", "b"}}
    assert metrics.mean_average_precision({"q": ["x", "a", "b"]}, solution, 2) == pytest.approx(
        (1 / 2) / 2
    )


# ---------------------------------------------------------------- recognition GAP


def test_gap_non_landmark_queries_only_add_wrong_predictions():
    solution = {"q1": {1}, "q2": {2}, "q3": set(), "q4": {4}}
    predictions = {"q1": (1, 0.9), "q3": (7, 0.8), "q2": (5, 0.7), "q4": (4, 0.6)}
    # Ranked: q1 right (1/1), q3 wrong, q2 wrong, q4 right (2/4); 3 queries have a landmark.
    assert metrics.global_average_precision(predictions, solution) == pytest.approx(1.5 / 3)


def test_gap_ties_broken_by_query_id_not_by_submission_order():
    solution = {"a": {1}, "b": {2}}
    predictions = {"b": (2, 0.5), "a": (9, 0.5)}  # "a" (wrong) ranks first among equals
    assert metrics.global_average_precision(predictions, solution) == pytest.approx(0.25)


def test_gap_ignores_unscored_ids_and_needs_a_landmark():
    solution = {"a": {1}}
    assert metrics.global_average_precision({"a": (1, 0.1), "zz": (1, 9.0)}, solution) == 1.0
    with pytest.raises(ValueError):
        metrics.global_average_precision({"a": (1, 1.0)}, {"a": set()})


# ---------------------------------------------------------------- solution files

RETRIEVAL_CSV = """id,images,Usage
q1,a b,Public
q2,None,Ignored
q3,c,Private
q4,,Private
"""


def test_parse_retrieval_solution_usages_and_none():
    sol = solutions.parse_solution(RETRIEVAL_CSV, "retrieval", "sol.csv")
    assert sol.subset() == {"q1": {"a", "b"}, "q3": {"c"}, "q4": frozenset()}
    assert sol.subset("Public") == {"q1": {"a", "b"}}
    assert [(suffix, name) for suffix, name, _ in sol.scored_subsets()] == [
        ("", "all"),
        ("_public", "Public"),
        ("_private", "Private"),
    ]


def test_parse_recognition_solution_empty_and_none_and_multiple():
    text = "id,landmarks,Usage\nq1,12,Public\nq2,,Private\nq3,None,Public\nq4,5 6,Private\n"
    sol = solutions.parse_solution(text, "recognition", "r.csv")
    assert sol.truth == {"q1": {12}, "q2": set(), "q3": set(), "q4": {5, 6}}


@pytest.mark.parametrize(
    "text, match",
    [
        ("id,images\nq1,a\n", "header"),
        ("id,images,Usage\nq1,a,Secret\n", r"sol.csv:2: Usage"),
        ("id,images,Usage\nq1,a,Public\nq1,b,Public\n", r"sol.csv:3: .*twice"),
        ("id,images,Usage\n", "no rows"),
    ],
)
def test_parse_solution_errors_name_file_and_line(text, match):
    with pytest.raises(UserError, match=match):
        solutions.parse_solution(text, "retrieval", "sol.csv")


def test_recognition_solution_rejects_non_integer_landmark():
    with pytest.raises(UserError, match="r.csv:2"):
        solutions.parse_solution("id,landmarks,Usage\nq,abc,Public\n", "recognition", "r.csv")


def test_submission_formats():
    text = solutions.format_retrieval_submission(["q1", "q2"], [["a", "b"], []])
    assert text == "id,images\nq1,a b\nq2,\n"
    text = solutions.format_recognition_submission(
        ["q1", "q2"], np.array([7, -1]), np.array([0.5, 0.0])
    )
    assert text == "id,landmarks\nq1,7 0.500000\nq2,\n"


# ---------------------------------------------------------------- revisited Oxford/Paris

# One ranking worked out by hand: column 0 ranks db images 3, 0, 5, 1, 2, 4.
HAND_RANKS = np.array([[3, 0], [0, 1], [5, 2], [1, 3], [2, 4], [4, 5]])
HAND_GND = [
    {"easy": [0, 2], "hard": [1], "junk": [5], "bbx": [0, 0, 1, 1]},
    {"easy": [0], "hard": [], "junk": [], "bbx": [0, 0, 1, 1]},  # no hard: left out of Hard
]


def test_revisitop_protocols_by_hand():
    r = revisitop.evaluate(HAND_RANKS, HAND_GND)
    # Easy, query 0: positives at ranks 1, 4; junk (5, hard 1) at 2, 3 -> shifted to 1, 2.
    # Trapezoids: (0/1 + 1/2)/2 + (1/2 + 2/3)/2, over 2 positives = 5/12. Query 1: AP 1.
    assert r["easy"]["map"] == pytest.approx((5 / 12 + 1) / 2)
    # Medium: positives at 1, 3, 4, junk at 2 -> 1, 2, 3: (1/2 + 7/6 + 17/12) / 6 = 37/72.
    assert r["medium"]["map"] == pytest.approx((37 / 72 + 1) / 2)
    # Hard: only query 0; positive at 3 behind junk at 1, 2 -> rank 1: (0 + 1/2) / 2.
    assert r["hard"]["map"] == pytest.approx(0.25) and r["hard"]["queries"] == 1
    # mP@k, Easy, query 0: 1-based shifted positives [2, 3].
    assert r["easy"]["mp@1"] == pytest.approx((0 + 1) / 2)
    assert r["easy"]["mp@5"] == pytest.approx((2 / 3 + 1) / 2)


def _reference_ap(column, ok, junk):
    """revisitop's loop, restated: shift positives by the junk ranked before them."""
    pos = [i for i, x in enumerate(column) if x in ok]
    junk_pos = [i for i, x in enumerate(column) if x in junk]
    ap = 0.0
    for j, p in enumerate(pos):
        r = p - sum(1 for jp in junk_pos if jp < p)
        ap += ((1.0 if r == 0 else j / r) + (j + 1) / (r + 1)) / (2 * len(ok))
    return ap


def test_revisitop_matches_the_reference_loop_on_random_rankings():
    rng = np.random.default_rng(3)
    ranks = np.stack([rng.permutation(40) for _ in range(5)], axis=1)
    gnd = [
        {"easy": list(p[:4]), "hard": list(p[4:7]), "junk": list(p[7:9])}
        for p in (rng.permutation(40) for _ in range(5))
    ]
    r = revisitop.evaluate(ranks, gnd)
    expected = np.mean(
        [_reference_ap(ranks[:, q], g["easy"], g["junk"] + g["hard"]) for q, g in enumerate(gnd)]
    )
    assert r["easy"]["map"] == pytest.approx(expected)


def test_revisitop_refuses_pickles_with_code():
    import pickle

    data = pickle.dumps({"imlist": [], "qimlist": [], "gnd": [], "x": print})
    with pytest.raises(UserError, match="refusing"):
        revisitop.parse_gnd(data, "bad.pkl")
    good = pickle.dumps({"imlist": ["a"], "qimlist": ["q"], "gnd": [{"easy": [3]}]})
    with pytest.raises(UserError, match="outside imlist"):
        revisitop.parse_gnd(good, "g.pkl")
