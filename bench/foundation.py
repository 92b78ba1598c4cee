"""Foundation models: external MCC of the pretrained-Dinov2 arms (default), and one site's LoRA
step against a hand-written loop plus the cost of DP-SGD on it (``--throughput``).

    python -m bench.foundation [--quick] [--draws 0,1] [--arms ...] [--patients 600]
                               [--public-patients 600] [--public-epochs 40]
                               [--public-objective clip|mm_dino]
                               [--public-patch channels|shared|per_sequence] [--rounds 20]
                               [--channel-tokens fused|per_channel] [--no-dp-recipe]
                               [--pretrain-rounds 5] [--work DIR [--resume]]
    python -m bench.foundation --throughput [--family dinov2] [--steps 6] [--warmup 1]
                               [--repeats 2] [--device auto|cpu|cuda] [--image-size 64]
                               [--batch 16] [--method lora|dora|ia3]
                               [--encoder small|vitb14]

The GPU figures issue 24 asks for (ViT-B/14 at 224 px, bf16 autocast, written to
``results/foundation_gpu_vitb14.json`` and its own row, CPU figures untouched)::

    python -m bench.foundation --throughput --device cuda --encoder vitb14 --image-size 224

Both modes write ``bench/results/foundation.json`` and MERGE into it: each keeps the other's
keys (``throughput_commit`` / ``mcc_commit`` say which commit measured which half), and the
``foundation`` row of ``bench/RESULTS.md`` shows both. The MCC arms are described in
``bench/foundation_mcc.py`` (public cohort, central pretraining of a ``Dinov2Model`` on it
with no class label, two draws of sites at 10% labels: scratch, LoRA, MM-DINOv2 continued + fine-tune,
pooled, DP-LoRA at epsilon 8).

The defaults (session 38) are the best recipe measured: the public encoder pretrained with
image-report CLIP as a 4-channel Dinov2 (``--public-objective clip --public-patch channels
--public-epochs 40``), the arms on fused tokens, and the ``dp_lora`` arm with the DP recipe
(``foundation_mcc.DP_RECIPE``: public feature centring and scaling, the head at lr 1e-2, five
head-only rounds; ``--no-dp-recipe``: plain DP-LoRA). Two draws give two DP/non-DP pairs; the
issue asks for a mean over seeds, so when ``bench.dp_seeds`` (``--dp-seeds``) pooled the same
recipe on the same encoder (sha256) its ratio is the top-level ``dp_lora_over_lora_eps8`` and
this run's two-draw ratio stays beside it (``mcc.summary.dp_lora_over_lora_eps8_two_draws``).
The same for "federated >= 0.9x pooled" (session 39): when ``bench.dp_seeds --federated``
(``--fed-seeds``) pooled the federated recipe (``foundation_mcc.FEDERATED``) and the same
recipe trained centrally over seeds on this encoder, its ratio is the top-level
``federated_over_pooled`` (``..._two_draws`` beside it: this run's plain LoRA). The
``lora_ffa`` and ``pooled_ffa`` arms (FFA-LoRA) run beside plain LoRA.
Until session 37 the defaults were the label-free MM-DINOv2 RGB encoder (``--public-objective
mm_dino --public-patch shared --public-epochs 10 --channel-tokens per_channel
--no-dp-recipe``).

MCC mode, size and sittings. The defaults are ``bench.model_quality``'s regime (600 patients a
site, 10% labels: ~40 labelled training studies a site, 20 rounds x 5 local epochs), the smallest
at which today's from-scratch ViT learns on this task (external MCC 0.42 / 0.26 over two seeds
there). At 80 patients a site (~5 labelled studies each; the defaults until session 18) every
arm predicted one class for every external study: the run measured nothing. On 2 CPU cores the
defaults take hours (estimated from the 80-patient run's per-arm times, not yet measured in
full: the public pretraining ~40 min, a draw ~2 h), so the run is made to span sittings:
``--work DIR`` keeps the public cohort and the pretrained encoder (its sha256 recorded; a draw's
sites are synthesized again from its seed, the same files); ``--resume`` keeps every (draw,
arm) already in ``results/<name>.json`` when its settings and encoder are the same (draws not
asked for this time included), runs only the others, and marks the JSON ``complete`` once
every requested arm of every requested draw is in. Each arm records the commit that measured
it; the JSON is replaced whole after each arm (a kill mid-write keeps the previous one).

Throughput mode:

The model is what a hospital bringing ``facebook/dinov2-small`` gets, only smaller: a
``Dinov2Model`` built from a config (no hub, ``HF_HUB_OFFLINE=1``; DINOv2's own patch 14,
resized to 16 by the adaptation), ``save_pretrained`` to a temporary directory, and loaded
through MedFed's own path - the ``foundation`` model (``weights=<name>`` resolved in the
``foundation_dir`` resource, 4 MRI channels, ``method=lora``) wrapped by the ``classification``
task (``models.tasks.build``), exactly what a site builds for such a job. Every mode trains the
same model (same weights, same LoRA init: ``torch.manual_seed(0)`` before the build) on the same
fixed random batch:

* ``handwritten_lora`` the reference: a hand-written PyTorch + ``peft`` loop on that model -
                       ``zero_grad``, forward, ``F.cross_entropy``, ``backward``, AdamW step
                       (the engine's optimiser settings: ``TrainConfig``'s lr / weight decay);
* ``medfed_lora``      the site's production engine, ``client.engine.Engine.fit``, non-DP: the
                       batch's samples are the whole site dataset and ``batch_size`` is the batch,
                       so each local epoch is exactly one optimiser step on that batch (shuffled
                       order, same samples), collated by its DataLoader and moved to the device
                       as at a site;
* ``medfed_lora_dp``   the same ``Engine.fit`` with a ``DPSGDConfig`` (what a ``privacy=dp-sgd``
                       job gives it): Poisson sampling at q = 1 (every sample in every batch, so
                       the batch does not vary in size and the comparison stays like for like),
                       exact per-sample clipping and secure (AES-CTR) Gaussian noise, as in
                       production.

Per-step time of the engine modes comes from a thin wrapper around the task whose
``after_step`` (called by the engine once per optimiser step) takes a timestamp: the interval
between two consecutive calls is one full engine step (batch assembly, ``zero_grad``, forward,
backward, DP if on, AdamW). ``Engine.fit`` runs ``warmup + steps`` local epochs; the first
``warmup`` intervals are discarded.

House pattern (``bench/dp_overhead.py``): each mode in its own subprocess
(``OMP_NUM_THREADS=1``, ``torch.set_num_threads(1)``); median of the timed steps, pooled over
``--repeats`` passes over the modes, every other pass in reverse order so drift in machine load
falls on all modes alike; process CPU time per step beside wall time (the 2-core box is shared,
CPU time is much less disturbed by other jobs). On CUDA every mode runs under bf16 autocast (the
engine's own; the hand-written loop writes it out) and each step is bracketed by
``cuda.synchronize``.

``--method dora|ia3`` (default ``lora``) runs the same three modes with the foundation model's
``method=dora`` (rank-8 DoRA: LoRA plus peft's magnitude vector) or ``method=ia3`` (peft's IA3
output-scaling vectors on the same attention projections): the site model is built with that
option, so the hand-written loop trains the same peft-injected model. Modes and figures are then
named after the method (``medfed_dora``, ``handwritten_dora``, ``medfed_dora_dp``;
``dora_throughput_ratio``, ``dp_dora_time_ratio``, ...) and the run writes
``results/foundation_throughput_<method>.json`` (``_gpu`` appended on CUDA) and its own
RESULTS.md row: it never touches the LoRA figures of ``foundation.json``. With ``lora`` every
name, file and row is what it was before the option existed.

"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import RESULTS_DIR, commit, mode_ratio, update_results_md, write_result

ADAPTERS = ("lora", "dora", "ia3")     # --method


def modes_of(method: str = "lora") -> tuple[str, str, str]:
    """(engine, hand-written, engine DP-SGD) mode names of an adapter method."""
    return f"medfed_{method}", f"handwritten_{method}", f"medfed_{method}_dp"


MODES = modes_of("lora")
ALL_MODES = tuple(m for a in ADAPTERS for m in modes_of(a))
FAMILIES = ("dinov2",)
WEIGHTS_NAME = "dinov2-bench"
NUM_CHANNELS, NUM_CLASSES = 4, 3
PATCH = 16                       # the adaptation resizes DINOv2's 14-pixel kernel to this
# A dinov2-small shape (width 384, 6 heads, patch 14) with 4 of its 12 layers: keeps a CPU run
# of every mode and repeat within a few minutes on the 2-core box.
DINOV2 = dict(hidden_size=384, num_hidden_layers=4, num_attention_heads=6, mlp_ratio=4,
              patch_size=14, image_size=224)
# dinov2-base's shape (ViT-B/14, ~86M parameters) for the GPU figure; the site model keeps its
# 14-pixel kernel (224 px: a 16 x 16 grid a channel).
VITB14 = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4,
              patch_size=14, image_size=224)
ENCODERS = {"small": DINOV2, "vitb14": VITB14}
SITE_PATCH = {"small": PATCH, "vitb14": 14}
LORA = dict(method="lora", lora_rank=8, lora_alpha=16.0)
LABELS = {"lora": "LoRA", "dora": "DoRA", "ia3": "IA3"}


def adapter(method: str = "lora") -> dict:
    """The foundation model's adapter options for ``method`` (IA3 has no rank or alpha)."""
    if method not in ADAPTERS:
        raise ValueError(f"unknown method {method!r}; benchmarked: {', '.join(ADAPTERS)}")
    return {"method": method} if method == "ia3" else LORA | {"method": method}


