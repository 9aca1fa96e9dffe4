"""Accuracy against privacy on digits: 3 nodes, IID shards, FedAvg in-process.

For each target epsilon the noise multiplier is derived for the planned run (rounds x
local epochs x Poisson steps per epoch, at the shard's real sample rate); each node keeps
its own ``PrivacyLedger`` across rounds, and "epsilon reached" is the largest node
epsilon after the last round. The "no DP" row is plain SGD (``ml.training.train_local``)
with the same rounds, epochs, batch size and learning rate. Run:

    .venv/bin/python scripts/bench_dp.py [--rounds 10] [--model mlp]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ml.datasets import load_dataset  # noqa: E402
from ml.models import build_model  # noqa: E402
from ml.partition import partition_indices  # noqa: E402
from ml.privacy import DPConfig, PrivacyLedger, poisson_schedule, train_local_dp  # noqa: E402
from ml.strategies import fedavg  # noqa: E402
from ml.training import evaluate, train_local  # noqa: E402
from ml.weights import get_weights, set_weights  # noqa: E402


def run(target: float | None, args: argparse.Namespace) -> tuple[float, float, float, float]:
    """One federation; returns (epsilon reached, noise multiplier, accuracy, seconds)."""
    data = load_dataset("digits", seed=args.seed)
    shards = []
    for i in range(args.nodes):
        idx = torch.from_numpy(partition_indices(data.train_y.numpy(), args.nodes, i,
                                                 scheme="iid", seed=args.seed))
        shards.append((data.train_x[idx], data.train_y[idx]))
    torch.manual_seed(args.seed)
    model = build_model(args.model, data.input_shape, data.num_classes)
    global_weights = get_weights(model)
    config = DPConfig(target_epsilon=target, delta=args.delta,
                      max_grad_norm=args.max_grad_norm) if target is not None else None
    ledgers = [PrivacyLedger() for _ in shards]
    noises = []
    for x, _ in shards:
        rate, per_epoch = poisson_schedule(len(x), args.batch_size)
        noises.append(config.resolve_noise_multiplier(
            sample_rate=rate, planned_steps=args.rounds * args.epochs * per_epoch)
            if config is not None else 0.0)
    start = time.perf_counter()
    for rnd in range(args.rounds):
        updates = []
        for i, (x, y) in enumerate(shards):
            set_weights(model, global_weights)
            seed = args.seed * 1_000_003 + i * 10_007 + rnd
            if config is None:
                train_local(model, x, y, epochs=args.epochs, batch_size=args.batch_size,
                            lr=args.lr, seed=seed)
            else:
                train_local_dp(model, x, y, epochs=args.epochs, batch_size=args.batch_size,
                               lr=args.lr, seed=seed, ledger=ledgers[i],
                               noise_multiplier=noises[i],
                               max_grad_norm=config.max_grad_norm, delta=config.delta)
            updates.append((get_weights(model), len(x)))
        global_weights = fedavg(updates)
    seconds = time.perf_counter() - start
    set_weights(model, global_weights)
    accuracy = evaluate(model, data.test_x, data.test_y).accuracy
    eps = max(ledger.epsilon(args.delta) for ledger in ledgers)
    return eps, max(noises), accuracy, seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--epochs", type=int, default=1, help="local epochs per round")
    p.add_argument("--batch-size", type=int, default=64, help="expected Poisson batch size")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--model", default="mlp")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--targets", default="1,3,8,none",
                   help="comma-separated target epsilons; 'none' = no DP")
    args = p.parse_args()
    torch.set_num_threads(1)
    print(f"digits, {args.nodes} nodes (IID), FedAvg, {args.rounds} rounds x {args.epochs}"
          f" local epoch(s), model {args.model}, batch {args.batch_size}, lr {args.lr},"
          f" C {args.max_grad_norm}, delta {args.delta}")
    print(f"{'target eps':>10} {'eps reached':>11} {'noise':>7} {'accuracy':>8} {'seconds':>7}")
    for t in args.targets.split(","):
        target = None if t.strip().lower() == "none" else float(t)
        eps, noise, acc, secs = run(target, args)
        if target is None:
            print(f"{'no DP':>10} {'inf':>11} {'-':>7} {acc:8.3f} {secs:7.1f}")
        else:
            print(f"{target:10g} {eps:11.3f} {noise:7.3f} {acc:8.3f} {secs:7.1f}")


if __name__ == "__main__":
    main()
