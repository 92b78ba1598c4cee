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
                          two backward passes);
* ``opacus_ghost_flat_patches`` the same on a benchmark-only subclass whose patch embedding
                          sees ``[B, S*N, P]`` instead of ``[B, S, N, P]`` (identical maths):
                          Opacus' ghost-norm rule for ``nn.Linear`` handles only 2D/3D inputs and
                          leaves the 4D patch embedding without a norm, so ``opacus_ghost``
                          fails on the production model.

Opacus modes are built the way ``PrivacyEngine.make_private`` builds them, minus its data
loader (every mode must see the same batch); Opacus' own noise is not secure (its secure mode
needs torchcsprng), so compare it with ``ours_insecure_noise`` for like-for-like noise.

Each mode runs in its own subprocess (``OMP_NUM_THREADS=1``, ``torch.set_num_threads(1)``).
Time: median of ``--steps`` timed steps after ``--warmup`` untimed ones (``perf_counter``,
``cuda.synchronize`` around each step on CUDA), pooled over ``--repeats`` passes over the modes,
every other pass in reverse order so drift in machine load falls on all modes alike; on CPU also
the process' CPU time per step, which other jobs on a shared box disturb much less. Peak memory
is measured above a baseline taken after building model, batch and optimizer and running one
untimed ``no_grad`` forward: on CPU the
process' peak RSS (``ru_maxrss``) minus its RSS at that point (torch's CPU allocator keeps no
peak statistics); on CUDA ``max_memory_allocated`` minus ``memory_allocated`` at that point.
So the figure covers gradients, optimizer state, activations and DP bookkeeping, not the
weights themselves. A mode that fails on this model records its error instead of a figure.

On the CPU, peak RSS under glibc's default malloc measures the allocator as much as the
program: after the first large ``free`` glibc raises its mmap threshold (up to 32 MiB), so
later multi-MiB tensors come from the heap, and freed heap memory is kept, not returned - the
peak then depends on the order and sizes in which tensors die, not on how many are alive. The
headline CPU memory figure therefore comes from separate passes (``--memory-passes``, default
one per mode) run with ``MALLOC_MMAP_THRESHOLD_=65536``: every allocation of 64 KiB or more
gets its own mapping, returned on ``free``, so peak RSS minus baseline is the peak of live
tensor memory - what the CUDA figure measures. The timed passes keep the default allocator and
also report their RSS peak (``rss_default_malloc_*`` in the JSON).

    python -m bench.dp_overhead [--device auto|cpu|cuda] [--steps 5] [--warmup 3] [--repeats 2]
                                [--memory-passes 1] [--out PATH]
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

MODES = ("non_dp", "ours", "ours_insecure_noise", "opacus_hooks", "opacus_ghost",
         "opacus_ghost_flat_patches")
BATCH = 32
DATASET_SIZE = 3200                 # only sets q = 32 / 3200 for the DP configs
NOISE_MULTIPLIER, MAX_GRAD_NORM = 1.0, 1.0
VIT = dict(spatial_dims=2, img_size=64, patch_size=16, num_sequences=4, dim=320, depth=6,
           heads=8, mlp_ratio=2.0, dropout=0.0, num_classes=3)
TARGETS = {"time_ratio": 1.25, "memory_ratio": 1.3}
ANCHOR = "Opacus hooks 1.8-2.5x time, Opacus ghost 1.3x memory (issue, this machine)"
_RESULT = "DP_OVERHEAD_RESULT "


