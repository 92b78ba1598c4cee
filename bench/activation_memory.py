"""Activation memory of a ViT-B foundation model with LoRA, without and with gradient
checkpointing (``model.options.gradient_checkpointing``), non-DP and under DP-SGD's exact
per-sample clipper: what a site needs per study at training time.

    python -m bench.activation_memory [--family dinov3|dinov2] [--batch 2] [--steps 2]
                                      [--image-size 224] [--channel-tokens per_channel]

The model is what a hospital bringing ``facebook/dinov3-vitb16-pretrain-lvd1689m`` (or
``dinov2-base``) gets, with random weights: the ViT-B shape (768 wide, 12 blocks, 12 heads, MLP
3072; DINOv3: patch 16, 4 registers, RoPE; DINOv2: patch 14) built from a config, saved with
``save_pretrained`` and loaded through MedFed's own path (``foundation`` model, 4 MRI channels,
LoRA rank 8 on q/v, ``classification`` task), as a site builds it. Each mode runs in its own
process, one torch thread, float32 (CPU), on the same random batch:

* ``plain`` / ``checkpointed``        forward + backward of the task's loss;
* ``plain_dp`` / ``checkpointed_dp``  the same inside ``PerSampleClipper.capture`` (the clipper
                                       production DP-SGD uses; clipped sum at C = 1, no noise).

Figures per mode: ``saved_bytes`` - the bytes autograd keeps from the forward pass for the
backward pass beyond the model's own weights, each storage once
(``models.checkpointing.counting_saved_activations``: exact, independent of the allocator),
plus for DP the bytes the clipper itself keeps alive after the forward pass beyond those
(each hooked layer's input, or its Gram matrix for ghost norms); ``peak_rss_delta`` - the
process's peak resident set during the steps above its resident set before them (what the
allocator really took; the build and load come before); ``ms_per_step`` - median wall time
after one warm-up step. Top-level ratios checkpointed / plain for each. On a GPU under bf16
autocast most saved activations are half as large; not measured here (no device lent).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import mode_ratio, update_results_md, write_result

MODES = ("plain", "checkpointed", "plain_dp", "checkpointed_dp")
VIT_B = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12)
NUM_CHANNELS, NUM_CLASSES, LORA_RANK = 4, 3, 8


def save_encoder(directory: Path, family: str, image_size: int) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    if family == "dinov3":
        config = transformers.DINOv3ViTConfig(**VIT_B, intermediate_size=3072, patch_size=16,
                                              image_size=image_size, num_register_tokens=4)
        transformers.DINOv3ViTModel(config).save_pretrained(directory)
    else:
        config = transformers.Dinov2Config(**VIT_B, mlp_ratio=4, patch_size=14,
                                           image_size=518)
        transformers.Dinov2Model(config).save_pretrained(directory)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_mode(mode: str, foundation_dir: Path, args) -> dict:
    """One mode in this process (the parent starts one process per mode)."""
    import torch

    from client.privacy.persample import PerSampleClipper
    from models.checkpointing import counting_saved_activations
    from models.tasks import build

    torch.set_num_threads(1)
    options = {"weights": "vit-b", "num_channels": NUM_CHANNELS, "num_classes": NUM_CLASSES,
               "image_size": args.image_size, "method": "lora", "lora_rank": LORA_RANK,
               "channel_tokens": args.channel_tokens,
               "gradient_checkpointing": mode.startswith("checkpointed")}
    if args.family == "dinov2":
        options["patch_size"] = 16          # DINOv2's 14 resized, so 224 has a whole grid
    torch.manual_seed(0)
    model, task = build("foundation", options, "classification", {},
                        foundation_dir=foundation_dir)
    model.train()
    g = torch.Generator().manual_seed(1)
    size = (args.batch, NUM_CHANNELS, args.image_size, args.image_size)
    batch = {"image": torch.randn(size, generator=g),
             "present": torch.ones(args.batch, NUM_CHANNELS, dtype=torch.bool),
             "label": torch.randint(0, NUM_CLASSES, (args.batch,), generator=g)}
    dp = mode.endswith("_dp")
    clipper = PerSampleClipper(model, max_grad_norm=1.0) if dp else None
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    layout = model.layout
    tokens = layout.tokens()
    saved, held, times = [], [], []
    rss_before = _rss()
    for step in range(1 + args.steps):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        with (clipper.capture() if dp else contextlib.nullcontext()):
            with counting_saved_activations(model) as kept:
                out = task.step(model, batch)
            if dp:      # what the clipper keeps alive that autograd does not keep anyway
                extra = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                         for layer in clipper.layers for t in (layer.input, layer.input_gram)
                         if t is not None}
                held.append(sum(b for k, b in extra.items() if k not in kept["storages"]))
            out.loss.backward()
        if dp:
            clipper.clipped_sum()
        times.append(time.perf_counter() - start)
        saved.append(kept["bytes"])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    steps = times[1:] or times
    return {"saved_bytes": saved[-1] + (held[-1] if held else 0),
            "autograd_saved_bytes": saved[-1], "clipper_held_bytes": held[-1] if held else 0,
            "peak_rss_delta": peak - rss_before, "ms_per_step": 1e3 * statistics.median(steps),
            "trainable_parameters": trainable, "tokens_per_study": tokens,
            "parameters": sum(p.numel() for p in model.parameters())}


def _child(mode: str, foundation_dir: Path, args) -> dict:
    cmd = [sys.executable, "-m", "bench.activation_memory", "--child", mode,
           "--foundation-dir", str(foundation_dir), "--family", args.family,
           "--batch", str(args.batch), "--steps", str(args.steps),
           "--image-size", str(args.image_size), "--channel-tokens", args.channel_tokens]
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env,
                          cwd=Path(__file__).resolve().parents[1])
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(args) -> dict:
    with tempfile.TemporaryDirectory(prefix="medfed-bench-actmem-") as tmp:
        save_encoder(Path(tmp) / "vit-b", args.family, args.image_size)
        modes = {}
        for mode in MODES:
            modes[mode] = _child(mode, Path(tmp), args)
            print(mode, json.dumps(modes[mode]), flush=True)
    out = {}
    for suffix in ("", "_dp"):
        for key, name in (("saved_bytes", "activation_bytes"), ("peak_rss_delta", "peak_rss"),
                          ("ms_per_step", "step_time")):
            out[f"checkpointed_over_plain_{name}{suffix}"] = mode_ratio(
                modes, f"checkpointed{suffix}", f"plain{suffix}", key)
    ok = {m: r for m, r in modes.items() if "saved_bytes" in r}
    return out | {
        # what the backward pass needs kept, per study (grows with the batch)
        "activation_bytes_per_study": {m: r["saved_bytes"] / args.batch for m, r in ok.items()},
        # the step's whole peak above the loaded model at this batch (also the gradients and
        # the backward pass's temporaries, which checkpointing does not shrink)
        "peak_rss_delta_bytes": {m: r["peak_rss_delta"] for m, r in ok.items()},
        "config": {"family": args.family, **VIT_B, "image_size": args.image_size,
                   "num_channels": NUM_CHANNELS, "channel_tokens": args.channel_tokens,
                   "lora_rank": LORA_RANK, "batch": args.batch, "steps": args.steps,
                   "threads": 1, "dtype": "float32", "device": "cpu"},
        "method": " ".join(" ".join(__doc__.split("\n\n")[3:5]).split()),
        "modes": modes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=("dinov3", "dinov2"), default="dinov3")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--channel-tokens", choices=("per_channel", "fused"),
                        default="per_channel")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--foundation-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_mode(args.child, args.foundation_dir, args)))
        return
    payload = measure(args)
    path = write_result("activation_memory", payload)
    gb = 1024**3
    per = payload["activation_bytes_per_study"]
    row = (f"| activation_memory | gradient checkpointing / plain, saved activations: "
           f"**{payload['checkpointed_over_plain_activation_bytes']:.2f}x** non-DP, "
           f"**{payload['checkpointed_over_plain_activation_bytes_dp']:.2f}x** DP-SGD; step "
           f"time {payload['checkpointed_over_plain_step_time']:.2f}x / "
           f"{payload['checkpointed_over_plain_step_time_dp']:.2f}x | ViT-B "
           f"({args.family}) + LoRA r{LORA_RANK}, {NUM_CHANNELS} channels "
           f"{args.image_size}², {args.channel_tokens}, float32 CPU, batch {args.batch}; "
           f"saved activations per study " + ", ".join(f"{m} {v / gb:.2f} GB"
                                                      for m, v in per.items())
           + "; peak RSS above the model " + ", ".join(
               f"{m} {v / gb:.2f} GB" for m, v in payload["peak_rss_delta_bytes"].items())
           + f" ({payload['checkpointed_over_plain_peak_rss']:.2f}x / "
           f"{payload['checkpointed_over_plain_peak_rss_dp']:.2f}x) | "
           f"`results/{path.name}` |")
    update_results_md("activation_memory", row)
    print(row)


if __name__ == "__main__":
    main()
