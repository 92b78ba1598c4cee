"""Utility of distributed vs central site-level DP at equal epsilon (issue 26).

Both arms run the same federated training - ``--sites`` hospitals, each with its own shifted
slice of a synthetic 3-class problem, a small MLP, FedAvg over whole-site updates clipped to
``C`` - at the same noise multiplier ``sigma``, calibrated so that ``--rounds`` releases cost
``--epsilon`` (delta 1e-5): every site books the same ledger rows ``(sigma, 1, 1)`` in both.
Only who adds the noise differs, and each arm runs MedFed's own code for it:

- central (trust the server): the server averages the clipped updates and ``SumNoise`` (the
  server-side option inside SecAgg+) adds ``N(0, (sigma C / n)^2)``;
- distributed (trust no server): a real SecAgg+ round (``SiteSecAgg`` / ``ServerRound``, full
  neighbour graph) in which every site clips, quantises and adds its ``Skellam(V / n)`` share
  from the site CSPRNG before masking, and the server only unmasks and decodes.

``distributed_dp_mcc_ratio`` = mean test MCC (distributed) / mean test MCC (central) over
``--seeds``; goal >= 0.97. A seed's test MCC is the mean over the global models of the last
``LAST`` rounds (the same quantity as the final model's, with less of the noise draw's luck in
it); the final model's MCC and the paired per-seed difference with its standard error are
reported beside it. It is merged into ``bench/results/secagg.json`` (keys of the other
SecAgg benchmarks are kept). The task is deliberately small (seconds per arm): what is
measured is the cost of the discrete, distributed noise against the Gaussian, central one.

    python -m bench.distributed_dp [--sites 20] [--rounds 20] [--epsilon 8] [--seeds 8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
from torch import nn

from client.privacy.noise import SkellamNoise
from client.privacy.secagg import SiteIdentity, SiteSecAgg
from models.metrics import confusion_matrix, mcc
from protocol.accounting import calibrate_noise
from protocol.secagg_encoding import HEADER, noisy_encoding
from protocol.secagg_identity import simulation_key, simulation_registry
from protocol.secagg_protocol import SecAggConfig, ServerRound
from protocol.skellam import NoiseShare
from strategies.secagg import SumNoise

from .common import RESULTS_DIR, commit, machine, update_results_md

RUN = 1                                 # the run id the rounds' keys are signed for

CLASSES, FEATURES, HIDDEN = 3, 32, 32
LAST = 5                                  # rounds whose global models a seed's MCC averages
DELTA = 1e-5


def federation(seed: int, sites: int, per_site: int) -> tuple[list, tuple]:
    """Per-site (X, y) with a site-specific feature shift, and a pooled test set."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1.0, (CLASSES, FEATURES))

    def draw(n, shift):
        y = rng.integers(0, CLASSES, n)
        x = centres[y] + rng.normal(0, 1.6, (n, FEATURES)) + shift
        return torch.tensor(x, dtype=torch.float32), torch.tensor(y)

    data = [draw(per_site, rng.normal(0, 0.3, FEATURES)) for _ in range(sites)]
    return data, draw(4000, 0.0)


def model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, CLASSES))


def flat(m: nn.Module) -> np.ndarray:
    return torch.cat([p.detach().flatten() for p in m.parameters()]).numpy().astype(np.float32)


def load_flat(m: nn.Module, vector: np.ndarray) -> None:
    torch.nn.utils.vector_to_parameters(torch.from_numpy(vector.astype(np.float32)),
                                        m.parameters())


