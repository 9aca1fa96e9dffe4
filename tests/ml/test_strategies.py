"""Aggregation strategies: FedAvg and its variants, the robust rules and clipping on small
vectors with hand-computed answers, FedAdam/FedYogi state travelling in the model, the
``--strategy`` parser, FedProx's proximal term, and (slow) robustness to attackers in a
10-node digits federation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ml.datasets import load_dataset
from ml.models import build_model
from ml.partition import partition_indices
from ml.strategies import (
    STATE_PREFIX,
    Clipped,
    FedAdam,
    FedAvg,
    FedProx,
    FedYogi,
    Krum,
    Median,
    MultiKrum,
    Strategy,
    TrimmedMean,
    available_strategies,
    fedavg,
    parse_strategy,
    proximal_mu,
    split_state,
)
from ml.training import evaluate, train_local
from ml.weights import get_weights, set_weights
from tests.ml.custom_strategy import KeepFirst


def test_fedavg_weights_by_example_count_exactly() -> None:
    a = {"w": np.array([1.0, 2.0], np.float32)}
    b = {"w": np.array([3.0, -2.0], np.float32)}
    out = fedavg([(a, 10), (b, 30)])
    assert out["w"].dtype == np.float32
    assert out["w"].tolist() == [2.5, -1.0]


def test_fedavg_of_one_update_is_that_update() -> None:
    rng = np.random.default_rng(0)
    w = {"a": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=5)}
    out = fedavg([(w, 17)])
    for k in w:
        assert out[k].dtype == w[k].dtype
        np.testing.assert_array_equal(out[k], w[k])


def test_fedavg_of_identical_updates_is_unchanged_bit_for_bit() -> None:
    w = {"a": np.random.default_rng(1).normal(size=100).astype(np.float32)}
    out = fedavg([(w, 3), (w, 5), (w, 11)])
    np.testing.assert_array_equal(out["a"], w["a"])


def test_integer_tensors_stay_integer_and_round() -> None:
    a = {"count": np.array([0, 4], np.int64), "w": np.zeros(2, np.float32)}
    b = {"count": np.array([4, 8], np.int64), "w": np.ones(2, np.float32)}
    out = fedavg([(a, 1), (b, 3)])
    assert out["count"].dtype == np.int64
    assert out["count"].tolist() == [3, 7]
    out = fedavg([(a, 2), (b, 1)])  # [1.333, 5.333] -> nearest integer
    assert out["count"].tolist() == [1, 5]
    assert out["w"].dtype == np.float32


def test_fedavg_does_not_modify_its_inputs() -> None:
    a = {"w": np.array([1.0, 2.0], np.float32)}
    b = {"w": np.array([3.0, -2.0], np.float32)}
    fedavg([(a, 1), (b, 1)])
    assert a["w"].tolist() == [1.0, 2.0] and b["w"].tolist() == [3.0, -2.0]


def test_fedavg_with_no_updates_is_an_error() -> None:
    with pytest.raises(ValueError, match="no updates"):
        fedavg([])


def test_fedavg_with_zero_examples_is_an_error() -> None:
    w = {"w": np.ones(2, np.float32)}
    with pytest.raises(ValueError, match="no examples"):
        fedavg([(w, 0), (w, 0)])


def test_fedavg_with_mismatched_tensor_names_is_an_error() -> None:
    a = {"w": np.ones(2, np.float32)}
    b = {"v": np.ones(2, np.float32)}
    with pytest.raises(ValueError, match="different tensors"):
        fedavg([(a, 1), (b, 1)])
    with pytest.raises(ValueError, match="different tensors"):
        fedavg([(a, 1), ({**a, "extra": np.ones(1)}, 1)])


def test_fedavg_with_mismatched_shapes_is_an_error() -> None:
    a = {"w": np.ones(2, np.float32)}
    b = {"w": np.ones(3, np.float32)}
    with pytest.raises(ValueError, match=r"w has shape \(3,\), expected \(2,\)"):
        fedavg([(a, 1), (b, 1)])


def test_fedavg_with_a_negative_example_count_is_an_error() -> None:
    # A peer claiming -10 examples would otherwise push the average away from honest ones.
    w = {"w": np.ones(2, np.float32)}
    with pytest.raises(ValueError, match="negative example count"):
        fedavg([(w, 20), (w, -10)])


def test_boolean_tensors_take_the_weighted_majority() -> None:
    a = {"mask": np.array([True, True, False])}
    b = {"mask": np.array([False, True, True])}
    assert fedavg([(a, 3), (b, 1)])["mask"].tolist() == [True, True, False]
    assert fedavg([(a, 1), (b, 3)])["mask"].tolist() == [False, True, True]


# -- the Strategy classes on small vectors ------------------------------------------------

def vec(*values: float) -> dict[str, np.ndarray]:
    return {"w": np.array(values, np.float32)}


ZERO = vec(0.0, 0.0)


def test_fedavg_class_gives_the_reference_value_and_equals_the_function() -> None:
    ups = [(vec(1, 2), 10), (vec(3, -2), 30)]
    out = FedAvg().aggregate(ZERO, ups)
    assert out["w"].dtype == np.float32 and out["w"].tolist() == [2.5, -1.0]
    assert FedProx(mu=0.1).aggregate(ZERO, ups)["w"].tolist() == fedavg(ups)["w"].tolist()


def test_median_takes_the_middle_value_of_each_coordinate_ignoring_counts() -> None:
    ups = [(vec(1, 10), 1), (vec(2, 20), 1000), (vec(100, -5), 1)]
    assert Median().aggregate(ZERO, ups)["w"].tolist() == [2.0, 10.0]
    # even n: the mean of the two middle values (coordinate 0: 1 2 | 3 10; 1: 0 2 | 4 8)
    ups = [(vec(1, 4), 1), (vec(3, 8), 1), (vec(10, 0), 1), (vec(2, 2), 1)]
    assert Median().aggregate(ZERO, ups)["w"].tolist() == [2.5, 3.0]


def test_trimmed_mean_drops_floor_beta_n_values_at_each_end() -> None:
    ups = [(vec(a, b), 1) for a, b in [(1, -50), (2, 0), (3, 1), (4, 2), (100, 3)]]
    # beta 0.2 of n = 5 drops 1 per end: mean(2, 3, 4) = 3 and mean(0, 1, 2) = 1
    assert TrimmedMean(beta=0.2).aggregate(ZERO, ups)["w"].tolist() == [3.0, 1.0]
    # beta 0.1 of 5 drops nothing (floor 0.5 = 0): the plain unweighted mean
    np.testing.assert_allclose(TrimmedMean(beta=0.1).aggregate(ZERO, ups)["w"], [22.0, -8.8],
                               rtol=1e-7)
    # beta 0.25 of 4 drops one per end: mean(2, 3) and mean(0, 1)
    assert TrimmedMean(beta=0.25).aggregate(ZERO, ups[:4])["w"].tolist() == [2.5, 0.5]


KRUM_POINTS = [0.0, 1.0, 2.0, 4.0, 10.0]
"""1-D updates. With n = 5, f = 1 a score sums the n - f - 2 = 2 smallest squared
distances: 0 -> 1 + 4 = 5; 1 -> 1 + 1 = 2; 2 -> 1 + 4 = 5; 4 -> 4 + 9 = 13;
10 -> 36 + 64 = 100."""


def krum_updates(counts: list[int] | None = None) -> list[tuple[dict[str, np.ndarray], int]]:
    counts = counts or [1] * len(KRUM_POINTS)
    return [(vec(p), n) for p, n in zip(KRUM_POINTS, counts, strict=True)]


def test_krum_scores_and_choice_match_a_hand_computation() -> None:
    base = vec(0.0)
    assert MultiKrum(f=1).scores(base, krum_updates()) == [5.0, 2.0, 5.0, 13.0, 100.0]
    assert Krum(f=1).aggregate(base, krum_updates())["w"].tolist() == [1.0]


def test_multi_krum_averages_the_m_best_weighted_by_examples() -> None:
    base, counts = vec(0.0), [1, 1, 2, 1, 1]
    # m = 3: the updates at 1, 0 and 2 (scores 2, 5, 5): (0*1 + 1*1 + 2*2) / 4
    assert MultiKrum(f=1, m=3).aggregate(base, krum_updates(counts))["w"].tolist() == [1.25]
    # default m = n - f = 4 leaves out only the outlier: (0 + 1 + 4 + 4) / 5
    out = MultiKrum(f=1).aggregate(base, krum_updates(counts))["w"]
    np.testing.assert_allclose(out, [1.8], rtol=1e-6)
    # m above n - f is capped at n - f: the outlier never gets in
    np.testing.assert_array_equal(MultiKrum(f=1, m=5).aggregate(base, krum_updates(counts))["w"],
                                  out)


def test_krum_picks_one_of_five_close_updates_over_a_far_outlier() -> None:
    rng = np.random.default_rng(3)
    base = {"a": np.zeros((3, 4), np.float32), "b": np.zeros(5, np.float32)}
    close = [{k: (1 + 0.01 * rng.normal(size=v.shape)).astype(np.float32)
              for k, v in base.items()} for _ in range(5)]
    outlier = {k: np.full(v.shape, 50.0, np.float32) for k, v in base.items()}
    ups = [(u, 10) for u in close[:2]] + [(outlier, 1000)] + [(u, 10) for u in close[2:]]
    out = Krum(f=1).aggregate(base, ups)
    assert any(all(np.array_equal(out[k], u[k]) for k in base) for u in close)
    # the outlier's large example count buys it nothing; nor does the order of arrival
    again = Krum(f=1).aggregate(base, ups[::-1])
    assert all(np.array_equal(again[k], out[k]) for k in base)


def test_krum_refuses_too_few_updates_naming_n_and_f() -> None:
    ups = [(vec(float(i)), 1) for i in range(6)]
    with pytest.raises(ValueError, match=r"n > 2f \+ 2 .* n=6 with f=2"):
        Krum(f=2).aggregate(vec(0.0), ups)
    # n = 7 is enough. Scores sum the 3 nearest: 2 and 3 score 0.25 + 1 + 1 = 2.25, 2.5
    # scores 0.25 + 0.25 + 2.25 = 2.75; the tie goes to the earlier update, 2.
    assert Krum(f=2).aggregate(vec(0.0), ups + [(vec(2.5), 1)])["w"].tolist() == [2.0]


def test_robust_strategies_outvote_a_minority_of_nan_and_inf_updates() -> None:
    ups = [(vec(1.0, 1.0), 1), (vec(1.1, 0.9), 1), (vec(0.9, 1.1), 1), (vec(1.0, 1.05), 1),
           (vec(np.nan, np.inf), 1), (vec(1.05, 1.0), 1), (vec(0.95, 0.95), 1)]
    for strategy in (Median(), TrimmedMean(beta=0.2), Krum(f=2), MultiKrum(f=2)):
        out = strategy.aggregate(ZERO, ups)["w"]
        assert np.isfinite(out).all() and np.abs(out - 1).max() < 0.11, strategy.name


def test_clipping_scales_a_long_delta_to_max_norm_and_keeps_a_short_one() -> None:
    base = {"a": np.array([1.0, 1.0], np.float32), "b": np.array([1.0], np.float32),
            "steps": np.array([7], np.int64)}
    long = {"a": np.array([4.0, 1.0], np.float32), "b": np.array([5.0], np.float32),
            "steps": np.array([9], np.int64)}  # delta (3, 0, 4): norm 5 over a and b
    short = {"a": np.array([1.3, 1.0], np.float32), "b": np.array([1.4], np.float32),
             "steps": np.array([9], np.int64)}  # delta (0.3, 0, 0.4): norm 0.5
    clip = Clipped(FedAvg(), max_norm=1.0)
    clipped = clip.clip(base, long)
    np.testing.assert_allclose(clipped["a"], [1.6, 1.0], rtol=1e-6)
    np.testing.assert_allclose(clipped["b"], [1.8], rtol=1e-6)
    delta = np.concatenate([clipped["a"] - base["a"], clipped["b"] - base["b"]])
    assert np.linalg.norm(delta.astype(np.float64)) == pytest.approx(1.0, rel=1e-6)
    assert clipped["steps"].tolist() == [9]  # integer tensors are not clipped
    assert clip.clip(base, short) is short
    out = clip.aggregate(base, [(long, 1), (short, 1)])
    np.testing.assert_allclose(out["a"], [1.45, 1.0], rtol=1e-6)
    np.testing.assert_allclose(out["b"], [1.6], rtol=1e-6)
    assert clip.name == "fedavg+clip"


def test_clipping_replaces_a_non_finite_update_by_the_base() -> None:
    out = Clipped(FedAvg(), max_norm=1.0).clip(ZERO, vec(np.inf, 1.0))
    assert out["w"].tolist() == [0.0, 0.0]


FEDOPT_BASE = {"w": np.array([0.0, 1.0, 0.0], np.float32), "steps": np.array([3], np.int64)}
ROUND1 = [({"w": np.array([1.0, 0.0, 3.0], np.float32), "steps": np.array([4], np.int64)}, 1),
          ({"w": np.array([3.0, 2.0, 5.0], np.float32), "steps": np.array([6], np.int64)}, 1)]
ROUND2_STEP = np.array([1.0, 0.5, 0.1])
"""Round 1's mean update is (2, 1, 4): pseudo-gradient d1 = (2, 0, 4). Round 2's one update
is the round-1 model plus ROUND2_STEP, so d2 = ROUND2_STEP; its last coordinate has
d2^2 = 0.01 < v1 = 0.16, taking Yogi's other branch."""