def figure_keys(method: str = "lora") -> dict[str, str]:
    """The JSON keys of a method's figures (``lora``: the keys of ``foundation.json``)."""
    return {"throughput": f"{method}_throughput_ratio", "dp": f"dp_{method}_time_ratio",
            "throughput_cpu": f"{method}_throughput_ratio_cpu_time",
            "dp_cpu": f"dp_{method}_cpu_time_ratio"}


NOISE_MULTIPLIER, MAX_GRAD_NORM = 1.0, 1.0
TARGETS = {"lora_throughput_ratio": 0.95, "dp_lora_time_ratio": 1.25}
GPU_DP_TARGET = 1.3             # issue 24: DP <= 1.3x non-DP on the GPU (1.25x on the CPU)


def dp_target(device: str) -> float:
    return GPU_DP_TARGET if device.startswith("cuda") else TARGETS["dp_lora_time_ratio"]
_RESULT = "FOUNDATION_RESULT "


# ---------------------------------------------------------------- the model, as a user builds it
def save_encoder(directory: Path, family: str = "dinov2", encoder: dict | None = None) -> Path:
    """A freshly initialised encoder of ``family`` saved with ``save_pretrained`` (stands in for
    a downloaded checkpoint); returns ``directory``."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; benchmarked: {', '.join(FAMILIES)}")
    import torch
    import transformers

    torch.manual_seed(0)
    transformers.Dinov2Model(transformers.Dinov2Config(**(encoder or DINOV2))).save_pretrained(
        directory)
    return directory


def build_site_model(foundation_dir: Path, *, image_size: int, patch_size: int = PATCH,
                     method: str = "lora"):
    """``(model, task)`` exactly as a site builds them for a foundation LoRA (DoRA, IA3) job."""
    import torch

    from models.tasks import build

    torch.manual_seed(0)                     # the same adapter / head init in every mode
    options = dict(weights=WEIGHTS_NAME, num_channels=NUM_CHANNELS, num_classes=NUM_CLASSES,
                   image_size=image_size, patch_size=patch_size, **adapter(method))
    return build("foundation", options, "classification", {"num_classes": NUM_CLASSES},
                 foundation_dir=foundation_dir)


def fixed_batch(batch: int, image_size: int) -> dict:
    """One random batch (CPU), the same in every mode; one study lacks a sequence."""
    import torch

    g = torch.Generator().manual_seed(0)
    present = torch.ones(batch, NUM_CHANNELS, dtype=torch.bool)
    present[::5, 3] = False
    images = torch.randn(batch, NUM_CHANNELS, image_size, image_size, generator=g)
    images = images * present[..., None, None]
    return {"image": images, "present": present,
            "label": torch.randint(0, NUM_CLASSES, (batch,), generator=g)}


# ---------------------------------------------------------------- child: one mode, one process
class _TimedTask:
    """The task, plus a timestamp each time the engine finishes an optimiser step."""

    def __init__(self, task, sync):
        self.task, self.sync = task, sync
        self.stamps: list[tuple[float, float]] = []      # (wall, process CPU) after each step
        self.losses = []

    def set_label_prior(self, labels) -> None:
        self.task.set_label_prior(labels)

    def training_data(self, model, data, batch_size):
        return self.task.training_data(model, data, batch_size)

    def step(self, model, batch):
        out = self.task.step(model, batch)
        self.losses.append(out.loss.detach())
        return out

    def after_step(self, model) -> None:
        self.task.after_step(model)
        self.sync()
        self.stamps.append((time.perf_counter(), time.process_time()))


def _engine_steps(mode, model, task, batch, device, steps, warmup, sync):
    from client.engine import Engine
    from client.privacy.dpsgd import DPSGDConfig
    from protocol.job import TrainConfig

    n = len(batch["label"])
    data = [{k: v[i] for k, v in batch.items()} for i in range(n)]     # the site's dataset
    config = TrainConfig(local_epochs=warmup + steps, batch_size=n)
    privacy = None
    if mode.endswith("_dp"):
        privacy = DPSGDConfig(noise_multiplier=NOISE_MULTIPLIER, max_grad_norm=MAX_GRAD_NORM,
                              sample_rate=1.0)
    timed = _TimedTask(task, sync)
    Engine(timed, device).fit(model, data, config, privacy=privacy)
    if len(timed.stamps) != warmup + steps:
        raise RuntimeError(f"engine ran {len(timed.stamps)} steps, expected {warmup + steps}")
    wall = [b[0] - a[0] for a, b in zip(timed.stamps[warmup - 1:], timed.stamps[warmup:])]
    cpu = [b[1] - a[1] for a, b in zip(timed.stamps[warmup - 1:], timed.stamps[warmup:])]
    return wall, cpu, [x.item() for x in timed.losses]


def _handwritten_steps(model, batch, device, steps, warmup, sync):
    import torch
    import torch.nn.functional as F

    from protocol.job import TrainConfig

    defaults = TrainConfig()
    batch = {k: v.to(device) for k, v in batch.items()}
    model.to(device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=defaults.lr, weight_decay=defaults.weight_decay)
    bf16 = device.type == "cuda"
    wall, cpu, losses = [], [], []
    for i in range(warmup + steps):
        sync()
        start, cpu_start = time.perf_counter(), time.process_time()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(batch["image"], batch["present"])
        loss = F.cross_entropy(logits.float(), batch["label"])
        loss.backward()
        optimizer.step()
        sync()
        if i >= warmup:
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - cpu_start)
        losses.append(loss.detach())
    return wall, cpu, [x.item() for x in losses]


def run_child(mode: str, foundation_dir: Path, *, device_name: str = "cpu", steps: int = 6,
              warmup: int = 1, batch: int = 16, image_size: int = 64,
              method: str = "lora", patch_size: int = PATCH) -> dict:
    """One mode of ``modes_of(method)``: build the site model from ``foundation_dir``, run
    ``warmup + steps`` steps; per-step wall / CPU ms of the timed ones and every step's loss."""
    import torch

    from client.engine import resolve_device
    from models.foundation.lora import trainable_keys

    if mode not in modes_of(method):
        raise ValueError(f"unknown mode {mode!r} for method {method!r}; valid: "
                         f"{', '.join(modes_of(method))}")
    if warmup < 1 or steps < 1:
        raise ValueError("warmup and steps must be >= 1 (the first engine step anchors timing)")
    device = resolve_device(device_name)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    model, task = build_site_model(foundation_dir, image_size=image_size, method=method,
                                   patch_size=patch_size)
    data = fixed_batch(batch, image_size)
    if mode.startswith("handwritten_"):
        wall, cpu, losses = _handwritten_steps(model, data, device, steps, warmup, sync)
    else:
        wall, cpu, losses = _engine_steps(mode, model, task, data, device, steps, warmup, sync)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"mode": mode, "device": str(device), "params": total,
            "trainable_params": trainable, "trainable_tensors": len(trainable_keys(model)),
            "ms_steps": [1e3 * t for t in wall], "cpu_ms_steps": [1e3 * t for t in cpu],
            "losses": losses}


