"""Local DP-SGD and the node's lifetime privacy ledger (ml.privacy)."""

from __future__ import annotations

import json
import math
import pickle
import stat
import threading
from functools import cache
from itertools import pairwise

import pytest
import torch
from opacus.accountants import RDPAccountant
from torch import nn

from ml.datasets import load_dataset
from ml.models import build_model
from ml.partition import partition_indices
from ml.privacy import DPConfig, PrivacyLedger, check_model_for_dp, poisson_schedule, train_local_dp
from ml.training import evaluate
from ml.weights import get_weights, set_weights, weights_to_bytes

DELTA = 1e-5


@cache
def digits():
    return load_dataset("digits")


def shard(index: int = 0, count: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    data = digits()
    idx = torch.from_numpy(partition_indices(data.train_y.numpy(), count, index, seed=0))
    return data.train_x[idx], data.train_y[idx]


def fresh(name: str = "mlp") -> nn.Module:
    torch.manual_seed(0)
    return build_model(name, digits().input_shape, digits().num_classes)


def dp_round(model: nn.Module, ledger: PrivacyLedger, rnd: int, x=None, y=None, **kw):
    if x is None:
        x, y = shard()
    args = dict(epochs=1, batch_size=64, lr=0.1, seed=rnd, ledger=ledger,
                noise_multiplier=1.0, max_grad_norm=1.0, delta=DELTA)
    args.update(kw)
    return train_local_dp(model, x, y, **args)


# --- the ledger -------------------------------------------------------------------

def test_ledger_reproduces_the_opacus_rdp_figure() -> None:
    ledger = PrivacyLedger()
    ledger.record(1.5, 0.04, 2250)
    eps = ledger.epsilon(DELTA)
    print(f"noise 1.5, rate 0.04, 2250 steps, delta 1e-5: epsilon {eps!r}")
    assert abs(eps - 7.33) < 0.05
    reference = RDPAccountant()
    reference.history = [(1.5, 0.04, 2250)]
    assert eps == reference.get_epsilon(DELTA)


def test_an_empty_ledger_has_spent_nothing() -> None:
    assert PrivacyLedger().epsilon(DELTA) == 0.0
    assert PrivacyLedger().total_steps == 0


def test_rounds_recorded_one_by_one_equal_all_steps_at_once() -> None:
    rounds = PrivacyLedger()
    for _ in range(9):
        rounds.record(1.5, 0.04, 250)
    once = PrivacyLedger([(1.5, 0.04, 2250)])
    assert rounds.history == [(1.5, 0.04, 2250)]  # merged like RDPAccountant.step
    assert rounds.epsilon(DELTA) == once.epsilon(DELTA)


def test_epsilon_never_decreases_as_rounds_are_recorded() -> None:
    ledger = PrivacyLedger()
    seen = [ledger.epsilon(DELTA)]
    for noise, rate in [(1.0, 0.05), (1.0, 0.05), (2.0, 0.05), (2.0, 0.1), (5.0, 0.01)]:
        ledger.record(noise, rate, 30)
        seen.append(ledger.epsilon(DELTA))
    assert all(b > a for a, b in pairwise(seen)), seen
    assert len(ledger.history) == 4  # different noise or rate: a new entry


def test_epsilon_after_predicts_without_recording() -> None:
    ledger = PrivacyLedger([(1.0, 0.05, 100)])
    before = ledger.history
    predicted = ledger.epsilon_after(1.0, 0.05, 20, DELTA)
    assert ledger.history == before
    ledger.record(1.0, 0.05, 20)
    assert predicted == ledger.epsilon(DELTA)


@pytest.mark.parametrize("entry", [(0.0, 0.1, 1), (-1.0, 0.1, 1), (math.nan, 0.1, 1),
                                   (math.inf, 0.1, 1), (1.0, 0.0, 1), (1.0, 1.5, 1),
                                   (1.0, math.nan, 1), (1.0, 0.1, -1), (1.0, 0.1, 2.0),
                                   (1.0, 0.1, True), ("1", 0.1, 1)])
def test_record_rejects_impossible_entries(entry: tuple) -> None:
    with pytest.raises(ValueError):
        PrivacyLedger().record(*entry)


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, math.nan])
def test_epsilon_rejects_a_bad_delta(delta: float) -> None:
    with pytest.raises(ValueError, match="delta"):
        PrivacyLedger([(1.0, 0.1, 10)]).epsilon(delta)