def hand_fedopt(yogi: bool, eta: float = 0.1, b1: float = 0.9, b2: float = 0.99,
                tau: float = 1e-3) -> tuple[np.ndarray, ...]:
    x0 = np.array([0.0, 1.0, 0.0])
    d1 = np.array([2.0, 0.0, 4.0])
    m1 = b1 * 0 + (1 - b1) * d1                       # (0.2, 0, 0.4)
    v1 = (1 - b2) * d1 ** 2                           # (0.04, 0, 0.16) for both rules
    x1 = x0 + eta * m1 / (np.sqrt(v1) + tau)          # (0.0995..., 1, 0.0997...)
    d2 = ROUND2_STEP
    m2 = b1 * m1 + (1 - b1) * d2
    if yogi:  # sign(v1 - d2^2) = (-1, -1, +1)
        v2 = v1 - (1 - b2) * d2 ** 2 * np.sign(v1 - d2 ** 2)
    else:
        v2 = b2 * v1 + (1 - b2) * d2 ** 2
    x2 = x1 + eta * m2 / (np.sqrt(v2) + tau)
    return x1, m1, v1, x2, m2, v2


@pytest.mark.parametrize("cls", [FedAdam, FedYogi])
def test_fedadam_and_fedyogi_two_rounds_match_a_hand_computation(cls) -> None:
    x1, m1, v1, x2, m2, v2 = hand_fedopt(yogi=cls is FedYogi)
    r1 = cls(eta=0.1).aggregate(FEDOPT_BASE, ROUND1)
    assert list(r1) == ["w", "steps", "fl.opt.m.w", "fl.opt.v.w"]  # model first, then state
    assert r1["fl.opt.m.w"].dtype == np.float32 and r1["fl.opt.v.w"].shape == (3,)
    np.testing.assert_allclose(r1["w"], x1, rtol=1e-6)
    np.testing.assert_allclose(r1["fl.opt.m.w"], m1, rtol=1e-6)
    np.testing.assert_allclose(r1["fl.opt.v.w"], v1, rtol=1e-6)
    assert r1["steps"].tolist() == [5]  # integers: fedavg's rounded mean, no optimizer
    # Round 2 on another node: a fresh object, the state read from the model it received.
    update = {"w": (r1["w"] + ROUND2_STEP).astype(np.float32), "steps": np.array([6])}
    r2 = cls(eta=0.1).aggregate(r1, [(update, 7)])
    d2 = update["w"].astype(np.float64) - r1["w"]  # ROUND2_STEP up to float32 rounding
    np.testing.assert_allclose(d2, ROUND2_STEP, atol=1e-6)
    np.testing.assert_allclose(r2["w"], x2, rtol=1e-5)
    np.testing.assert_allclose(r2["fl.opt.m.w"], m2, rtol=1e-5)
    np.testing.assert_allclose(r2["fl.opt.v.w"], v2, rtol=1e-5)
    # Without the state, round 2 would restart from zero moments: a different model.
    fresh = cls(eta=0.1).aggregate(split_state(r1)[0], [(update, 7)])
    assert not np.allclose(fresh["w"], r2["w"], rtol=1e-3)


