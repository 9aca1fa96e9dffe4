"""Aggregation strategies on small vectors with hand-computed answers, their parser, and
FedAdam/FedYogi state travelling in the model."""

from __future__ import annotations

import numpy as np
import pytest

from ml.strategies import (
    STATE_PREFIX,
    Clipped,
    FedAdam,
    FedAvg,
    FedYogi,
    Krum,
    Median,
    MultiKrum,
    TrimmedMean,
    parse_strategy,
    split_state,
)


def w(*values: float) -> dict[str, np.ndarray]:
    return {"w": np.array(values, np.float32)}


BASE = w(0.0, 0.0)


def test_fedavg_reference_value() -> None:
    out = FedAvg().aggregate(BASE, [(w(1, 2), 10), (w(3, -2), 30)])
    assert out["w"].tolist() == [2.5, -1.0]


def test_median_is_coordinate_wise_and_unweighted() -> None:
    ups = [(w(1, 10), 1), (w(2, -5), 100), (w(100, 0), 1)]
    assert Median().aggregate(BASE, ups)["w"].tolist() == [2.0, 0.0]


def test_trimmed_mean_drops_the_extremes_of_each_coordinate() -> None:
    ups = [(w(x, -x), 1) for x in (1, 2, 3, 4, 1000)]
    # beta 0.2 of 5 cuts one value at each end: mean of 2, 3, 4 (and of -4, -3, -2)
    assert TrimmedMean(beta=0.2).aggregate(BASE, ups)["w"].tolist() == [3.0, -3.0]


def test_krum_picks_the_update_closest_to_its_neighbours_not_the_outlier() -> None:
    close = [w(1.0, 1.0), w(1.1, 0.9), w(0.9, 1.1), w(1.05, 1.0), w(0.95, 0.95)]
    ups = [(u, 1) for u in close] + [(w(50.0, -50.0), 1)]
    out = Krum(f=1).aggregate(BASE, ups)["w"]
    assert any(np.array_equal(out, u["w"]) for u in close)
    assert abs(out[0] - 1.0) < 0.2


def test_multi_krum_averages_the_m_best_weighted_by_examples() -> None:
    ups = [(w(1, 1), 10), (w(3, 3), 30), (w(2, 2), 20), (w(2.5, 2.5), 40), (w(90, 90), 40)]
    # f=1, n=5: scores sum the n-f-2 = 2 nearest; the outlier's is the worst by far
    out = MultiKrum(f=1, m=4).aggregate(BASE, ups)["w"]
    np.testing.assert_allclose(out, [(10 * 1 + 30 * 3 + 20 * 2 + 40 * 2.5) / 100] * 2,
                               rtol=1e-6)


def test_krum_needs_more_than_2f_plus_2_updates() -> None:
    with pytest.raises(ValueError, match="f"):
        Krum(f=2).aggregate(BASE, [(w(1, 1), 1)] * 6)


def test_clipping_scales_a_long_change_to_the_bound_and_keeps_a_short_one() -> None:
    ups = [(w(30, 40), 1), (w(0.3, 0.4), 1)]  # changes of norm 50 and 0.5
    clipped = Clipped(FedAvg(), max_norm=5.0).aggregate(BASE, ups)["w"]
    np.testing.assert_allclose(clipped, [(3 + 0.3) / 2, (4 + 0.4) / 2], rtol=1e-6)