# ---------------------------------------------------------------- parent: all modes, one table
def run_mode(mode: str, foundation_dir: Path, args) -> dict:
    repo = Path(__file__).resolve().parents[1]
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                        "PYTHONPATH": os.pathsep.join(
                            filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "bench.foundation", "--child", "--mode", mode,
           "--weights-dir", str(foundation_dir), "--device", args.device,
           "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--batch", str(args.batch), "--image-size", str(args.image_size),
           "--method", args.method,
           "--patch-size", str(SITE_PATCH[getattr(args, "encoder", "small")])]
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_RESULT):
            return json.loads(line[len(_RESULT):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"mode": mode, "error": f"child exited {proc.returncode}: {' | '.join(tail)}"}


def pool(runs: list[dict], batch: int) -> dict:
    """One mode's passes -> medians over all their timed steps (first error wins)."""
    failed = [r for r in runs if "error" in r]
    if failed:
        return failed[0]
    ms = statistics.median(t for r in runs for t in r["ms_steps"])
    cpu = statistics.median(t for r in runs for t in r["cpu_ms_steps"])
    keep = ("mode", "device", "params", "trainable_params", "trainable_tensors")
    return {k: runs[0][k] for k in keep} | {
        "ms_per_step": ms, "cpu_ms_per_step": cpu,
        "samples_per_s": batch / (ms / 1e3), "cpu_samples_per_s": batch / (cpu / 1e3),
        "ms_per_step_per_pass": [statistics.median(r["ms_steps"]) for r in runs],
        "cpu_ms_per_step_per_pass": [statistics.median(r["cpu_ms_steps"]) for r in runs],
        "losses_first_pass": runs[0]["losses"]}


def throughput(args) -> dict:
    method = getattr(args, "method", "lora")
    engine, hand, dp = order = modes_of(method)
    keys = figure_keys(method)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="medfed-bench-foundation-") as tmp:
        foundation_dir = Path(tmp)
        save_encoder(foundation_dir / WEIGHTS_NAME, args.family,
                     ENCODERS[getattr(args, "encoder", "small")])
        runs: dict[str, list[dict]] = {m: [] for m in order}
        for r in range(args.repeats):
            for m in order[::-1] if r % 2 else order:
                runs[m].append(run_mode(m, foundation_dir, args))
                print(f"pass {r + 1}/{args.repeats} {m}: "
                      f"{runs[m][-1].get('error') or 'ok'}", flush=True)
    modes = {m: pool(rs, args.batch) for m, rs in runs.items()}
    figures = {
        keys["throughput"]: mode_ratio(modes, engine, hand, "samples_per_s"),
        keys["dp"]: mode_ratio(modes, dp, engine, "ms_per_step"),
    }
    cpu_figures = {
        keys["throughput_cpu"]: mode_ratio(modes, engine, hand, "cpu_samples_per_s"),
        keys["dp_cpu"]: mode_ratio(modes, dp, engine, "cpu_ms_per_step"),
    }
    # Same weights, same adapter init, same samples: the engine's non-DP losses must follow
    # the hand-written loop's (only the sample order inside the batch differs) - else the two
    # modes would not be doing the same work.
    a = modes.get(engine, {}).get("losses_first_pass")
    b = modes.get(hand, {}).get("losses_first_pass")
    loss_gap = max(abs(x - y) for x, y in zip(a, b)) if a and b else None
    device = next((m["device"] for m in modes.values() if "device" in m), args.device)
    gpu = device.startswith("cuda")
    return figures | {
        **cpu_figures,
        "throughput_targets": {
            keys["throughput"]: f">= {TARGETS['lora_throughput_ratio']}",
            keys["dp"]: f"<= {dp_target(device)} ({'GPU' if gpu else 'CPU'})"},
        "throughput_targets_met": {
            keys["throughput"]: figures[keys["throughput"]] is not None
            and figures[keys["throughput"]] >= TARGETS["lora_throughput_ratio"],
            keys["dp"]: figures[keys["dp"]] is not None
            and figures[keys["dp"]] <= dp_target(device)},
        "max_loss_gap_engine_vs_handwritten": loss_gap,
        "errors": {k: m["error"] for k, m in modes.items() if "error" in m},
        "device": device,
        # On the shared 2-core box other jobs inflate wall time unevenly across modes; the
        # CPU-time ratios above are the steadier figures when the load average is high.
        "load_average_1min": {"before": load_before[0], "after": os.getloadavg()[0]},
        "cpu_count": os.cpu_count(),
        "config": {"family": args.family, "encoder_name": getattr(args, "encoder", "small"),
                   "encoder": ENCODERS[getattr(args, "encoder", "small")],
                   "patch_size": SITE_PATCH[getattr(args, "encoder", "small")],
                   "num_channels": NUM_CHANNELS, "num_classes": NUM_CLASSES,
                   **adapter(method),
                   "batch_size": args.batch, "image_size": args.image_size,
                   "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
                   "threads": 1, "optimizer": "AdamW (TrainConfig defaults)",
                   "dp": {"noise_multiplier": NOISE_MULTIPLIER, "max_grad_norm": MAX_GRAD_NORM,
                          "sample_rate": 1.0, "secure_mode": True},
                   "autocast": "bf16" if device.startswith("cuda") else "none"},
        "method": ("each mode in its own process, --repeats interleaved passes (every other "
                   "in reverse order); time = median wall (and process CPU) ms over all timed "
                   "steps after --warmup; engine steps timed between consecutive after_step "
                   "calls of Engine.fit; samples/s = batch / median step time"),
        "modes": modes,
    }