def test_fedyogi_and_fedadam_differ_only_from_the_second_round() -> None:
    a1, y1 = (cls(eta=0.1).aggregate(FEDOPT_BASE, ROUND1) for cls in (FedAdam, FedYogi))
    assert all(np.array_equal(a1[k], y1[k]) for k in a1)
    assert not np.allclose(hand_fedopt(yogi=True)[5], hand_fedopt(yogi=False)[5])


def test_state_in_an_update_is_ignored() -> None:
    ups = [({**vec(1.0, 1.0), "fl.opt.m.w": np.full(2, 1e6, np.float32)}, 1)]
    out = FedAdam(eta=0.1).aggregate(ZERO, ups)
    np.testing.assert_allclose(out["fl.opt.m.w"], [0.1, 0.1], rtol=1e-6)


STATEFUL_BASE = {**vec(0.0, 0.0), "fl.opt.m.w": np.array([0.5, -0.5], np.float32),
                 "fl.opt.v.w": np.array([0.25, 0.75], np.float32)}


@pytest.mark.parametrize("strategy", [
    FedAvg(), FedProx(mu=0.1), Median(), TrimmedMean(beta=0.2), Krum(f=1), MultiKrum(f=1),
    Clipped(FedAvg(), max_norm=100.0),
], ids=lambda s: s.name)
def test_state_tensors_pass_through_every_other_strategy_untouched(strategy) -> None:
    ups = [(vec(1.0 + i / 10, 2.0), 1) for i in range(5)]
    out = strategy.aggregate(STATEFUL_BASE, ups)
    assert list(out) == list(STATEFUL_BASE)
    for key in ("fl.opt.m.w", "fl.opt.v.w"):
        assert out[key].dtype == np.float32
        np.testing.assert_array_equal(out[key], STATEFUL_BASE[key])
        assert out[key] is not STATEFUL_BASE[key]  # a copy: the base stays the caller's
    assert out["w"][1] == 2.0