def test_fedadam_two_rounds_by_hand_with_its_state_carried_in_the_model() -> None:
    eta, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    s = FedAdam(eta=eta, b1=b1, b2=b2, tau=tau)
    x0 = w(1.0, -1.0)
    r1 = s.aggregate(x0, [(w(2.0, -1.0), 1), (w(2.0, 1.0), 1)])
    d = np.array([1.0, 1.0])  # mean update minus base
    m, v = (1 - b1) * d, (1 - b2) * d ** 2
    x1 = np.array([1.0, -1.0]) + eta * m / (np.sqrt(v) + tau)
    model, state = split_state(r1)
    np.testing.assert_allclose(model["w"], x1, rtol=1e-5)
    np.testing.assert_allclose(state[f"{STATE_PREFIX}m.w"], m, rtol=1e-5)
    np.testing.assert_allclose(state[f"{STATE_PREFIX}v.w"], v, rtol=1e-5)
    # round 2, by another aggregator (a fresh object): the state comes from the model
    r2 = FedAdam(eta=eta, b1=b1, b2=b2, tau=tau).aggregate(r1, [(w(*(x1 - 1.0)), 1)])
    d2 = -np.ones(2)
    m2, v2 = b1 * m + (1 - b1) * d2, b2 * v + (1 - b2) * d2 ** 2
    np.testing.assert_allclose(split_state(r2)[0]["w"], x1 + eta * m2 / (np.sqrt(v2) + tau),
                               rtol=1e-5)


def test_fedyogi_updates_v_with_the_sign_rule() -> None:
    eta, b2, tau = 0.1, 0.99, 1e-3
    r1 = FedYogi(eta=eta, b2=b2, tau=tau).aggregate(w(0.0), [(w(2.0), 1)])
    v = split_state(r1)[1][f"{STATE_PREFIX}v.w"]
    # v0 = 0: v1 = 0 - (1-b2) * d^2 * sign(0 - d^2) = (1-b2) * 4
    np.testing.assert_allclose(v, [(1 - b2) * 4.0], rtol=1e-5)


def test_state_tensors_pass_through_fedavg_untouched() -> None:
    base = {**w(0.0), f"{STATE_PREFIX}m.w": np.array([0.5], np.float32)}
    out = FedAvg().aggregate(base, [(w(1.0), 1), (w(3.0), 1)])
    assert out["w"].tolist() == [2.0] and out[f"{STATE_PREFIX}m.w"].tolist() == [0.5]


@pytest.mark.parametrize(("spec", "params", "kind"), [
    ("fedavg", {}, FedAvg), ("FedAvg", {}, FedAvg), ("trimmed_mean", {"beta": 0.1}, TrimmedMean),
    ("median", {}, Median), ("krum", {"f": 2}, Krum), ("multi-krum", {"f": 1, "m": 3}, MultiKrum),
    ("fedadam", {"eta": 0.05}, FedAdam), ("fedyogi", {}, FedYogi),
    ("median", {"clip_norm": 3.0}, Clipped),
    ("tests.ml.custom_strategy:KeepFirst", {}, object),
])
def test_parse_strategy_builds_every_kind(spec, params, kind) -> None:
    strategy = parse_strategy(spec, **params)
    assert isinstance(strategy, kind) and hasattr(strategy, "aggregate")


def test_a_custom_strategy_is_used_as_written() -> None:
    s = parse_strategy("tests.ml.custom_strategy:KeepFirst")
    assert s.aggregate(BASE, [(w(7, 7), 1), (w(1, 1), 1)])["w"].tolist() == [7.0, 7.0]


@pytest.mark.parametrize(("spec", "params", "match"), [
    ("nope", {}, "unknown strategy"),
    ("", {}, "empty"),
    ("krum", {"beta": 0.2}, "does not use beta"),
    ("trimmed-mean", {"beta": 0.7}, "beta"),
    ("no.such.module:Thing", {}, "module"),
    ("tests.ml.custom_strategy:Missing", {}, "Missing"),
])
def test_bad_strategy_specs_are_clear_value_errors(spec, params, match) -> None:
    with pytest.raises(ValueError, match=match):
        parse_strategy(spec, **params)


def test_a_learner_falls_back_to_the_median_when_its_strategy_cannot_run() -> None:
    from ml.learner import TorchLearner

    learner = TorchLearner(dataset="synthetic", model="linear", strategy=Krum(f=2))
    base = learner.initial_weights()
    ups = [({k: v + i for k, v in base.items()}, 1) for i in (0.0, 1.0, 5.0)]  # n=3 <= 2f+2
    out = learner.aggregate(base, ups)
    for k, v in base.items():
        np.testing.assert_allclose(out[k], v + 1.0, rtol=1e-6)