def _key(payload: dict, name: str) -> str:
    """The RESULTS.md row of ``results/<name>.json``: a ``--name`` of its own gets its own
    row (a fused-tokens run replaced the default run's row)."""
    if name not in ("foundation", "foundation_gpu"):
        return name
    return "foundation" + (" (GPU)" if payload.get("device", "").startswith("cuda") else "")


def _f(x, spec=".2f") -> str:
    return "-" if x is None else format(x, spec)


def _met(flag) -> str:
    return "not measured" if flag is None else ("met" if flag else "not met")


def _throughput_cells(payload: dict) -> tuple[str, str]:
    """(figures, details) of the throughput half, or a note when it was not measured."""
    if payload.get("lora_throughput_ratio") is None and "modes" not in payload:
        return "throughput not measured", ""
    met = payload.get("throughput_targets_met", {})
    m, c = payload["modes"], payload["config"]
    method = c.get("method", "lora")
    keys, label = figure_keys(method), LABELS.get(method, method)
    kind = f"rank-{c['lora_rank']} {label}" if "lora_rank" in c else label
    sps = ", ".join(f"{k} {_f(v.get('samples_per_s'), '.1f')} samples/s "
                    f"({_f(v.get('ms_per_step'), '.0f')} ms, "
                    f"CPU {_f(v.get('cpu_ms_per_step'), '.0f')} ms/step)" for k, v in m.items())
    extra = "" if method == "lora" else (
        f"; max loss gap engine vs hand-written "
        f"{_f(payload.get('max_loss_gap_engine_vs_handwritten'), '.1e')}; load average "
        f"{_f(payload['load_average_1min']['before'])} → "
        f"{_f(payload['load_average_1min']['after'])}")
    def goal(key: str, target: float) -> str:
        """met / not met; for dora and ia3 also by how much a figure misses its goal."""
        words, value = _met(met.get(keys[key])), payload.get(keys[key])
        if method == "lora" or words != "not met" or value is None:
            return words
        return f"{words}, off by {abs(value - target):.2f}×"

    return (f"{label} step vs hand-written PyTorch+peft: **{_f(payload[keys['throughput']])}×** "
            f"samples/s (goal ≥ 0.95: {goal('throughput', TARGETS['lora_throughput_ratio'])}); "
            f"DP-SGD/non-DP step time on {label}: **{_f(payload[keys['dp']])}×** (goal ≤ "
            f"{dp_target(payload.get('device', ''))}: "
            f"{goal('dp', dp_target(payload.get('device', '')))}); CPU-time ratios "
            f"{_f(payload.get(keys['throughput_cpu']))}× / "
            f"{_f(payload.get(keys['dp_cpu']))}×",
            f"throughput: {c['family']} {c['encoder']['hidden_size']}-wide × "
            f"{c['encoder']['num_hidden_layers']} layers via the foundation model "
            f"({kind}), {c['num_channels']} channels {c['image_size']}², "
            f"batch {c['batch_size']}, {c['steps']} steps × {c['repeats']} passes, 1 thread; "
            f"{sps}{extra}")


def _dp_words(mcc: dict) -> str:
    """How the DP figure was made: the recipe or plain, this run's draws or pooled seeds."""
    recipe = " (DP recipe)" if mcc["settings"].get("dp_recipe") else ""
    pooled = mcc.get("dp_seeds")
    if not pooled:
        return recipe
    return (f"{recipe}, mean of {pooled['seeds']} seeds ± {pooled['site_test_ratio_se']:.3f} "
            f"(bench.dp_seeds; this run's 2 draws alone "
            f"{_two_draws(mcc, 'dp_lora_over_lora_eps8')}×)")