def test_split_state_separates_model_and_state() -> None:
    model, state = split_state(STATEFUL_BASE)
    assert list(model) == ["w"] and list(state) == ["fl.opt.m.w", "fl.opt.v.w"]
    assert STATE_PREFIX == "fl.opt."


@pytest.mark.parametrize("strategy", [Median(), TrimmedMean(beta=0.2), FedAdam()],
                         ids=lambda s: s.name)
def test_integer_and_boolean_tensors_follow_fedavg_in_every_strategy(strategy) -> None:
    def up(count: list[int], mask: list[bool], n: int):
        return ({"w": np.zeros(2, np.float32), "count": np.array(count, np.int64),
                 "mask": np.array(mask)}, n)
    base = up([0, 0], [False] * 3, 1)[0]
    ups = [up([0, 4], [True, True, False], 1), up([4, 8], [False, True, True], 3)]
    out = strategy.aggregate(base, ups)
    assert out["count"].dtype == np.int64 and out["count"].tolist() == [3, 7]
    assert out["mask"].tolist() == [False, True, True]


def test_krum_takes_integer_tensors_from_the_update_it_selects() -> None:
    ups = [({"w": np.array([p], np.float32), "n": np.array([i], np.int64)}, 1)
           for i, p in enumerate(KRUM_POINTS)]
    out = Krum(f=1).aggregate({"w": np.zeros(1, np.float32), "n": np.zeros(1, np.int64)}, ups)
    assert out["n"].tolist() == [1]


