"""What ``--compress`` costs in accuracy and saves in bytes, on FedAvg over the digits data.

Runs the same in-process federation once per mode: ``--nodes`` nodes on IID shards of the
bundled digits data set, ``--rounds`` rounds of ``--epochs`` local epochs, FedAvg weighted by
shard size. Each node's update is sent as ``base + decode(encode(update - base))``
(ml/compress.py), with error feedback for the modes marked so. Per mode it prints the
payload bytes of one update (mean over nodes and rounds; tensor data only, names and
framing are extra), the ratio to the float32 update, the test accuracy after the last
round and the seconds spent encoding and decoding.

    .venv/bin/python scripts/bench_compress.py
    .venv/bin/python scripts/bench_compress.py --model mlp --rounds 20 --nodes 5
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ml.datasets import load_dataset  # noqa: E402
from ml.models import build_model  # noqa: E402
from ml.partition import partition_indices  # noqa: E402
from ml.strategies import fedavg  # noqa: E402
from ml.training import evaluate, train_local  # noqa: E402
from ml.weights import get_weights, set_weights  # noqa: E402
from node.common.compress import (  # noqa: E402
    ErrorFeedback,
    apply_delta,
    parse_codec,
    payload_nbytes,
    spec_of,
    weights_delta,
)

#: (codec, error feedback) per table row.
MODES = [("none", False), ("fp16", False), ("int8", False), ("topk:0.1", True),
         ("topk:0.01", True), ("topk:0.1", False), ("topk:0.01", False)]


@dataclass(frozen=True)
class Result:
    """One mode's run."""

    label: str
    bytes_per_update: float
    fp32_bytes: int
    accuracy_by_round: list[float]
    codec_seconds: float


def run(spec: str, error_feedback: bool, args: argparse.Namespace) -> Result:
    """One federation with every update compressed by ``spec``."""
    data = load_dataset("digits")
    labels = data.train_y.numpy()
    shards = [torch.from_numpy(partition_indices(labels, args.nodes, i, seed=args.seed))
              for i in range(args.nodes)]
    torch.manual_seed(args.seed)
    model = build_model(args.model, data.input_shape, data.num_classes)
    global_weights = get_weights(model)
    tensor_spec = spec_of(global_weights)
    codec = parse_codec(spec)
    feedback = [ErrorFeedback(codec) for _ in range(args.nodes)]
    sizes, accuracy, codec_seconds = [], [], 0.0
    for r in range(args.rounds):
        updates = []
        for i, idx in enumerate(shards):
            set_weights(model, global_weights)
            train_local(model, data.train_x[idx], data.train_y[idx], epochs=args.epochs,
                        batch_size=args.batch_size, lr=args.lr, seed=1000 * r + i)
            delta = weights_delta(get_weights(model), global_weights)
            start = time.perf_counter()
            payload = feedback[i].compress(delta) if error_feedback else codec.encode(delta)
            decoded = codec.decode(payload, tensor_spec)
            codec_seconds += time.perf_counter() - start
            sizes.append(payload_nbytes(payload))
            updates.append((apply_delta(global_weights, decoded), len(idx)))
        global_weights = fedavg(updates)
        set_weights(model, global_weights)
        accuracy.append(evaluate(model, data.test_x, data.test_y).accuracy)
    label = codec.name + (" +EF" if error_feedback else "")
    return Result(label, float(np.mean(sizes)), payload_nbytes(global_weights), accuracy,
                  codec_seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cnn", help="cnn, mlp or linear (default cnn)")
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=1, help="local epochs per round")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)  # reproducible, and what the tests use

    print(f"digits, model {args.model}, {args.nodes} nodes (IID), {args.rounds} rounds of"
          f" {args.epochs} epoch(s), FedAvg")
    header = (f"{'mode':<16}{'bytes/update':>14}{'vs fp32':>9}{'final acc':>11}"
              f"{'best acc':>10}{'codec s':>9}")
    print(header)
    print("-" * len(header))
    for spec, ef in MODES:
        res = run(spec, ef, args)
        print(f"{res.label:<16}{res.bytes_per_update:>14,.0f}"
              f"{res.bytes_per_update / res.fp32_bytes:>9.3f}"
              f"{res.accuracy_by_round[-1]:>11.4f}{max(res.accuracy_by_round):>10.4f}"
              f"{res.codec_seconds:>9.3f}")
        print(f"{'':<16}accuracy by round: "
              + " ".join(f"{a:.3f}" for a in res.accuracy_by_round))


if __name__ == "__main__":
    main()