# ---------------------------------------------------------------- child: one mode, one process
def _flat_patch_vit(config):
    """MultiModalViT whose patch embedding gets 3D input; same parameters, same outputs."""
    from models.vit import MultiModalViT, patchify

    class FlatPatchViT(MultiModalViT):
        def forward_features(self, images, present):
            patches = patchify(images, self.config.patch_size, self.config.spatial_dims)
            b, s, n, p = patches.shape                                   # [B, S, N, P]
            emb = self.patch_embed(patches.reshape(b, s * n, p)).reshape(b, s, n, -1)
            x = self.tokens(emb + self.pos_embed)                        # [B, 1+S*N, D]
            attend = self.attention_mask(present)
            for block in self.blocks:
                x = block(x, attend)
            return self.norm(x)

    return FlatPatchViT(config)


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
            return out.loss.detach()
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
            return out.loss.detach()
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
            return out.loss.detach()
        return step

    if mode in ("opacus_ghost", "opacus_ghost_flat_patches"):
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
    build = _flat_patch_vit if mode == "opacus_ghost_flat_patches" else MultiModalViT
    model = build(ViTConfig(**VIT)).to(device).train()
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
    times, cpu_times, losses = [], [], []
    try:
        for i in range(warmup + steps):
            sync()
            start, cpu_start = time.perf_counter(), time.process_time()
            loss = step()
            sync()
            if i >= warmup:
                times.append(time.perf_counter() - start)
                cpu_times.append(time.process_time() - cpu_start)
            losses.append(loss.item())
    except Exception as e:
        return result | {"error": f"{type(e).__name__}: {e}"}
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        absolute = peak
    else:
        absolute = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # KiB on Linux
        peak = absolute
    return result | {
        "ms_steps": [1e3 * t for t in times],
        "cpu_ms_steps": [1e3 * t for t in cpu_times],
        "peak_mb": (peak - base) / 2**20,
        "baseline_mb": base / 2**20,
        "absolute_peak_mb": absolute / 2**20,
        "losses": losses,
    }