def test_json_round_trip_is_exact() -> None:
    ledger = PrivacyLedger([(1.0600341796875, 1 / 15, 150), (0.7, 0.1, 3)])
    back = PrivacyLedger.from_json(ledger.to_json())
    assert back == ledger
    assert back.epsilon(DELTA) == ledger.epsilon(DELTA)


def _doc(history: object) -> str:
    return json.dumps({"format": "fl-node/privacy-ledger", "version": 1,
                       "accountant": "rdp", "history": history})


@pytest.mark.parametrize("text", [
    "not json",
    "",
    "[]",
    json.dumps({"history": []}),
    _doc([]).replace('"version": 1', '"version": 2'),
    _doc([]).replace('"rdp"', '"prv"'),
    _doc([]).replace("}", ', "extra": 1}'),
    _doc({"a": 1}),
    _doc([[1.0, 0.1]]),
    _doc([[1.0, 0.1, 5, 1]]),
    _doc([1.0, 0.1, 5]),
    _doc([[-1.0, 0.1, 5]]),
    _doc([[1.0, 0.1, -5]]),
    _doc([[1.0, 0.1, 5.5]]),
    _doc([[1.0, 1.5, 5]]),
    _doc([[0, 0.1, 5]]),
    _doc([[True, 0.1, 5]]),
    _doc([["1.0", 0.1, 5]]),
    _doc([[1.0, 0.1, None]]),
    _doc([[1.0, 0.1, 5]]).replace("1.0", "NaN"),
    _doc([[1.0, 0.1, 5]]).replace("1.0", "Infinity"),
    _doc([[1.0, 0.1, 5]]).replace("0.1", "-Infinity"),
    "[" * 100_000,
], ids=lambda t: t[:40])
def test_from_json_rejects_corrupt_ledgers(text: str) -> None:
    with pytest.raises(ValueError):
        PrivacyLedger.from_json(text)


def test_from_json_rejects_a_pickle_blob() -> None:
    blob = pickle.dumps(PrivacyLedger([(1.0, 0.1, 5)]).history)
    with pytest.raises(ValueError):
        PrivacyLedger.from_json(blob)


