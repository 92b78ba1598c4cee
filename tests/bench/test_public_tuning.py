"""The public-data lr tuning of bench.dp_utility: its in-process federated probe learns, and its
DP rows really are noised (a broken DP path would score like the non-DP one)."""

import torch

from bench.public_tuning import Features, Plan, federated_probe
from models import TASKS


def _separable(n: int, seed: int) -> Features:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=g)
    centres = torch.eye(3, 8) * 4.0
    features = centres[labels] + torch.randn(n, 8, generator=g)
    return Features(features, torch.ones(n, 4, dtype=torch.bool), labels)


def test_federated_probe_learns_and_dp_rows_pay_for_privacy():
    sites = [_separable(60, seed) for seed in range(3)]
    held_out = _separable(200, 99)
    task = TASKS.build("classification", {"num_classes": 3})
    plan = Plan(rounds=3, local_epochs=2, batch_size=16, delta=1e-5, max_grad_norm=1.0)

    clean = federated_probe(sites, held_out, task, plan, lr=3e-2, epsilon=None, seed=0)
    noisy = federated_probe(sites, held_out, task, plan, lr=3e-2, epsilon=0.3, seed=0)
    assert clean > 0.9
    assert noisy < clean - 0.2