def test_strategies_check_updates_against_the_base() -> None:
    with pytest.raises(ValueError, match="no updates"):
        Median().aggregate(ZERO, [])
    with pytest.raises(ValueError, match="negative example count"):
        TrimmedMean().aggregate(ZERO, [(ZERO, 5), (ZERO, -1)])
    with pytest.raises(ValueError, match="no examples"):
        FedAvg().aggregate(ZERO, [(ZERO, 0)])
    with pytest.raises(ValueError, match="update 1 has different tensors"):
        FedAdam().aggregate(ZERO, [(ZERO, 1), ({"v": np.zeros(2, np.float32)}, 1)])
    with pytest.raises(ValueError, match=r"update 0: w has shape \(3,\), expected \(2,\)"):
        Krum(f=0).aggregate(ZERO, [(vec(1, 2, 3), 1)] * 3)


def test_an_update_with_no_examples_is_left_out() -> None:
    ups = [(vec(1, 1), 1), (vec(2, 2), 1), (vec(3, 3), 1), (vec(1000, 1000), 0)]
    assert Median().aggregate(ZERO, ups)["w"].tolist() == [2.0, 2.0]


def test_strategies_do_not_modify_their_inputs() -> None:
    base = {**vec(0.5, 0.5), "fl.opt.m.w": np.zeros(2, np.float32)}
    ups = [(vec(1.0 + i, -1.0), 1) for i in range(5)]
    before = [u["w"].copy() for u, _ in ups], {k: v.copy() for k, v in base.items()}
    for strategy in (FedAvg(), FedAdam(), FedYogi(), Median(), TrimmedMean(), Krum(f=1),
                     MultiKrum(f=1), Clipped(Median(), max_norm=0.1)):
        strategy.aggregate(base, ups)
    assert all(np.array_equal(u["w"], b) for (u, _), b in zip(ups, before[0], strict=True))
    assert all(np.array_equal(base[k], v) for k, v in before[1].items())


@pytest.mark.parametrize("make, match", [
    (lambda: FedProx(mu=-0.1), "mu >= 0"),
    (lambda: FedAdam(eta=0), "eta > 0"),
    (lambda: FedYogi(b1=1.0), "b1 >= 0 and < 1"),
    (lambda: FedAdam(b2=-0.5), "b2"),
    (lambda: FedAdam(tau=0), "tau > 0"),
    (lambda: FedAdam(eta=float("nan")), "eta"),
    (lambda: TrimmedMean(beta=0.5), r"beta >= 0 and < 0.5, got beta=0.5"),
    (lambda: TrimmedMean(beta=-0.1), "beta"),
    (lambda: TrimmedMean(beta="0.2"), "must be a number"),
    (lambda: Krum(f=-1), "f must be an integer >= 0"),
    (lambda: Krum(f=1.5), "f must be an integer"),
    (lambda: Krum(f=True), "f must be an integer"),
    (lambda: MultiKrum(f=1, m=0), "m must be an integer >= 1"),
    (lambda: Clipped(FedAvg(), max_norm=0), "max_norm > 0"),
    (lambda: Clipped(object(), max_norm=1), "no aggregate"),
])
def test_bad_parameters_are_clear_value_errors(make, match) -> None:
    with pytest.raises(ValueError, match=match):
        make()


