"""ML test setup: one torch thread (fast and reproducible on small CPUs), shared helpers."""

from __future__ import annotations

import torch

torch.set_num_threads(1)
