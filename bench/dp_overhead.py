"""DP-SGD overhead: step time and peak memory of each DP path against plain training, same run.

One optimizer step (AdamW) per iteration on the multi-modal ViT (~5M parameters), one fixed
random batch of 32 shared by every mode, one CPU thread:

* ``non_dp``              ``loss.backward(); optimizer.step()``;
* ``ours``                the production path, ``client.privacy.dpsgd.PrivateGradients``
                          (exact one-pass per-sample clipping, AES-CTR secure noise);
* ``ours_insecure_noise`` the same with ``secure_mode=False`` (seeded torch noise), to
                          separate the cost of the CSPRNG from the cost of clipping;
* ``opacus_hooks``        Opacus ``GradSampleModule`` + ``DPOptimizer`` (per-sample gradients
                          materialised by hooks);
* ``opacus_ghost``        Opacus fast gradient clipping (``GradSampleModuleFastGradientClipping``
                          + ``DPOptimizerFastGradientClipping`` + ``DPLossFastGradientClipping``,
                          two backward passes).

Opacus modes are built the way ``PrivacyEngine.make_private`` builds them, minus its data
loader (every mode must see the same batch); Opacus' own noise is not secure (its secure mode
needs torchcsprng), so compare it with ``ours_insecure_noise`` for like-for-like noise.

Each mode runs in its own subprocess (``OMP_NUM_THREADS=1``, ``torch.set_num_threads(1)``).
Time: median of ``--steps`` timed steps after ``--warmup`` untimed ones (``perf_counter``,
``cuda.synchronize`` around each step on CUDA). Peak memory above a baseline taken after
building model, batch and optimizer and running one untimed ``no_grad`` forward: on CPU the
process' peak RSS (``ru_maxrss``) minus its RSS at that point (torch's CPU allocator keeps no
peak statistics); on CUDA ``max_memory_allocated`` minus ``memory_allocated`` at that point.
So the figure covers gradients, optimizer state, activations and DP bookkeeping, not the
weights themselves. A mode that fails on this model records its error instead of a figure.

    python -m bench.dp_overhead [--device auto|cpu|cuda] [--steps 5] [--warmup 3] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from .common import RESULTS_DIR, commit, machine

MODES = ("non_dp", "ours", "ours_insecure_noise", "opacus_hooks", "opacus_ghost")
BATCH = 32
DATASET_SIZE = 3200                 # only sets q = 32 / 3200 for the DP configs
NOISE_MULTIPLIER, MAX_GRAD_NORM = 1.0, 1.0
VIT = dict(spatial_dims=2, img_size=64, patch_size=16, num_sequences=4, dim=320, depth=6,
           heads=8, mlp_ratio=2.0, dropout=0.0, num_classes=3)
TARGETS = {"time_ratio": 1.25, "memory_ratio": 1.3}
ANCHOR = "Opacus hooks 1.8-2.5x time, Opacus ghost 1.3x memory (issue, this machine)"
_RESULT = "DP_OVERHEAD_RESULT "


# ---------------------------------------------------------------- child: one mode, one process
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _batch(device):
    import torch

    g = torch.Generator().manual_seed(0)
    present = torch.ones(BATCH, VIT["num_sequences"])
    present[::5, 3] = 0                                  # some studies lack a sequence
    present[1::7, 1] = 0
    size = (BATCH, VIT["num_sequences"], VIT["img_size"], VIT["img_size"])
    batch = {"image": torch.randn(size, generator=g), "present": present,
             "label": torch.randint(0, VIT["num_classes"], (BATCH,), generator=g)}
    return {k: v.to(device) for k, v in batch.items()}


def _build_step(mode: str, model, batch, device):
    """``(step() -> loss, module that holds the weights)`` for one mode."""
    import torch
    from torch import nn

    from client.engine import autocast
    from client.privacy.dpsgd import DPSGDConfig, PrivateGradients
    from models.registry import TASKS

    task = TASKS.build("classification", {"num_classes": VIT["num_classes"]})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    if mode == "non_dp":
        def step():
            opt.zero_grad(set_to_none=True)
            with autocast(device):
                out = task.step(model, batch)
            out.loss.backward()
            opt.step()
            return out.loss
        return step

    if mode in ("ours", "ours_insecure_noise"):
        private = PrivateGradients(model, DPSGDConfig(
            noise_multiplier=NOISE_MULTIPLIER, max_grad_norm=MAX_GRAD_NORM,
            sample_rate=BATCH / DATASET_SIZE, secure_mode=mode == "ours"),
            expected_batch_size=BATCH)

        def loss_fn():                                   # as client/engine.py calls it
            with autocast(device):
                return task.step(model, batch)

        def step():
            opt.zero_grad(set_to_none=True)
            out = private.backward(loss_fn)
            opt.step()
            return out.loss
        return step

    dp_args = dict(noise_multiplier=NOISE_MULTIPLIER, max_grad_norm=MAX_GRAD_NORM,
                   expected_batch_size=BATCH, loss_reduction="mean")
    if mode == "opacus_hooks":
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        dp_opt = DPOptimizer(opt, **dp_args)

        def step():
            dp_opt.zero_grad(set_to_none=True)
            with autocast(device):
                out = task.step(gsm, batch)              # gsm(image, present) forwards both
            out.loss.backward()
            dp_opt.step()
            return out.loss
        return step

    if mode == "opacus_ghost":
        from opacus.grad_sample import GradSampleModuleFastGradientClipping
        from opacus.optimizers import DPOptimizerFastGradientClipping
        from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

        gsm = GradSampleModuleFastGradientClipping(
            model, batch_first=True, loss_reduction="mean", max_grad_norm=MAX_GRAD_NORM,
            use_ghost_clipping=True)
        dp_opt = DPOptimizerFastGradientClipping(opt, **dp_args)
        # The task's step returns a reduced loss; ghost clipping needs Opacus' criterion
        # wrapper to get per-sample losses, so the task's cross-entropy is written out here.
        criterion = DPLossFastGradientClipping(gsm, dp_opt, nn.CrossEntropyLoss(), "mean")

        def step():
            dp_opt.zero_grad(set_to_none=True)
            with autocast(device):
                logits = gsm(batch["image"], batch["present"])
            loss = criterion(logits.float(), batch["label"])
            loss.backward()                              # both passes, clipping in between
            dp_opt.step()
            return loss.detach()
        return step

    raise ValueError(f"unknown mode {mode!r}; valid: {', '.join(MODES)}")


def run_child(mode: str, device_name: str, steps: int, warmup: int) -> dict:
    import torch

    from client.engine import autocast, resolve_device
    from models.vit import MultiModalViT, ViTConfig, count_parameters

    torch.set_num_threads(1)
    device = resolve_device(device_name)
    torch.manual_seed(0)
    model = MultiModalViT(ViTConfig(**VIT)).to(device).train()
    batch = _batch(device)
    result = {"mode": mode, "params": count_parameters(model), "device": str(device)}
    try:
        step = _build_step(mode, model, batch, device)
    except Exception as e:                               # recorded, not raised: see docstring
        return result | {"error": f"{type(e).__name__}: {e}"}
    with torch.no_grad(), autocast(device):              # touches weights, loads kernels
        model(batch["image"], batch["present"])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    if device.type == "cuda":
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        base = _rss_bytes()
    times, losses = [], []
    try:
        for i in range(warmup + steps):
            sync()
            start = time.perf_counter()
            loss = step()
            sync()
            if i >= warmup:
                times.append(time.perf_counter() - start)
            losses.append(float(loss))
    except Exception as e:
        return result | {"error": f"{type(e).__name__}: {e}"}
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        absolute = peak
    else:
        absolute = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # KiB on Linux
        peak = absolute
    return result | {
        "ms_per_step": 1e3 * statistics.median(times),
        "ms_steps": [1e3 * t for t in times],
        "peak_mb": (peak - base) / 2**20,
        "baseline_mb": base / 2**20,
        "absolute_peak_mb": absolute / 2**20,
        "losses": losses,
    }


# ---------------------------------------------------------------- parent: all modes, one table
def run_mode(mode: str, args) -> dict:
    repo = Path(__file__).resolve().parents[1]
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                        "PYTHONPATH": os.pathsep.join(
                            filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "bench.dp_overhead", "--child", "--mode", mode,
           "--device", args.device, "--steps", str(args.steps), "--warmup", str(args.warmup)]
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_RESULT):
            return json.loads(line[len(_RESULT):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"mode": mode, "error": f"child exited {proc.returncode}: {' | '.join(tail)}"}


def _ratio(modes: dict, mode: str, key: str) -> float | None:
    a, b = modes[mode].get(key), modes["non_dp"].get(key)
    return a / b if a is not None and b else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--steps", type=int, default=5, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per mode first")
    parser.add_argument("--out", type=Path, default=None,
                        help="default results/dp_overhead.json (dp_overhead_gpu.json on CUDA)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(_RESULT + json.dumps(run_child(args.mode, args.device, args.steps, args.warmup)))
        return

    if "non_dp" not in args.modes:
        args.modes = ["non_dp", *args.modes]
    modes = {m: run_mode(m, args) for m in args.modes}
    ref = modes["non_dp"]
    if "error" in ref:
        raise SystemExit(f"non_dp failed, no reference: {ref['error']}")
    device = ref["device"]
    for m in modes.values():
        m["time_ratio"] = _ratio(modes, m["mode"], "ms_per_step")
        m["memory_ratio"] = _ratio(modes, m["mode"], "peak_mb")

    print(f"MultiModalViT {ref['params']:,} parameters, batch {BATCH}, 1 thread, {device}")
    print(f"{'mode':<21}{'ms/step':>10}{'peak MB':>10}{'time x':>9}{'memory x':>10}")
    for m in modes.values():
        if "error" in m:
            print(f"{m['mode']:<21}  failed: {m['error']}")
        else:
            print(f"{m['mode']:<21}{m['ms_per_step']:>10.1f}{m['peak_mb']:>10.1f}"
                  f"{m['time_ratio']:>9.2f}{m['memory_ratio']:>10.2f}")

    def pick(mode, key):
        return modes.get(mode, {}).get(key)

    headline = {"time_ratio": pick("ours", "time_ratio"),
                "memory_ratio": pick("ours", "memory_ratio")}
    payload = headline | {
        "headline_mode": "ours",
        "targets": TARGETS,
        "targets_met": {k: v is not None and v <= TARGETS[k] for k, v in headline.items()},
        "ours_insecure_noise_time_ratio": pick("ours_insecure_noise", "time_ratio"),
        "ours_insecure_noise_memory_ratio": pick("ours_insecure_noise", "memory_ratio"),
        "opacus_hooks_time_ratio": pick("opacus_hooks", "time_ratio"),
        "opacus_hooks_memory_ratio": pick("opacus_hooks", "memory_ratio"),
        "opacus_ghost_time_ratio": pick("opacus_ghost", "time_ratio"),
        "opacus_ghost_memory_ratio": pick("opacus_ghost", "memory_ratio"),
        "errors": {k: m["error"] for k, m in modes.items() if "error" in m},
        "anchor": ANCHOR,
        "params": ref["params"],
        "device": device,
        "config": {"vit": VIT, "batch_size": BATCH, "threads": 1, "optimizer": "AdamW",
                   "noise_multiplier": NOISE_MULTIPLIER, "max_grad_norm": MAX_GRAD_NORM,
                   "sample_rate": BATCH / DATASET_SIZE, "steps": args.steps,
                   "warmup": args.warmup,
                   "autocast": "bf16" if device.startswith("cuda") else "none"},
        "method": ("each mode in its own process; time = median ms of timed steps; memory = "
                   + ("cuda max_memory_allocated - memory_allocated" if device.startswith("cuda")
                      else "peak RSS (ru_maxrss) - RSS")
                   + " after model+batch+optimizer and one no_grad forward"),
        "modes": modes,
    }
    default = "dp_overhead_gpu.json" if device.startswith("cuda") else "dp_overhead.json"
    path = args.out or RESULTS_DIR / default
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload | {"commit": commit(), "machine": machine()}, indent=2)
                    + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