# -- parse_strategy ---------------------------------------------------------------------------

@pytest.mark.parametrize("spec, params, cls, attrs", [
    ("fedavg", {}, FedAvg, {}),
    ("fedprox", {}, FedProx, {"mu": 0.01}),
    ("fedprox", {"mu": 0.5}, FedProx, {"mu": 0.5}),
    ("fedadam", {}, FedAdam, {"eta": 0.01, "b1": 0.9, "b2": 0.99, "tau": 1e-3}),
    ("fedyogi", {"eta": 0.03, "tau": 1e-4}, FedYogi, {"eta": 0.03, "tau": 1e-4}),
    ("median", {}, Median, {}),
    ("trimmed-mean", {}, TrimmedMean, {"beta": 0.2}),
    ("Trimmed_Mean", {"beta": 0.1}, TrimmedMean, {"beta": 0.1}),
    ("krum", {"f": 2}, Krum, {"f": 2, "m": 1}),
    ("multi-krum", {}, MultiKrum, {"f": 1, "m": None}),
    ("multi-krum", {"f": 2, "m": 5}, MultiKrum, {"f": 2, "m": 5}),
    ("median", {"mu": None, "beta": None, "clip_norm": None}, Median, {}),  # None = unset
])
def test_parse_strategy_builds_every_builtin(spec, params, cls, attrs) -> None:
    strategy = parse_strategy(spec, **params)
    assert type(strategy) is cls and strategy.name == spec.lower().replace("_", "-")
    assert isinstance(strategy, Strategy)
    for key, value in attrs.items():
        assert getattr(strategy, key) == value
    assert sorted(available_strategies()) == sorted(
        ["fedavg", "fedprox", "fedadam", "fedyogi", "median", "trimmed-mean", "krum",
         "multi-krum"])


def test_parse_strategy_wraps_in_clipping_when_clip_norm_is_set() -> None:
    strategy = parse_strategy("fedprox", mu=0.2, clip_norm=2.5)
    assert isinstance(strategy, Clipped) and isinstance(strategy.inner, FedProx)
    assert strategy.max_norm == 2.5 and strategy.name == "fedprox+clip"
    assert proximal_mu(strategy) == 0.2  # the node still trains with FedProx's term
    assert proximal_mu(parse_strategy("krum")) == 0.0


def test_parse_strategy_loads_a_custom_class_with_the_params_it_accepts() -> None:
    strategy = parse_strategy("tests.ml.custom_strategy:KeepFirst", mu=0.3, beta=0.2)
    assert isinstance(strategy, KeepFirst) and strategy.mu == 0.3  # beta dropped
    out = strategy.aggregate(STATEFUL_BASE, [(vec(7, 7), 1), (vec(1, 1), 1)])
    assert out["w"].tolist() == [7.0, 7.0] and "fl.opt.m.w" in out
    assert proximal_mu(strategy) == 0.3
    takes_all = parse_strategy("tests.ml.custom_strategy:TakesAll", f=3, eta=0.1)
    assert takes_all.params == {"f": 3, "eta": 0.1}
    assert takes_all.name == "tests.ml.custom_strategy:TakesAll"  # no name: the spec
    clipped = parse_strategy("tests.ml.custom_strategy:KeepFirst", clip_norm=1.0)
    assert isinstance(clipped, Clipped) and clipped.name == "keep-first+clip"


@pytest.mark.parametrize("spec, params, match", [
    ("", {}, "empty name; known: fedavg"),
    ("fedsgd", {}, "unknown strategy 'fedsgd'; known: fedavg, .*package.module:Name"),
    ("fedavg", {"beta": 0.2}, r"'fedavg' does not use beta \(its parameters: none\)"),
    ("trimmed-mean", {"f": 2}, r"does not use f \(its parameters: beta\)"),
    ("krum", {"m": 3}, "does not use m"),
    ("trimmed-mean", {"beta": 0.6}, "beta"),
    ("krum", {"f": -1}, "f must be"),
    ("multi-krum", {"m": 0}, "m must be"),
    ("fedadam", {"eta": -1.0}, "eta > 0"),
    ("fedprox", {"mu": -1.0}, "mu >= 0"),
    ("median", {"clip_norm": 0.0}, "max_norm > 0"),
    ("no_such_package.mod:Thing", {}, "cannot import module 'no_such_package.mod'"),
    ("tests.ml.custom_strategy:Missing", {}, "has no 'Missing'"),
    ("tests.ml.custom_strategy:NoAggregate", {}, "NoAggregate has no aggregate"),
    ("tests.ml.custom_strategy:RefusesToStart", {}, "cannot create it: needs a GPU"),
    ("tests.ml.custom_strategy:np", {}, "has no aggregate"),
    ("tests.ml.custom_strategy:", {}, "expected package.module:Name"),
])
def test_bad_specs_and_params_are_clear_value_errors(spec, params, match) -> None:
    with pytest.raises(ValueError, match=match):
        parse_strategy(spec, **params)