def test_save_is_owner_only_and_load_reads_it_back(tmp_path) -> None:
    path = tmp_path / "privacy.json"
    ledger = PrivacyLedger([(1.2, 0.05, 40)])
    ledger.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert PrivacyLedger.load(path) == ledger
    ledger.record(1.2, 0.05, 10)
    ledger.save(path)  # replaces the old file
    assert PrivacyLedger.load(path).history == [(1.2, 0.05, 50)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["privacy.json"]  # no temp files


def test_save_failure_leaves_the_old_file(tmp_path, monkeypatch) -> None:
    path = tmp_path / "privacy.json"
    PrivacyLedger([(1.0, 0.1, 5)]).save(path)

    def broken_replace(src, dst):
        raise OSError("disk on fire")

    monkeypatch.setattr("os.replace", broken_replace)
    with pytest.raises(OSError):
        PrivacyLedger([(1.0, 0.1, 99)]).save(path)
    monkeypatch.undo()
    assert PrivacyLedger.load(path).history == [(1.0, 0.1, 5)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["privacy.json"]


def test_load_of_a_missing_file_is_an_empty_ledger(tmp_path) -> None:
    assert PrivacyLedger.load(tmp_path / "nope.json").history == []


def test_load_of_a_corrupt_file_names_the_path(tmp_path) -> None:
    path = tmp_path / "privacy.json"
    path.write_text(_doc([[1.0, 0.1, -3]]))
    with pytest.raises(ValueError, match=r"privacy\.json.*steps"):
        PrivacyLedger.load(path)


# --- configuration ------------------------------------------------------------------

@pytest.mark.parametrize("kw, match", [
    ({}, "target_epsilon"),
    ({"target_epsilon": 0.0}, "target_epsilon"),
    ({"target_epsilon": math.inf}, "target_epsilon"),
    ({"target_epsilon": 3, "delta": 0}, "delta"),
    ({"target_epsilon": 3, "delta": 1}, "delta"),
    ({"target_epsilon": 3, "max_grad_norm": 0}, "max_grad_norm"),
    ({"noise_multiplier": -1.0}, "noise_multiplier"),
    ({"noise_multiplier": math.nan}, "noise_multiplier"),
])
def test_dpconfig_rejects_bad_settings(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DPConfig(**kw)


def test_dpconfig_defaults() -> None:
    c = DPConfig(target_epsilon=3)
    assert (c.delta, c.max_grad_norm, c.noise_multiplier) == (1e-5, 1.0, None)
    assert DPConfig(noise_multiplier=1.1).resolve_noise_multiplier(
        sample_rate=0.1, planned_steps=10) == 1.1


def test_check_delta_wants_delta_below_one_over_n() -> None:
    DPConfig(target_epsilon=3, delta=1e-5).check_delta(479)
    with pytest.raises(ValueError, match="1/N"):
        DPConfig(target_epsilon=3, delta=0.01).check_delta(479)


def test_noise_derived_from_target_epsilon_spends_the_budget_over_the_plan() -> None:
    config = DPConfig(target_epsilon=3.0)
    rate, per_epoch = poisson_schedule(479, 64)
    planned = 10 * per_epoch
    noise = config.resolve_noise_multiplier(sample_rate=rate, planned_steps=planned)
    ledger = PrivacyLedger()
    for _ in range(10):
        assert config.within_budget(ledger, noise_multiplier=noise, sample_rate=rate,
                                    steps=per_epoch)
        ledger.record(noise, rate, per_epoch)
    eps = ledger.epsilon(config.delta)
    print(f"target 3: noise {noise:.4f}, epsilon after {planned} steps {eps:.4f}")
    assert 3.0 * 0.95 <= eps <= 3.0
    # The plan is spent: one more round would exceed the budget.
    assert not config.within_budget(ledger, noise_multiplier=noise, sample_rate=rate,
                                    steps=per_epoch)


def test_poisson_schedule_matches_opacus() -> None:
    assert poisson_schedule(479, 64) == (1 / 8, 8)
    assert poisson_schedule(100, 1000) == (1.0, 1)
    # Opacus takes int(1 / rate) steps, which float rounding makes 92 for 93 batches.
    assert poisson_schedule(93, 1) == (1 / 93, 92)


# --- models -------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["cnn", "mlp", "linear"])
def test_fl_node_models_are_dp_compatible(name: str) -> None:
    model = fresh(name)
    model.eval()
    check_model_for_dp(model)
    assert not model.training  # mode left alone


def test_batchnorm_is_rejected_with_the_layer_named() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 36, 10))
    with pytest.raises(ValueError, match=r"layer '1' \(BatchNorm2d\).*GroupNorm"):
        check_model_for_dp(model)
    nested = nn.Module()
    nested.features = model
    with pytest.raises(ValueError, match=r"'features\.1' \(BatchNorm2d\)"):
        check_model_for_dp(nested)


def test_train_local_dp_refuses_batchnorm_before_spending_budget() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(),
                          nn.Linear(4 * 36, 10))
    ledger = PrivacyLedger()
    with pytest.raises(ValueError, match="BatchNorm2d"):
        dp_round(model, ledger, 0)
    assert ledger.history == []


# --- training -----------------------------------------------------------------------

def test_train_local_dp_records_its_steps_and_returns_a_plain_model() -> None:
    x, y = shard()
    model = fresh("cnn")
    ledger = PrivacyLedger()
    stats = dp_round(model, ledger, 0, x, y, epochs=2)
    rate, per_epoch = poisson_schedule(len(x), 64)
    assert (stats.num_examples, stats.steps, stats.sample_rate) == (len(x), 2 * per_epoch, rate)
    assert ledger.history == [(1.0, rate, 2 * per_epoch)]
    assert stats.epsilon == ledger.epsilon(DELTA) > 0
    assert math.isfinite(stats.loss) and not stats.stopped
    # The caller's model is a plain module again: no Opacus hooks or per-sample grads.
    assert type(model).__name__ == "SmallCNN"
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())
    set_weights(model, get_weights(fresh("cnn")))
    assert evaluate(model, x, y).num_examples == len(x)


def test_stop_flag_ends_the_round_and_spends_nothing_more() -> None:
    stop = threading.Event()
    stop.set()
    ledger = PrivacyLedger([(1.0, 0.125, 8)])
    model = fresh()
    before = weights_to_bytes(get_weights(model))
    stats = dp_round(model, ledger, 0, stop=stop)
    assert stats.stopped and stats.steps == 0
    assert ledger.history == [(1.0, 0.125, 8)]
    assert weights_to_bytes(get_weights(model)) == before