def _two_draws(mcc: dict, key: str) -> str:
    """This run's own two-draw figure beside a figure pooled over seeds."""
    two = mcc["summary"].get(f"{key}_two_draws")
    return "-" if two is None else f"{two:.2f}"


def _fed_words(mcc: dict) -> str:
    """How the federated/pooled figure was made: this run's draws or pooled seeds."""
    fed = mcc.get("fed_seeds")
    if not fed:
        return ""
    return (f" ({fed['arm']} over {fed['seeds'][0]} seeds, its pooled arm over "
            f"{fed['seeds'][1]}, ± {fed['ratio_se']:.3f}; bench.dp_seeds --federated; this "
            f"run's 2 draws alone {_two_draws(mcc, 'federated_over_pooled')}×)")


# the summary's two-draw federated / pooled figure of each federated recipe
TWO_DRAWS = {"lora": "federated_over_pooled", "lora_ffa": "federated_over_pooled_ffa"}


def _f_ffa(summary: dict) -> str:
    """FFA-LoRA's federated / pooled beside plain LoRA's, when both FFA arms ran."""
    ratio = summary.get("federated_over_pooled_ffa")
    return "" if ratio is None else f" (FFA-LoRA / pooled FFA-LoRA {ratio:.2f}×)"


def _mcc_cells(payload: dict) -> tuple[str, str]:
    """(figures, details) of the MCC half, or a note when it was not measured."""
    mcc = payload.get("mcc")
    if not mcc:
        return "MCC arms not measured", ""
    summary = mcc["summary"]

    def figure(key: str, spec: str, unit: str, goal: str, metric: str, arms: tuple) -> str:
        """The bold figure and its goal; a null figure says whether an arm it needs has no
        result (not measured) or both were measured and the denominator MCC was <= 0."""
        value = payload.get(key)
        if value is not None:
            flag = mcc.get("targets_met", {}).get(key)
            return f"**{_f(value, spec)}{unit}** (goal {goal}: {_met(flag)})"
        missing = [a for a in arms if a not in summary.get(metric, {})]
        if missing:
            what = metric.replace("_mcc", " MCC").replace("_", "-")    # external MCC
            return f"not measured (no {' or '.join(missing)} {what} result; goal {goal})"
        if unit != "×":                 # a difference: null when no draw holds both arms
            return f"not measured (no draw with both {' and '.join(arms)}; goal {goal})"
        return f"**-×** (goal {goal}: undefined, denominator MCC ≤ 0)"

    ext = summary["external_mcc"]
    s = mcc["settings"]
    arms = ", ".join(f"{a} {v['mean']:.2f} [{v['min']:.2f}, {v['max']:.2f}]"
                     for a, v in ext.items())
    # MCC is exactly 0 when a model predicts one class for every study: say so, or a row of
    # zeros reads like a measured tie.
    constant = [a for a, v in ext.items() if all(x == 0.0 for x in v["values"])]
    if constant:
        arms += (f" (exactly 0.00 in every draw, i.e. one class predicted for every external "
                 f"study: {', '.join(constant)})")
    return (f"MM-DINOv2-from-pretrained − scratch external MCC: "
            + figure("mm_dino_pretrained_minus_supervised_scratch", "+.3f", "", "≥ +0.05",
                     "external_mcc", ("mm_dino", "supervised_scratch"))
            + "; federated LoRA / pooled" + _fed_words(mcc) + ": "
            + figure("federated_over_pooled", ".3f" if mcc.get("fed_seeds") else ".2f", "×",
                     "≥ 0.9", "external_mcc", ("lora", "pooled"))
            + _f_ffa(summary)
            + "; DP-LoRA ε=8 / LoRA site-test MCC"
            + _dp_words(mcc) + ": "
            + figure("dp_lora_over_lora_eps8", ".3f" if mcc.get("dp_seeds") else ".2f", "×",
                     "≥ 0.97", "site_test_mcc", ("dp_lora", "lora")),
            f"MCC: external MCC mean [min, max] over draws {list(s['draws'])}: {arms}; "
            f"{s['sites']} sites × ~{s['patients_per_site']} patients, "
            f"{s['label_fraction']:.0%} labels, {s['pretrain_rounds']}+{s['rounds']} rounds; "
            f"Dinov2 {mcc['encoder']['hidden_size']}-wide × "
            f"{mcc['encoder']['num_hidden_layers']} layers, patch "
            f"{mcc['encoder']['patch_size']}, {_public_words(mcc['public_pretraining'])} on "
            f"a disjoint public cohort of {mcc['public_pretraining']['studies']} studies"
            f"{'' if mcc.get('complete') else ' (INCOMPLETE run)'}")


def _public_words(record: dict) -> str:
    """How the public encoder was made, from its pretraining record (records before session
    25 are label-free MM-DINOv2 over an RGB encoder)."""
    objective = str(record.get("objective", "mm_dino"))
    words = ("pretrained with image-report CLIP (no class label)" if objective.startswith("clip")
             else "pretrained label-free (MM-DINOv2)")
    if record.get("patch_embedding") == "channels":
        words += ", 4 input channels read slice by slice (patch_init=channels)"
    return words


def _row(payload: dict, name: str = "foundation") -> str:
    (tf, td) = _throughput_cells(payload)
    if payload.get("config", {}).get("method", "lora") != "lora":     # a throughput-only file
        return f"| {_key(payload, name)} | {tf} | {td} | `results/{name}.json` |"
    (mf, md) = _mcc_cells(payload)
    details = "; ".join(x for x in (md, td) if x)
    return f"| {_key(payload, name)} | {mf}; {tf} | {details} | `results/{name}.json` |"


THROUGHPUT_ONLY = ("not_measured", "targets", "targets_met")    # keys of the old layout