# -- FedProx in local training ------------------------------------------------------------------

def blob_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (300,), generator=g)
    centres = torch.tensor([[3.0, 0.0], [-3.0, 0.0], [0.0, 3.0]])
    return centres[y] + torch.randn(300, 2, generator=g), y


def distance_after_training(mu: float, prox_base=None) -> tuple[float, dict]:
    torch.manual_seed(0)
    model = build_model("mlp", (2,), 3)
    start = get_weights(model)
    x, y = blob_data()
    train_local(model, x, y, epochs=3, batch_size=16, lr=0.1, seed=5, prox_mu=mu,
                prox_base=prox_base)
    end = get_weights(model)
    dist = math.sqrt(sum(float(((end[k] - start[k]).astype(np.float64) ** 2).sum())
                         for k in start))
    return dist, end


def test_fedprox_term_keeps_local_weights_closer_to_the_global_model() -> None:
    plain, plain_w = distance_after_training(0.0)
    prox, _ = distance_after_training(1.0)
    assert prox < 0.8 * plain, (prox, plain)
    # mu = 0 is exactly the old behaviour, bit for bit
    torch.manual_seed(0)
    model = build_model("mlp", (2,), 3)
    train_local(model, *blob_data(), epochs=3, batch_size=16, lr=0.1, seed=5)
    assert all(np.array_equal(get_weights(model)[k], plain_w[k]) for k in plain_w)


def test_fedprox_base_defaults_to_the_starting_weights() -> None:
    torch.manual_seed(0)
    start = {k: torch.from_numpy(v) for k, v in get_weights(build_model("mlp", (2,), 3)).items()}
    _, implicit = distance_after_training(1.0)
    _, explicit = distance_after_training(1.0, prox_base=start)
    assert all(np.array_equal(implicit[k], explicit[k]) for k in implicit)


def test_fedprox_base_must_fit_the_model() -> None:
    model = build_model("mlp", (2,), 3)
    x, y = blob_data()
    with pytest.raises(ValueError, match="prox_base has no tensor for parameter 1.weight"):
        train_local(model, x, y, epochs=1, batch_size=16, lr=0.1, seed=0, prox_mu=0.1,
                    prox_base={})
    with pytest.raises(ValueError, match="prox_mu"):
        train_local(model, x, y, epochs=1, batch_size=16, lr=0.1, seed=0, prox_mu=-1.0)


# -- robustness: a 10-node digits federation with 2 attackers (slow) --------------------------

NODES, ATTACKERS, ROUNDS = 10, 2, 30
LR, LR_DECAY, BATCH = 0.1, 0.93, 16
"""One local epoch per round, SGD lr 0.1 decayed by 0.93 a round, batches of 16: clean
FedAvg reaches ~96 % in 30 rounds, and each run takes about 2 s on one thread."""


class DigitsFederation:
    """Ten nodes with IID shards of ``digits`` and one shared MLP, federated in a plain loop.

    Nodes 8 and 9 are the attackers when an attack is given. Every seed is fixed (model
    init, partition, each node's shuffle per round, the noise attack's generator), so a
    run is reproducible bit for bit on one thread.
    """

    def __init__(self) -> None:
        torch.set_num_threads(1)
        self.data = load_dataset("digits", data_dir=None, download=False, seed=0)
        labels = self.data.train_y.numpy()
        self.shards = [torch.from_numpy(partition_indices(labels, NODES, i, seed=0))
                       for i in range(NODES)]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.model = build_model("mlp", self.data.input_shape, self.data.num_classes)
        self.genesis = get_weights(self.model)

    def run(self, strategy: Strategy, attack: str | None = None) -> float:
        """Test accuracy (in %) of the global model after ``ROUNDS`` rounds."""
        noise = np.random.default_rng(1)
        global_model = {k: v.copy() for k, v in self.genesis.items()}
        for rnd in range(ROUNDS):
            base, _ = split_state(global_model)
            updates = []
            for node in range(NODES):
                attacker = attack is not None and node >= NODES - ATTACKERS
                x, y = self.data.train_x[self.shards[node]], self.data.train_y[self.shards[node]]
                if attacker and attack == "label-flip":
                    y = 9 - y
                set_weights(self.model, base)
                train_local(self.model, x, y, epochs=1, batch_size=BATCH,
                            lr=LR * LR_DECAY ** rnd, seed=rnd * 100 + node)
                update = get_weights(self.model)
                if attacker:
                    update = poison(attack, base, update, noise)
                updates.append((update, len(x)))
            global_model = strategy.aggregate(global_model, updates)
        set_weights(self.model, split_state(global_model)[0])
        return 100 * evaluate(self.model, self.data.test_x, self.data.test_y).accuracy