class StopAfter(threading.Event):
    """A stop flag that turns on after ``n`` checks (a stop in the middle of a round)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.left = n

    def is_set(self) -> bool:
        self.left -= 1
        return self.left < 0


def test_a_round_stopped_midway_records_the_steps_it_took() -> None:
    ledger = PrivacyLedger()
    stats = dp_round(fresh(), ledger, 0, stop=StopAfter(3))
    assert stats.stopped and stats.steps == 3
    assert ledger.history == [(1.0, 0.125, 3)]


def test_a_failing_round_still_records_the_steps_it_took() -> None:
    class Flaky(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(64, 10)
            self.calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            if self.calls > 2:
                raise RuntimeError("boom")
            return self.fc(x.flatten(1))

    model = Flaky()
    before = weights_to_bytes(get_weights(model))
    ledger = PrivacyLedger()
    with pytest.raises(RuntimeError, match="boom"):
        dp_round(model, ledger, 0)
    assert ledger.total_steps == 2  # spent, though nothing was published
    assert weights_to_bytes(get_weights(model)) == before  # the caller's model untouched


def test_empty_poisson_batches_take_noise_only_steps() -> None:
    x, y = shard()
    x, y = x[:10], y[:10]  # rate 1/10: about a third of the batches are empty
    ledger = PrivacyLedger()
    model = fresh()
    stats = dp_round(model, ledger, 0, x, y, batch_size=1, epochs=3)
    assert stats.steps == 30 and ledger.history == [(1.0, 0.1, 30)]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_same_seed_gives_identical_weights() -> None:
    a, b = fresh(), fresh()
    dp_round(a, PrivacyLedger(), 7)
    dp_round(b, PrivacyLedger(), 7)
    assert weights_to_bytes(get_weights(a)) == weights_to_bytes(get_weights(b))
    c = fresh()
    dp_round(c, PrivacyLedger(), 8)
    assert weights_to_bytes(get_weights(c)) != weights_to_bytes(get_weights(a))


def test_no_seed_draws_fresh_noise() -> None:
    a, b = fresh(), fresh()
    dp_round(a, PrivacyLedger(), None)
    dp_round(b, PrivacyLedger(), None)
    assert weights_to_bytes(get_weights(a)) != weights_to_bytes(get_weights(b))


def test_epsilon_survives_a_restart(tmp_path) -> None:
    path = tmp_path / "privacy.json"
    model = fresh()
    ledger = PrivacyLedger.load(path)  # a new node: empty
    for rnd in range(2):
        dp_round(model, ledger, rnd)
    after_two = ledger.epsilon(DELTA)
    ledger.save(path)
    saved_weights = get_weights(model)
    del ledger

    restarted = PrivacyLedger.load(path)  # a fresh process reads the file
    model2 = fresh()
    set_weights(model2, saved_weights)
    final = dp_round(model2, restarted, 2).epsilon

    straight = PrivacyLedger()
    model3 = fresh()
    for rnd in range(3):
        dp_round(model3, straight, rnd)
    assert abs(final - straight.epsilon(DELTA)) < 1e-9
    assert final > after_two
    assert weights_to_bytes(get_weights(model2)) == weights_to_bytes(get_weights(model3))
    # A fresh engine per round would have reported the 1-round epsilon: far smaller.
    noise, rate, steps = straight.history[0]
    assert final > 1.3 * PrivacyLedger([(noise, rate, steps // 3)]).epsilon(DELTA)


def test_dp_training_learns_digits_and_epsilon_grows() -> None:
    data = digits()
    model = fresh("mlp")
    ledger = PrivacyLedger()
    epsilons, accuracies = [], []
    for rnd in range(5):
        stats = dp_round(model, ledger, rnd, data.train_x, data.train_y)
        epsilons.append(stats.epsilon)
        accuracies.append(evaluate(model, data.test_x, data.test_y).accuracy)
    print(f"DP-SGD digits mlp, noise 1.0, C 1.0: accuracy {accuracies}, epsilon {epsilons}")
    assert all(math.isfinite(e) for e in epsilons)
    assert all(b > a for a, b in pairwise(epsilons))
    assert accuracies[-1] >= 0.75