def merged(name: str, payload: dict, half: str) -> dict:
    """``payload`` (the ``half`` just measured) over what ``results/<name>.json`` holds of the
    other half; ``<half>_commit`` and ``<half>_machine`` say who measured what."""
    from .common import machine

    path = RESULTS_DIR / f"{name}.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    if "modes" in old and "throughput_commit" not in old:   # written before the halves
        old["throughput_commit"], old["throughput_machine"] = old.get("commit"), old.get("machine")
        for key in ("targets", "targets_met"):
            old[f"throughput_{key}"] = {k: v for k, v in old.get(key, {}).items()
                                        if k in TARGETS}
    for key in (*THROUGHPUT_ONLY, "commit", "machine"):
        old.pop(key, None)
    return old | payload | {f"{half}_commit": commit(), f"{half}_machine": machine()}


def default_name(method: str, device: str, encoder: str = "small") -> str:
    """results/<name>.json of a throughput run without --name: LoRA keeps foundation.json
    (foundation_gpu), every other adapter a file of its own; another encoder than the small
    default, the same name + ``_<encoder>``."""
    gpu = device.startswith("cuda")
    if method == "lora":
        name = "foundation_gpu" if gpu else "foundation"
    else:
        name = f"foundation_throughput_{method}" + ("_gpu" if gpu else "")
    return name if encoder == "small" else f"{name}_{encoder}"


def run_throughput(args, parser) -> None:
    if args.warmup < 1 or args.steps < 1 or args.repeats < 1:
        parser.error("--steps, --warmup and --repeats must be >= 1")
    payload = throughput(args)
    for m in payload["modes"].values():
        if "error" in m:
            print(f"{m['mode']:<18}failed: {m['error']}")
        else:
            print(f"{m['mode']:<18}{m['ms_per_step']:>9.1f} ms{m['cpu_ms_per_step']:>9.1f} "
                  f"cpu ms{m['samples_per_s']:>9.1f} samples/s")
    keys = figure_keys(args.method)
    print(f"{keys['throughput']} {payload[keys['throughput']]}, {keys['dp']} "
          f"{payload[keys['dp']]}")
    if args.method != "lora":
        print(f"CPU-time: {keys['throughput_cpu']} {payload[keys['throughput_cpu']]}, "
              f"{keys['dp_cpu']} {payload[keys['dp_cpu']]}; max loss gap "
              f"{payload['max_loss_gap_engine_vs_handwritten']}; load "
              f"{payload['load_average_1min']}")
    name = args.name or default_name(args.method, payload["device"], args.encoder)
    payload = merged(name, payload, "throughput")
    path = write_result(name, payload)
    update_results_md(_key(payload, name), _row(payload, name))
    print(f"wrote {path}")


QUICK = dict(patients=24, public_patients=24, public_epochs=1, rounds=1, local_epochs=1,
             pretrain_rounds=1, pretrain_epochs=1, draws="0", label_fraction=0.3)


def _seeds_file(name: str, settings: dict, public: dict) -> dict | None:
    """``results/<name>.json`` of ``bench.dp_seeds`` when it pooled ``bench.dp_centre`` runs
    of this run's public encoder (sha256) and settings; else None."""
    from . import dp_centre

    path = RESULTS_DIR / f"{name}.json"
    if not (path.is_file() and public.get("sha256")):
        return None
    pooled = json.loads(path.read_text())
    same = {k: settings.get(k) for k in dp_centre.SETTINGS} == dp_centre.SETTINGS
    return pooled if same and pooled.get("encoder_sha256") == public["sha256"] else None


def pooled_dp_seeds(name: str, settings: dict, public: dict) -> dict | None:
    """``bench.dp_seeds``' figure (``results/<name>.json``) when it measured this run's DP arm:
    the DP recipe (``settings["dp_recipe"]``, the pooled arm's overrides the same), on the
    same public encoder (sha256) and the same draws' settings; else None. What it returns
    (ratio, standard error, seeds, source) goes into the JSON as ``dp_seeds``."""
    from . import dp_centre
    from . import foundation_mcc as fm

    pooled = _seeds_file(name, settings, public) if settings.get("dp_recipe") else None
    if pooled is None or dp_centre.VARIANTS.get(pooled.get("dp_arm")) != ("dp_lora",
                                                                        fm.DP_RECIPE):
        return None
    test = pooled["arms"][pooled["dp_arm"]]["site_test_mcc"]
    return {"source": f"results/{name}.json", "dp_arm": pooled["dp_arm"],
            "seeds": len(test["per_seed"]), "commit": pooled.get("commit"),
            "dp_lora_over_lora_eps8": pooled["dp_lora_over_lora_eps8"],
            "site_test_ratio_se": pooled["over"]["lora"]["site_test_mcc"]["ratio_se"],
            "paired_difference": pooled["over"]["lora"]["site_test_mcc"]["paired_difference"],
            "external_ratio": pooled["over"]["lora"]["external_mcc"]["ratio"]}


def pooled_fed_seeds(name: str, settings: dict, public: dict) -> dict | None:
    """``bench.dp_seeds --federated``'s figure (``results/<name>.json``) for the federated
    recipe (``foundation_mcc.FEDERATED``) against the same recipe pooled, over seeds, when
    it was measured on this run's public encoder and settings; else None. Goes into the JSON
    as ``fed_seeds``."""
    from . import foundation_mcc as fm

    pooled = _seeds_file(name, settings, public)
    if pooled is None or fm.FEDERATED not in pooled.get("over_pooled", {}):
        return None
    over = pooled["over_pooled"][fm.FEDERATED]
    return {"source": f"results/{name}.json", "arm": fm.FEDERATED, "seeds": over["seeds"],
            "commit": pooled.get("commit"), "federated_over_pooled": over["ratio"],
            "ratio_se": over["ratio_se"], "paired_difference": over["paired_difference"]}