def poison(attack: str, base: dict, update: dict, rng: np.random.Generator) -> dict:
    """An attacker's update from its honest one (label flipping happens in training)."""
    if attack == "sign-flip":  # the delta reversed and x5: FedAvg then moves backwards
        return {k: (base[k] - 5 * (update[k] - base[k])).astype(update[k].dtype)
                for k in update}
    if attack == "scale":
        return {k: (base[k] + 100 * (update[k] - base[k])).astype(update[k].dtype)
                for k in update}
    if attack == "noise":  # N(0, 1) per weight: the MLP's weights are ~0.1
        return {k: (base[k] + rng.normal(0.0, 1.0, base[k].shape)).astype(update[k].dtype)
                for k in update}
    return update


@pytest.fixture(scope="module")
def federation() -> tuple[DigitsFederation, dict[str, float]]:
    """The federation and its clean runs (no attackers), shared by every attack."""
    fed = DigitsFederation()
    return fed, {"fedavg": fed.run(FedAvg()), "krum": fed.run(Krum(f=2))}


@pytest.mark.slow
@pytest.mark.parametrize("attack", ["sign-flip", "scale", "noise", "label-flip"])
def test_robust_strategies_withstand_two_attackers_of_ten(federation, attack) -> None:
    """Two of ten digits nodes attack; trimmed mean and Multi-Krum keep the clean accuracy.

    Measured at these seeds (test accuracy %, 360 test digits, so 1 digit = 0.28 points):
    clean FedAvg 95.8, clean Krum 94.4; under attack FedAvg / TrimmedMean(0.2) / Krum(2) /
    Multi-Krum(2): sign flip 10.0 / 94.2 / 92.8 / 95.3, x100 scaling 10.0 / 96.1 / 92.8 /
    95.3, noise 76.4 / 95.3 / 92.8 / 95.3, label flip 94.4 / 95.3 / 92.8 / 95.3.
    Re-measured with model seeds 1-3 to size the bounds:

    - TrimmedMean(beta=0.2) stays within 3 points of clean FedAvg. Sign flip is its
      closest case (1.6 points here, up to 3.4 at other seeds): with both attackers at
      one end of a coordinate, trimming also drops the two honest values at the other
      end, which biases the mean towards the attackers and slows learning.
    - Krum(f=2) never selects an attacker (its accuracy is the same under every attack),
      so we assert it stays within 3 points of clean Krum. It is NOT within 3 points of
      clean FedAvg, as one might hope: its model is one node's update, trained on a
      tenth of the data, which costs 1.4-5.2 points without attackers and 3.0-5.0 with
      them at seeds 0-3, so we bound that price at 6 points. Multi-Krum(f=2), averaging
      the n - f = 8 best, pays no such price: within 3 points of clean FedAvg (at most
      0.9 points off under attack at seeds 0-3).
    - FedAvg is ruined by sign flip and scaling (chance level) and loses ~20 points to
      noise: asserted at least 5 points below clean.
    - Label flipping (y -> 9 - y) by 2 of 10 nodes barely hurts FedAvg: 1.4 points here
      (1.4-3.8 at seeds 0-3), since eight honest shards outvote two wrong ones. We assert
      the robust averages stay within 3 points of clean and beat FedAvg; their margin is
      small (0.9 points, 3 test digits, here; 0.9-3.6 at seeds 0-3). Krum is below
      FedAvg in this case (its price above exceeds what the flippers cost FedAvg).
    """
    fed, clean = federation
    got = {s.name: fed.run(s, attack)
           for s in (FedAvg(), TrimmedMean(beta=0.2), Krum(f=2), MultiKrum(f=2))}
    print(f"\n{attack}: clean fedavg {clean['fedavg']:.1f}, clean krum {clean['krum']:.1f}"
          + "".join(f", {k} {v:.1f}" for k, v in got.items()))
    assert clean["fedavg"] >= 90.0
    assert got["trimmed-mean"] >= clean["fedavg"] - 3.0
    assert got["multi-krum"] >= clean["fedavg"] - 3.0
    assert got["krum"] >= clean["krum"] - 3.0
    assert got["krum"] >= clean["fedavg"] - 6.0
    if attack == "label-flip":
        assert got["fedavg"] < got["trimmed-mean"] and got["fedavg"] < got["multi-krum"]
    else:
        assert got["fedavg"] <= clean["fedavg"] - 5.0