def local_delta(global_weights: np.ndarray, x, y, seed: int, *, epochs=2, lr=0.1,
                batch=32) -> np.ndarray:
    m = model(0)
    load_flat(m, global_weights)
    opt = torch.optim.SGD(m.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(batch):
            opt.zero_grad()
            nn.functional.cross_entropy(m(x[idx]), y[idx]).backward()
            opt.step()
    return flat(m) - global_weights


def clip(delta: np.ndarray, c: float) -> np.ndarray:
    """What a site's ``fixedclipping_mod`` does to its update (central arm)."""
    norm = float(np.linalg.norm(delta))
    return delta * min(1.0, c / norm) if norm > 0 else delta


def central_average(deltas: list[np.ndarray], sigma: float, c: float) -> np.ndarray:
    """The server's CSPRNG Gaussian, as SumNoise draws it in a run (fresh per run, like the
    sites' shares: neither arm's noise luck is fixed across runs of this bench)."""
    noise = SumNoise(noise_multiplier=sigma, clipping_norm=c, num_sites=len(deltas),
                     delta=DELTA)
    average = np.mean([clip(d, c) for d in deltas], axis=0).astype(np.float32)
    return noise.add_noise(average, contributors=len(deltas))


def distributed_average(deltas: list[np.ndarray], sigma: float, c: float, round_: int,
                        samplers: list) -> np.ndarray:
    """One real SecAgg+ round in which every site adds its Skellam share before masking."""
    n = len(deltas)
    share = NoiseShare(noise_multiplier=sigma, clip_norm=c, min_contributors=n)
    enc = noisy_encoding(clip_range=c, max_sites=n, share=share)
    ids = list(range(1, n + 1))
    server = ServerRound(round_, ids, SecAggConfig(degree=n - 1, encoding=enc),
                         deltas[0].size + HEADER, run=RUN)
    # the malicious-secure protocol, as deployed: identity keys on one registration list
    registry = simulation_registry([f"site-{i}" for i in ids])
    sites = {i: SiteSecAgg(i, round_, enc, RUN, SiteIdentity(
        f"site-{i}", simulation_key(f"site-{i}"), registry)) for i in ids}
    requests = server.accept_keys({i: s.advertise() for i, s in sites.items()})
    held = server.accept_shares({i: sites[i].share_keys(r["participants"], r["neighbours"],
                                                        r["degree"], r["threshold"])
                                 for i, r in requests.items()})
    masked = {i: sites[i].masked_input(cts, deltas[i - 1], 1, noise=share,
                                       sampler=samplers[i - 1])
              for i, cts in held.items()}
    requests = server.accept_signatures({i: sites[i].sign_survivors(r["survivors"])
                                         for i, r in server.accept_masked(masked).items()})
    average, weight = server.unmask({i: sites[i].unmask(r["survivors"], r["signatures"])
                                     for i, r in requests.items()})
    assert weight == n
    return average


def test_mcc(weights: np.ndarray, x_test, y_test) -> float:
    m = model(0)
    load_flat(m, weights)
    with torch.no_grad():
        preds = m(x_test).argmax(1).numpy()
    return mcc(confusion_matrix(y_test.numpy(), preds, CLASSES))


def train(arm: str, seed: int, *, sites: int, per_site: int, rounds: int, sigma: float,
          c: float) -> tuple[float, float]:
    """(mean test MCC of the last LAST global models, final model's test MCC)."""
    data, (x_test, y_test) = federation(seed, sites, per_site)
    weights = flat(model(seed))
    samplers = [SkellamNoise().sample for _ in range(sites)]
    scores: list[float] = []
    for r in range(1, rounds + 1):
        deltas = [local_delta(weights, x, y, seed * 1000 + r * 50 + k)
                  for k, (x, y) in enumerate(data)]
        avg = central_average(deltas, sigma, c) if arm == "central" else \
            distributed_average(deltas, sigma, c, r, samplers)
        weights = weights + avg
        if r > rounds - LAST:
            scores.append(test_mcc(weights, x_test, y_test))
    return statistics.mean(scores), scores[-1]


def share_cost(params: int = 1_000_000, repeats: int = 3) -> dict:
    """Site cost of distributed DP: ``encode`` of a 1M-parameter delta with and without the
    noise share (best of ``repeats``), in ns per parameter."""
    from protocol.secagg_encoding import Encoding, encode

    x = np.random.default_rng(0).normal(0, 1e-3, params).astype(np.float32)
    share = NoiseShare(noise_multiplier=1.0, clip_norm=0.5, min_contributors=10)
    noisy, plain = noisy_encoding(clip_range=0.5, max_sites=10, share=share), \
        Encoding(clip_range=0.5, max_sites=10, max_weight=1)
    sampler = SkellamNoise().sample

    def best(fn) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times) / params * 1e9

    with_noise = best(lambda: encode(x, 1, noisy, noise=share, sampler=sampler))
    without = best(lambda: encode(x, 1, plain))
    return {"encode_ns_per_param": without, "encode_with_noise_ns_per_param": with_noise,
            "noise_share_ns_per_param": with_noise - without, "params": params}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", type=int, default=20)
    ap.add_argument("--per-site", type=int, default=150)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--clip", type=float, default=0.5)
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    sigma = calibrate_noise(target_epsilon=args.epsilon, delta=DELTA, sample_rate=1.0,
                            steps=args.rounds)
    kw = dict(sites=args.sites, per_site=args.per_site, rounds=args.rounds, sigma=sigma,
              c=args.clip)
    runs: dict[str, list[tuple[float, float]]] = {}
    seconds: dict[str, float] = {}
    for arm in ("central", "distributed"):
        start = time.perf_counter()
        runs[arm] = [train(arm, s, **kw) for s in range(args.seeds)]
        seconds[arm] = time.perf_counter() - start
    runs["no_dp"] = [train("central", s, **kw | {"sigma": 1e-9}) for s in range(args.seeds)]
    scores = {k: [r[0] for r in v] for k, v in runs.items()}
    finals = {k: [r[1] for r in v] for k, v in runs.items()}
    means = {k: statistics.mean(v) for k, v in scores.items()}
    ratio = means["distributed"] / means["central"]
    diffs = [d - c for d, c in zip(scores["distributed"], scores["central"])]
    paired = {"mean": statistics.mean(diffs),
              "standard_error": statistics.stdev(diffs) / len(diffs) ** 0.5
              if len(diffs) > 1 else None}
    cost = share_cost()
    result = {
        "distributed_dp_mcc_ratio": ratio,
        "distributed_dp": {
            "test_mcc_mean": means, "test_mcc_per_seed": scores,
            "final_model_test_mcc_mean": {k: statistics.mean(v) for k, v in finals.items()},
            "final_model_test_mcc_per_seed": finals,
            "paired_difference_distributed_minus_central": paired,
            "mcc_over_last_rounds": LAST, "seconds": seconds,
            "epsilon": args.epsilon, "delta": DELTA, "noise_multiplier": sigma,
            "sites": args.sites, "rounds": args.rounds, "clip": args.clip,
            "min_contributors": args.sites, "target_ratio": 0.97, "target_met": ratio >= 0.97,
            "site_cost": cost,
            "mechanism": "Skellam shares before SecAgg+ masking vs server Gaussian (SumNoise)",
            "task": f"synthetic {CLASSES}-class, {FEATURES} features, site-shifted, MLP "
                    f"{FEATURES}-{HIDDEN}-{CLASSES}, FedAvg of clipped site updates",
            "commit": commit(), "machine": machine()},
    }
    print(json.dumps(result, indent=2))
    if not args.no_write:
        path = RESULTS_DIR / "secagg.json"
        merged = json.loads(path.read_text()) if path.exists() else {}
        path.write_text(json.dumps(merged | result, indent=2) + "\n")
        update_results_md(
            "distributed site-level DP", f"| distributed site-level DP | test MCC "
            f"{means['distributed']:.3f} (Skellam shares, no trusted server) vs "
            f"{means['central']:.3f} (server Gaussian) at epsilon {args.epsilon:g}, "
            f"{args.sites} sites, {args.rounds} rounds, {args.seeds} seeds: ratio "
            f"{ratio:.3f} (goal >= 0.97); no DP {means['no_dp']:.3f} | `bench/distributed_dp.py` |")
    return result


if __name__ == "__main__":
    main()