def run_mcc(args, parser) -> None:
    from . import foundation_mcc as fm

    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    arms = tuple(args.arms.split(","))
    unknown = sorted(set(arms) - set(fm.ARMS))
    if unknown:
        parser.error(f"unknown arms {unknown}; choose from {', '.join(fm.ARMS)}")
    draws = tuple(int(d) for d in args.draws.split(","))
    if fm.PUBLIC_SEED in draws:
        parser.error(f"draw seed {fm.PUBLIC_SEED} is the public cohort's")
    settings = {"draws": draws, "sites": fm.SITES, "patients_per_site": args.patients,
                "label_fraction": args.label_fraction, "rounds": args.rounds,
                "local_epochs": args.local_epochs, "pretrain_rounds": args.pretrain_rounds,
                "pretrain_epochs": args.pretrain_epochs, "lora_rank": args.lora_rank,
                "dp_epsilon": 8.0, "public_patients": args.public_patients,
                "public_epochs": args.public_epochs, "public_seed": fm.PUBLIC_SEED,
                "public_patch": args.public_patch, "public_objective": args.public_objective,
                "channel_tokens": args.channel_tokens, "dp_recipe": args.dp_recipe,
                "quick": args.quick}
    name = args.name or ("foundation_quick" if args.quick else "foundation")
    logging.basicConfig(level=logging.WARNING)
    results: dict[int, dict] = {}
    mcc: dict = {"settings": settings, "encoder": fm.ENCODER, "arms": list(arms),
                 "arm_descriptions": ARM_DESCRIPTIONS, "draws": results}

    def write(complete: bool) -> Path:
        summary = fm.summarize(results)
        mcc.update(summary=summary, targets_met=fm.targets_met(summary), complete=complete,
                   targets={"mm_dino_pretrained_minus_supervised_scratch": ">= 0.05",
                            "federated_over_pooled": ">= 0.9",
                            "dp_lora_over_lora_eps8": ">= 0.97"})
        top = {k: summary[k] for k in ("mm_dino_pretrained_minus_supervised_scratch",
                                       "federated_over_pooled", "dp_lora_over_lora_eps8")}
        pooled = pooled_dp_seeds(args.dp_seeds, settings, mcc.get("public_pretraining", {}))
        if pooled is not None:          # the "mean of seeds": these draws are 2 of them
            top["dp_lora_over_lora_eps8"] = pooled["dp_lora_over_lora_eps8"]
            mcc["summary"]["dp_lora_over_lora_eps8_two_draws"] = summary["dp_lora_over_lora_eps8"]
            mcc["summary"]["dp_lora_over_lora_eps8"] = pooled["dp_lora_over_lora_eps8"]
            mcc["summary"]["dp_lora_over_lora_eps8_external_two_draws"] = \
                summary["dp_lora_over_lora_eps8_external"]
            mcc["summary"]["dp_lora_over_lora_eps8_external"] = pooled["external_ratio"]
            mcc["targets_met"] = fm.targets_met(mcc["summary"])
            mcc["dp_seeds"] = pooled
        fed = pooled_fed_seeds(args.fed_seeds, settings, mcc.get("public_pretraining", {}))
        if fed is not None:             # the federated recipe over seeds, as for DP
            top["federated_over_pooled"] = fed["federated_over_pooled"]
            mcc["summary"]["federated_over_pooled_two_draws"] = summary[TWO_DRAWS[fed["arm"]]]
            mcc["summary"]["federated_over_pooled"] = fed["federated_over_pooled"]
            mcc["targets_met"] = fm.targets_met(mcc["summary"])
            mcc["fed_seeds"] = fed
        payload = merged(name, top | {"mcc": mcc}, "mcc")
        path = write_result(name, payload)
        if not args.quick:           # a smoke run never becomes a RESULTS.md row
            update_results_md(_key(payload, name), _row(payload, name))
        return path

    old: dict = {}
    if args.resume:
        if args.work is None:
            parser.error("--resume needs the --work folder of the earlier sitting (its "
                         "pretrained encoder)")
        path = RESULTS_DIR / f"{name}.json"
        old = json.loads(path.read_text()).get("mcc", {}) if path.exists() else {}
        try:
            fm.check_settings(old, settings)       # before hours of public pretraining
        except ValueError as err:
            parser.error(str(err))
    with contextlib.ExitStack() as stack:
        if args.work is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="medfed-bench-fm-")))
        else:                        # kept: the next sitting reuses the encoder (--resume)
            work = args.work.resolve()
            work.mkdir(parents=True, exist_ok=True)
        foundation_dir = work / "encoders"
        foundation_dir.mkdir(exist_ok=True)
        public_dir = work / "public" / "site-0"
        wanted = fm.public_wanted(patients=args.public_patients, epochs=args.public_epochs,
                                  patch=args.public_patch, objective=args.public_objective,
                                  lr=args.public_lr)

        def pretrain() -> dict:
            if public_dir.parent.exists():
                shutil.rmtree(public_dir.parent)
            fm.public_cohort(public_dir.parent, patients=args.public_patients)
            return fm.pretrain_public(public_dir, foundation_dir, epochs=args.public_epochs,
                                      batch_size=16, lr=args.public_lr, image_size=64,
                                      patch=args.public_patch,
                                      objective=args.public_objective)

        if not public_dir.is_dir():      # no cohort to check the draws against: made again
            (work / fm.PUBLIC_RECORD).unlink(missing_ok=True)
        mcc["public_pretraining"] = fm.public_pretraining(work, foundation_dir, wanted, pretrain)
        public = fm.cohort_keys(public_dir)
        if args.dp_recipe:       # the recipe's public mean and spread, beside the encoder
            mcc["public_feature_mean"] = fm.save_public_feature_mean(
                public_dir, foundation_dir, channel_tokens=args.channel_tokens,
                patch_init="channels" if args.public_patch == "channels" else "mean")
        print(f"public pretraining{' (reused)' if mcc['public_pretraining'].get('reused') else ''}"
              f": {mcc['public_pretraining']['loss_per_epoch']}", flush=True)
        if args.resume:
            try:
                results.update(fm.previous_draws(old, settings,
                                                 mcc["public_pretraining"]["sha256"]))
            except ValueError as err:
                parser.error(str(err))
            print(f"resumed: {({s: sorted(d['arms']) for s, d in results.items()})}", flush=True)
        for seed in draws:
            if seed in results and set(arms) <= set(results[seed]["arms"]):
                continue                        # finished in an earlier sitting
            results[seed] = fm.run_draw(seed, work, foundation_dir, settings, arms, public,
                                        on_arm=lambda r, seed=seed: (results.__setitem__(seed, r),
                                                                     write(False)),
                                        done=results.get(seed))
        path = write(all(set(arms) <= set(results[s]["arms"]) for s in draws))
    s = mcc["summary"]
    print(f"mm_dino - scratch {s['mm_dino_pretrained_minus_supervised_scratch']}, "
          f"federated/pooled {s['federated_over_pooled']}, DP-LoRA/LoRA "
          f"{s['dp_lora_over_lora_eps8']}\nwrote {path}")