# ---------------------------------------------------------------- parent: all modes, one table
def run_mode(mode: str, args, *, live_memory: bool = False) -> dict:
    """One child process; ``live_memory``: fixed mmap threshold, RSS tracks live tensors."""
    repo = Path(__file__).resolve().parents[1]
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                        "PYTHONPATH": os.pathsep.join(
                            filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    steps, warmup = args.steps, args.warmup
    if live_memory:
        env |= {"MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
        steps, warmup = 2, 2
    cmd = [sys.executable, "-m", "bench.dp_overhead", "--child", "--mode", mode,
           "--device", args.device, "--steps", str(steps), "--warmup", str(warmup)]
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_RESULT):
            return json.loads(line[len(_RESULT):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"mode": mode, "error": f"child exited {proc.returncode}: {' | '.join(tail)}"}


def pool(runs: list[dict]) -> dict:
    """One mode's passes -> medians over all their timed steps (first error wins)."""
    failed = [r for r in runs if "error" in r]
    if failed:
        return failed[0]
    ms = [t for r in runs for t in r["ms_steps"]]
    cpu = [t for r in runs for t in r["cpu_ms_steps"]]
    per_pass = ("ms_steps", "cpu_ms_steps", "peak_mb", "baseline_mb", "absolute_peak_mb")
    return {k: v for k, v in runs[0].items() if k not in per_pass} | {
        "ms_per_step": statistics.median(ms),
        "cpu_ms_per_step": statistics.median(cpu),
        "peak_mb": statistics.median(r["peak_mb"] for r in runs),
        "passes": [{k: r[k] for k in per_pass} for r in runs],
    }


def _ratio(modes: dict, mode: str, key: str) -> float | None:
    a, b = modes[mode].get(key), modes["non_dp"].get(key)
    return a / b if a is not None and b else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--steps", type=int, default=5, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per mode first")
    parser.add_argument("--repeats", type=int, default=2, help="passes over all modes")
    parser.add_argument("--out", type=Path, default=None,
                        help="default results/dp_overhead.json (dp_overhead_gpu.json on CUDA)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--memory-passes", type=int, default=1,
                        help="CPU: live-memory passes per mode (0: RSS of the timed passes)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(_RESULT + json.dumps(run_child(args.mode, args.device, args.steps, args.warmup)))
        return

    if "non_dp" not in args.modes:
        args.modes = ["non_dp", *args.modes]
    runs: dict[str, list[dict]] = {m: [] for m in args.modes}
    for r in range(args.repeats):
        for m in args.modes[::-1] if r % 2 else args.modes:
            runs[m].append(run_mode(m, args))
    modes = {m: pool(rs) for m, rs in runs.items()}
    ref = modes["non_dp"]
    if "error" in ref:
        raise SystemExit(f"non_dp failed, no reference: {ref['error']}")
    device = ref["device"]
    live = device == "cpu" and args.memory_passes > 0
    for m in modes.values():
        if "error" in m:
            continue
        m["rss_default_malloc_peak_mb"] = m["peak_mb"]
        if live:
            passes = [run_mode(m["mode"], args, live_memory=True)
                      for _ in range(args.memory_passes)]
            failed = [p["error"] for p in passes if "error" in p]
            m["live_memory_passes"] = [p.get("peak_mb") for p in passes]
            m["peak_mb"] = (None if failed
                            else statistics.median(p["peak_mb"] for p in passes))
    for m in modes.values():
        m["time_ratio"] = _ratio(modes, m["mode"], "ms_per_step")
        m["cpu_time_ratio"] = _ratio(modes, m["mode"], "cpu_ms_per_step")
        m["memory_ratio"] = _ratio(modes, m["mode"], "peak_mb")
        m["rss_default_malloc_memory_ratio"] = _ratio(modes, m["mode"],
                                                      "rss_default_malloc_peak_mb")

    print(f"MultiModalViT {ref['params']:,} parameters, batch {BATCH}, 1 thread, {device}")
    def num(x, spec):
        return format(x, spec) if x is not None else format("-", spec.split(".")[0] + "s")

    print(f"{'mode':<27}{'ms/step':>9}{'cpu ms':>9}{'peak MB':>9}{'time x':>8}{'cpu x':>7}"
          f"{'mem x':>7}{'rss x':>7}")
    for m in modes.values():
        if "error" in m:
            print(f"{m['mode']:<27}failed: {m['error']}")
        else:
            print(f"{m['mode']:<27}{m['ms_per_step']:>9.1f}{m['cpu_ms_per_step']:>9.1f}"
                  f"{num(m['peak_mb'], '>9.1f')}{m['time_ratio']:>8.2f}"
                  f"{m['cpu_time_ratio']:>7.2f}{num(m['memory_ratio'], '>7.2f')}"
                  f"{num(m['rss_default_malloc_memory_ratio'], '>7.2f')}")

    def pick(mode, key):
        return modes.get(mode, {}).get(key)

    headline = {"time_ratio": pick("ours", "time_ratio"),
                "memory_ratio": pick("ours", "memory_ratio")}
    payload = headline | {
        "cpu_time_ratio": pick("ours", "cpu_time_ratio"),
        "headline_mode": "ours",
        "targets": TARGETS,
        "targets_met": {k: v is not None and v <= TARGETS[k] for k, v in headline.items()},
        "rss_default_malloc_memory_ratio": pick("ours", "rss_default_malloc_memory_ratio"),
        **{f"{m}_{k}": pick(m, k) for m in MODES[2:]
           for k in ("time_ratio", "cpu_time_ratio", "memory_ratio",
                     "rss_default_malloc_memory_ratio")},
        "errors": {k: m["error"] for k, m in modes.items() if "error" in m},
        "notes": [
            "opacus_ghost on the production model: Opacus' ghost-norm rule for nn.Linear "
            "(compute_linear_norm_sample) handles only 2D/3D inputs, so the patch embedding "
            "(input [B, S, N, P]) gets no per-sample norm and get_clipping_coef fails; "
            "opacus_ghost_flat_patches feeds it [B, S*N, P] (same parameters and outputs)",
            "Opacus modes draw non-secure torch noise (secure mode needs torchcsprng); "
            "ours_insecure_noise is the like-for-like comparison, ours is the production path",
        ],
        "anchor": ANCHOR,
        "params": ref["params"],
        "device": device,
        "config": {"vit": VIT, "batch_size": BATCH, "threads": 1, "optimizer": "AdamW",
                   "noise_multiplier": NOISE_MULTIPLIER, "max_grad_norm": MAX_GRAD_NORM,
                   "sample_rate": BATCH / DATASET_SIZE, "steps": args.steps,
                   "warmup": args.warmup, "repeats": args.repeats,
                   "autocast": "bf16" if device.startswith("cuda") else "none"},
        "method": ("each mode in its own process, --repeats interleaved passes; time = median "
                   "wall (and CPU) ms over all timed steps; memory = median over passes of "
                   + ("cuda max_memory_allocated - memory_allocated" if device.startswith("cuda")
                      else "peak RSS (ru_maxrss) - RSS")
                   + " after model+batch+optimizer and one no_grad forward"
                   + ("; CPU memory_ratio from separate passes with MALLOC_MMAP_THRESHOLD_=65536 "
                      "(peak RSS = peak live tensor memory, see module docstring); "
                      "rss_default_malloc_* = the same from the timed passes, default glibc "
                      "malloc" if live else "")),
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