ARM_DESCRIPTIONS = {
    "supervised_scratch": "today's ViT (mmvit_small), federated FedAvg from scratch",
    "lora": "supervised LoRA from the public-pretrained Dinov2 (loaded by NAME), federated",
    "mm_dino": "federated MM-DINOv2 continued pretraining from it (LoRA), then federated "
               "LoRA fine-tuning",
    "pooled": "the lora arm's model and recipe centrally on the union of the sites' labelled "
              "studies, rounds x local_epochs passes",
    "dp_lora": "the lora arm under sample-level DP-SGD at epsilon 8 (privacy=dpsgd; with "
               "settings.dp_recipe also the DP recipe, foundation_mcc.DP_RECIPE)",
    "lora_ffa": "the lora arm with FFA-LoRA (every lora_A frozen at its seeded "
                "initialisation, only lora_B trains and travels), federated",
    "pooled_ffa": "the lora_ffa arm's model and recipe centrally, as pooled",
}


def main() -> None:
    from models.foundation.config import CHANNEL_TOKENS

    from .foundation_mcc import ARMS as ARMS_DEFAULT, PUBLIC_OBJECTIVES, PUBLIC_PATCH

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--throughput", action="store_true",
                        help="step-time figures instead of the MCC arms")
    parser.add_argument("--name", default=None,
                        help="results/<name>.json; default foundation (foundation_gpu on "
                             "CUDA, foundation_quick with --quick)")
    mcc = parser.add_argument_group("MCC arms (default mode)")
    mcc.add_argument("--quick", action="store_true",
                     help="a minutes-long smoke run (tiny cohorts, one round, one draw)")
    mcc.add_argument("--draws", default="0,1", help="synthetic seeds of the sites, comma-separated")
    mcc.add_argument("--arms", default=",".join(ARMS_DEFAULT))
    mcc.add_argument("--patients", type=int, default=600, help="mean patients per site")
    mcc.add_argument("--label-fraction", type=float, default=0.1)
    mcc.add_argument("--rounds", type=int, default=20, help="fine-tuning rounds")
    mcc.add_argument("--local-epochs", type=int, default=5)
    mcc.add_argument("--pretrain-rounds", type=int, default=5,
                     help="federated MM-DINOv2 rounds of the mm_dino arm")
    mcc.add_argument("--pretrain-epochs", type=int, default=1)
    mcc.add_argument("--lora-rank", type=int, default=8)
    mcc.add_argument("--public-patients", type=int, default=600)
    mcc.add_argument("--public-epochs", type=int, default=40)
    mcc.add_argument("--public-lr", type=float, default=None,
                     help="public pretraining's learning rate (default: 5e-4 for mm_dino, "
                          "pretrain=clip's own for clip)")
    mcc.add_argument("--public-patch", default="channels", choices=PUBLIC_PATCH,
                     help="public pretraining's patch embedding: one shared kernel and no "
                          "channel embedding over an RGB Dinov2 (what a transformers directory "
                          "holds exactly), one per sequence, averaged when saved (sessions "
                          "17-18), or channels: a 4-channel Dinov2 (one kernel slice per "
                          "sequence, fused tokens; the arms then keep the slices, "
                          "model.options.patch_init=channels)")
    mcc.add_argument("--public-objective", default="clip", choices=PUBLIC_OBJECTIVES,
                     help="public pretraining's objective, label-free either way: MM-DINOv2, "
                          "or image-report CLIP on the public cohort's reports")
    mcc.add_argument("--channel-tokens", default="fused", choices=CHANNEL_TOKENS,
                     help="the foundation arms' model.options.channel_tokens: one token per "
                          "sequence and patch (MM-DINOv2's adaptation), or fused (one patch "
                          "embedding over all sequences, one token per location; RESULTS.md "
                          "'Foundation recipe, session 20'); part of --resume's settings")
    mcc.add_argument("--dp-recipe", action=argparse.BooleanOptionalAction, default=True,
                     help="the dp_lora arm with the DP recipe (features centred and scaled on "
                          "the public cohort, head lr 1e-2, 5 head-only rounds: "
                          "foundation_mcc.DP_RECIPE); --no-dp-recipe: plain DP-LoRA")
    mcc.add_argument("--fed-seeds", default="foundation_fed_seeds",
                     help="results/<name>.json of bench.dp_seeds --federated: when it pooled "
                          "the federated recipe (foundation_mcc.FEDERATED) and its pooled arm "
                          "over seeds on this encoder and these settings, its ratio is the "
                          "top-level federated_over_pooled")
    mcc.add_argument("--dp-seeds", default="foundation_dp_seeds",
                     help="results/<name>.json of bench.dp_seeds: when it pooled the same DP "
                          "recipe on the same encoder, its mean over seeds is the top-level "
                          "dp_lora_over_lora_eps8 (this run's two draws beside it)")
    mcc.add_argument("--work", type=Path, default=None,
                     help="keep the public cohort and the pretrained encoder here (default: "
                          "a temporary folder) so a later --resume reuses them")
    mcc.add_argument("--resume", action="store_true",
                     help="keep the (draw, arm) results already in results/<name>.json "
                          "(same settings, same encoder in --work) and run only the others")
    tp = parser.add_argument_group("--throughput")
    tp.add_argument("--family", default="dinov2", choices=FAMILIES)
    tp.add_argument("--steps", type=int, default=6, help="timed steps per mode and pass")
    tp.add_argument("--warmup", type=int, default=1, help="untimed steps first (>= 1)")
    tp.add_argument("--repeats", type=int, default=2, help="passes over all modes")
    tp.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    tp.add_argument("--image-size", type=int, default=64)
    tp.add_argument("--batch", type=int, default=16)
    tp.add_argument("--encoder", default="small", choices=tuple(ENCODERS),
                    help="small: 384-wide x 4 layers (CPU figures); vitb14: dinov2-base's "
                         "shape, ~86M parameters (the GPU figure at --image-size 224)")
    tp.add_argument("--method", default="lora", choices=ADAPTERS,
                    help="the adapter trained in every mode (the foundation model's "
                         "method option); lora writes results/foundation.json, dora / ia3 "
                         "results/foundation_throughput_<method>.json and a row of their own")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=ALL_MODES, help=argparse.SUPPRESS)
    parser.add_argument("--weights-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--patch-size", type=int, default=PATCH, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(1)
        result = run_child(args.mode, args.weights_dir, device_name=args.device,
                           steps=args.steps, warmup=args.warmup, batch=args.batch,
                           image_size=args.image_size, method=args.method,
                           patch_size=args.patch_size)
        print(_RESULT + json.dumps(result))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.throughput:
        run_throughput(args, parser)
    else:
        run_mcc(args, parser)


if __name__ == "__main__":
    main()
