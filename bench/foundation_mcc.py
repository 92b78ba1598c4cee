"""Foundation-model quality arms: does a pretrained DINOv2 pay off with few labels?

Stand-in for natural-image pretraining: a ``Dinov2Model`` (small: ``ENCODER``) is pretrained
CENTRALLY, label-free, on a *public* synthetic cohort - one synthetic hospital drawn with its
own seed (``PUBLIC_SEED``), whose patients are disjoint from every training site and from the
external hospital (checked by pseudonymous patient and study keys, recorded in the JSON) - with
our MM-DINOv2 objective (self-distillation + iBOT + KoLeo, every label hidden, no pseudo-labels)
through the one ``client.engine.Engine``. During that pretraining the four sequences share ONE
patch embedding and have no channel embedding (``--public-patch shared``, the default since
session 19): the model sees its input channels as a natural-image encoder sees R, G and B, one
kernel over them. The encoder is then written back as a plain transformers directory
(``save_pretrained``): the RGB patch projection holds that kernel (each colour the same; the
adaptation's RGB mean on load gives it back), so the directory is what a hospital downloading
``facebook/dinov2-small`` would hold AND exactly what was learned (the record's ``not_saved``
is zero). ``--public-patch per_sequence`` is sessions 17-18's encoder: one patch embedding per
sequence plus a channel embedding, which the directory cannot hold - the kernels are averaged
and the channel embedding dropped when saved (``not_saved`` says how much; session 19 measured
a linear probe of the reloaded encoder at 0.17 external MCC against 0.30 for the model as
trained after 2 epochs; after 10 the reloaded per-sequence encoder and the shared one probe
alike, 0.30 and 0.28 - bench/RESULTS.md, session 19). Every arm loads it by NAME (``model=foundation
model.options.weights=dinov2-public model.foundation_dir=...``).

Session 25: ``--public-objective clip`` pretrains with image-report contrastive learning on the
public cohort's reports instead (``pretrain=clip``'s from-scratch text tower; only the image
encoder is saved; no class label reaches the loss, but the reports name the diagnosis, as a
public image-report corpus would - the stand-in is then a RAD-DINO/BiomedCLIP-like medical
encoder rather than a natural-image one), and ``--public-patch channels`` makes the encoder a
4-channel ``Dinov2Model`` (``num_channels=4``, one kernel slice per sequence, trained with
fused tokens and written back exactly), which the arms read slice by slice
(``model.options.patch_init=channels``). Frozen-feature probes on draw 0 (logistic
regression on 10% of the sites' labels, external MCC): the label-free MM-DINOv2 RGB encoder
0.05-0.09 with fused tokens, a random one 0.04-0.08, CLIP after 10/20/30 public epochs
0.42/0.52/0.57 (bench/RESULTS.md, "Foundation public pretraining, session 25").

Two draws of sites (synthetic seeds ``DRAW_SEEDS``: other hospitals, other patients, other
split and 10%-label draw, other model init); per draw, at 10% of each site's labels, scored on
the draw's external hospital (all sequences) - ``bench.model_quality`` helpers:

(a) ``supervised_scratch`` - today's ViT (``mmvit_small``), federated FedAvg from scratch;
(b) ``lora``               - supervised LoRA from the pretrained Dinov2, federated;
(c) ``mm_dino``            - federated MM-DINOv2 continued pretraining from it (LoRA), then
                             federated LoRA fine-tuning;
(d) ``pooled``             - (b)'s model and recipe centrally on the union of the sites'
                             labelled 10% (same passes over the data);
(e) ``dp_lora``            - (b) under sample-level DP-SGD at epsilon 8 at every site;
(f) ``lora_ffa``, ``pooled_ffa`` - (b) and (d) with FFA-LoRA (``FFA``, session 39).

Why (e) scores 0 (session 21, draw 0, fused tokens; ``bench.dp_snr`` gives the figures): each
site holds 33-52 labelled studies, so q = 16/n = 0.31-0.48 and eps 8 over 200-300 steps needs
sigma 3.5-4.5. Of the 75,075 trainable coordinates (new patch embedding 49,344, LoRA 24,576,
head 1,155) the head holds ~95% of each clipped per-sample gradient's squared norm (pooled
features share a common component of norm ~15 against a per-study spread of ~3), and a step's
noise is ~650x the patch embedding's share of the clipped sum and ~3,000x the adapters'. Adam
turns that into lr-sized random steps: every arm predicts one class. Measured, all
external/site-test MCC 0.000 unless stated: head only; full batch (q=1, 1 epoch a round, sigma
2.85); head only at q=1 and lr 1e-2; 100% labels (10 rounds x 2 epochs: -0.01 against 0.42
without DP; head only -0.04); centrally on all 121 studies sigma must be <= 0.1 (eps ~23,000)
before LoRA learns (0.19 against 0.36), and the patch embedding, not the adapters, carries what
LoRA learns (0.36 -> -0.02 with it frozen, no noise). The DP path itself is sound: with sigma
0.01 it matches non-DP (0.36). No recipe learns at eps 8 here; the arm is kept as it is.

Public feature centring (session 23, ``bench.dp_centre``): ``save_public_feature_mean`` writes
the mean of the adapted model's pooled features over the PUBLIC cohort beside the encoder, and
``model.options.centre_features=true`` subtracts it before the head (models/foundation/
centring.py), removing the common component that took the clipping budget. The ``dp_lora``
arm is uncentred unless the settings' ``dp_recipe`` (bench.foundation's default since session
38) adds ``DP_RECIPE`` (centring, public scaling, head lr, head-only rounds); bench/RESULTS.md "DP-LoRA at epsilon 8, session 23" has what
centring changes. Session 24: ``save_public_feature_projection`` writes the PUBLIC cohort's
top principal directions (``project_features``) beside the mean; that and
``freeze_patch_embed`` are ``bench.dp_centre`` arms ("DP-LoRA at epsilon 8, session 24").

Top-level figures (means over the draws): ``mm_dino_pretrained_minus_supervised_scratch``
(external MCC, (c) - (a)); ``federated_over_pooled`` (external MCC, (b) / (d): same model, same
labelled studies, same passes); ``dp_lora_over_lora_eps8`` ((e) / (b) on the pooled site-test
MCC of the last round, ``bench.dp_utility``'s "test MCC"; the external ratio beside it). A
ratio whose denominator is not positive is left null. Two draws: the spread is the two values
(min, max), no standard deviation is claimed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import statistics
import time
from pathlib import Path

import torch

from .common import commit

PUBLIC_SEED = 1000              # the public cohort's synthetic seed (sites use DRAW_SEEDS)
DRAW_SEEDS = (0, 1)
SITES = 3
INIT_NAME, PRETRAINED_NAME = "dinov2-init", "dinov2-public"
# A dinov2-small-like encoder shrunk for the 2-core box: width 192, 3 heads, 4 layers, patch 8
# at the brain task's 64x64 (8x8 grid per sequence, no kernel resize).
ENCODER = dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=3, mlp_ratio=4,
               patch_size=8, image_size=64)
ARMS = ("supervised_scratch", "lora", "mm_dino", "pooled", "dp_lora", "lora_ffa", "pooled_ffa")
POOLED = ("pooled", "pooled_ffa")          # trained centrally, not federated
# The DP-LoRA recipe of sessions 23-29 (bench.dp_centre): the pooled features centred on the
# PUBLIC cohort's mean and divided by its per-dimension spread (files written beside the
# encoder by save_public_feature_mean), the head at its own rate 1e-2, rounds 1-5 head only.
CENTRE = "+model.options.centre_features=true"
SCALE = "+model.options.scale_features=true"
HEAD_LR = "train.head_lr=0.01"
LP5 = "train.head_only_rounds=5"
DP_RECIPE = [CENTRE, SCALE, HEAD_LR, LP5]
# FFA-LoRA (session 38): every lora_A frozen at its seeded initialisation, only lora_B trains
FFA = "+model.options.freeze_lora_a=true"
# The federated recipe whose seeds (bench.dp_seeds --federated) give the top-level
# federated_over_pooled, against the same recipe pooled (bench.dp_seeds.FED_PAIRS)
FEDERATED = "lora"
# Label-free central pretraining: no class labels reach the loss, no pseudo-labels either.
CENTRAL_DINO = dict(supervised_weight=0.0, pseudo_label_weight=0.0)


# ---------------------------------------------------------------- cohorts
def public_cohort(out: Path, *, patients: int, seed: int = PUBLIC_SEED) -> Path:
    """One synthetic hospital drawn with its own seed, written to ``out`` (``site-0``)."""
    from medfed.synth.sites import Scenario, synthesize

    synthesize(out, n_sites=1, seed=seed, external=False,
               scenario=Scenario(patients=patients, label_fraction=1.0))
    return out / "site-0"


def cohort_keys(site_dir: Path) -> dict[str, set[str]]:
    """Pseudonymous patient and study keys of one site as its reader gives them."""
    from client.data.site import load_site

    studies = load_site(site_dir).studies
    return {"patients": {s.patient_key for s in studies}, "studies": {s.key for s in studies}}


def disjointness(public: dict[str, set[str]], others: dict[str, dict[str, set[str]]]) -> dict:
    """Counts, and the overlap of the public cohort with each other site (patients and
    studies); raises if any overlap is not empty - the arms would not be honest."""
    report = {"public": {k: len(v) for k, v in public.items()}, "overlap_with_public": {}}
    for name, keys in others.items():
        overlap = {k: len(public[k] & keys[k]) for k in public}
        report["overlap_with_public"][name] = overlap
        report[name] = {k: len(v) for k, v in keys.items()}
        if any(overlap.values()):
            raise RuntimeError(f"the public cohort shares {overlap} with {name}")
    return report


# ---------------------------------------------------------------- central pretraining
def save_initial_encoder(foundation_dir: Path, seed: int = 0, num_channels: int = 3) -> Path:
    """A freshly initialised ``Dinov2Model`` (``ENCODER``, ``num_channels`` input channels:
    3 as an RGB encoder, 4 as one pretrained on the four sequences) saved as ``INIT_NAME``."""
    import transformers

    torch.manual_seed(seed)
    path = foundation_dir / INIT_NAME
    config = transformers.Dinov2Config(**ENCODER, num_channels=num_channels)
    transformers.Dinov2Model(config).save_pretrained(path)
    return path


# --public-patch: how public pretraining embeds. shared / per_sequence: an RGB (3-channel)
# Dinov2, the sequences folded into one kernel; channels: a 4-channel Dinov2 whose kernel has
# one slice per sequence (fused tokens), kept as it is by the arms (patch_init=channels).
PUBLIC_PATCH = ("shared", "per_sequence", "channels")
# --public-objective: MM-DINOv2 label-free (self-distillation + iBOT + KoLeo), or image-report
# CLIP on the public cohort's reports (the from-scratch BERT tower of pretrain=clip; only the
# image encoder is saved). Neither sees a class label.
PUBLIC_OBJECTIVES = ("mm_dino", "clip")


def share_patch_embedding(backbone) -> None:
    """One patch embedding for every sequence and no channel identity (the channel embedding
    frozen at zero): the model sees its channels as a natural-image encoder sees R, G and B
    folded into one kernel. A transformers directory holds one RGB kernel and no channel
    embedding, so what it holds is then exactly what public pretraining learned."""
    from torch import nn

    shared = backbone.patch_embed[0]
    # The same module in every slot: parameters() yields it once, so the optimiser, and the
    # DINO teacher (a deepcopy, which keeps the sharing), update one kernel.
    backbone.patch_embed = nn.ModuleList([shared] * len(backbone.patch_embed))
    with torch.no_grad():
        backbone.channel_embed.embed.weight.zero_()
    backbone.channel_embed.requires_grad_(False)


def write_back_patch_kernel(backbone) -> dict:
    """RGB patch projection := mean of the learned per-channel patch embeddings (each RGB
    colour the same kernel), so the adaptation's RGB mean on load gives that kernel back.

    Returns what the directory cannot hold (0 with ``share_patch_embedding``): the largest
    relative distance of a channel's kernel from the mean, and the norm of the channel
    embedding. A per-sequence pretraining loses both (session 19: a linear probe on the
    reloaded encoder fell from 0.30 to 0.17 external MCC after 2 epochs; not after 10)."""
    projection = backbone.encoder.embeddings.patch_embeddings.projection    # Conv2d [D, 3, p, p]
    kernels = torch.stack([lin.weight.detach() for lin in backbone.patch_embed])   # [S, D, p*p]
    biases = torch.stack([lin.bias.detach() for lin in backbone.patch_embed])      # [S, D]
    weight, bias = kernels.mean(0), biases.mean(0)
    p = backbone.patch_size
    if p != projection.kernel_size[0]:
        raise ValueError(f"patch size {p} differs from the encoder's {projection.kernel_size}")
    with torch.no_grad():
        projection.weight.copy_(weight.reshape(-1, 1, p, p).expand_as(projection.weight))
        projection.bias.copy_(bias)
    lost = ((kernels - weight).flatten(1).norm(dim=1) / weight.norm().clamp(min=1e-12)).max()
    return {"kernel_lost_relative": float(lost),
            "bias_lost": float((biases - bias).norm(dim=1).max()),
            "channel_embedding_norm": float(backbone.channel_embed.embed.weight.detach().norm())}


def write_back_fused_kernel(backbone) -> dict:
    """The encoder's own patch projection := the learned fused patch embedding (``patch=
    channels``: a ``num_channels``-input Dinov2 trained with fused tokens and
    ``patch_init=channels``, whose kernel is that embedding reshaped channel by channel), so
    the saved directory holds exactly what was learned and ``patch_init=channels`` reads it
    back. Returns ``not_saved`` (all zero: nothing is dropped)."""
    projection = backbone.encoder.embeddings.patch_embeddings.projection    # Conv2d [D, S, p, p]
    p = backbone.patch_size
    if not backbone.fused or p != projection.kernel_size[0]:
        raise ValueError("write_back_fused_kernel needs fused tokens at the encoder's patch size")
    with torch.no_grad():
        projection.weight.copy_(backbone.patch_embed.weight.reshape(projection.weight.shape))
        projection.bias.copy_(backbone.patch_embed.bias)
    return {"kernel_lost_relative": 0.0, "bias_lost": 0.0, "channel_embedding_norm": 0.0}


def _public_clip(model, image_size: int):
    """``pretrain=clip``'s task (its conf options: from-scratch BERT tower, shipped report
    vocabulary) around the foundation backbone ``model`` (its pooled features feed the image
    projection); the model whose ``backbone`` is ``model``."""
    from models.clip import CLIPModel
    from models.registry import TASKS
    from models.text import pad_id
    from server.config import load_experiment

    phase = load_experiment(["pretrain=clip", f"task.image_size={image_size}"]).pretrain_phase()
    task = TASKS.build("clip", phase.task_options())
    image_dim = model.head.in_features
    model.head = None                 # as CLIPTask.wrap: no classifier while pretraining
    return CLIPModel(model, task.config, pad_id(task.tokenizer), image_dim=image_dim), task, \
        phase.train.lr


def pretrain_public(public_dir: Path, foundation_dir: Path, *, epochs: int, batch_size: int,
                    lr: float | None, image_size: int, seed: int = 0, patch: str = "shared",
                    objective: str = "mm_dino") -> dict:
    """``objective`` (MM-DINOv2 label-free, or image-report CLIP), centrally on the public
    cohort from a random ``Dinov2Model`` (``method=full``); saves the encoder as
    ``<foundation_dir>/PRETRAINED_NAME``. ``lr`` None: 5e-4 for MM-DINOv2, ``pretrain=clip``'s
    own rate for CLIP.

    ``patch``: ``shared`` (one patch embedding, no channel embedding: the directory holds
    exactly what was learned), ``per_sequence`` (one per sequence plus a channel embedding,
    averaged away when written back: sessions 17-18's encoder) or ``channels`` (a 4-channel
    Dinov2, fused tokens, its kernel written back slice by slice: exact)."""
    if patch not in PUBLIC_PATCH:
        raise ValueError(f"patch must be one of {PUBLIC_PATCH}, got {patch!r}")
    if objective not in PUBLIC_OBJECTIVES:
        raise ValueError(f"objective must be one of {PUBLIC_OBJECTIVES}, got {objective!r}")
    from client.data.dataset import StudyDataset
    from client.data.site import load_site
    from client.engine import Engine
    from models import MODELS
    from models.foundation.export import save_encoder
    from models.registry import TASKS
    from protocol.job import TrainConfig

    channels = patch == "channels"
    save_initial_encoder(foundation_dir, seed, num_channels=4 if channels else 3)
    studies = [dataclasses.replace(s, label=-1) for s in load_site(public_dir).studies]
    torch.manual_seed(seed)
    options = dict(weights=INIT_NAME, method="full", image_size=image_size, num_classes=3)
    if channels:
        options |= dict(channel_tokens="fused", patch_init="channels")
    backbone = MODELS.build("foundation", options, foundation_dir=foundation_dir)
    if patch == "shared":
        share_patch_embedding(backbone)      # before the first step makes the teacher
    if objective == "clip":
        model, task, conf_lr = _public_clip(backbone, image_size)
        lr = conf_lr if lr is None else lr
        data = StudyDataset(studies, image_size, augment=True, text_transform=task.tokenize)
        described = "clip (image-report InfoNCE on the public reports; pretrain=clip's text " \
                    "tower, not saved; no class label)"
    else:
        task = TASKS.build("mm_dino", dict(CENTRAL_DINO))
        model, lr = task.wrap(backbone), 5e-4 if lr is None else lr
        data = StudyDataset(studies, image_size, augment=True)
        described = "mm_dino (label-free: " + ", ".join(f"{k}={v}" for k, v in
                                                        CENTRAL_DINO.items()) + ")"
    engine = Engine(task, torch.device("cpu"))
    losses, start = [], time.perf_counter()
    for epoch in range(epochs):
        data.reseed(epoch)
        out = engine.fit(model, data, TrainConfig(local_epochs=1, lr=lr, batch_size=batch_size,
                                                  seed=epoch))
        losses.append(float(out["train_loss"]))
        logging.getLogger("bench.foundation").warning("public pretraining epoch %d/%d loss %.3f",
                                                      epoch + 1, epochs, losses[-1])
    lost = write_back_fused_kernel(backbone) if channels else write_back_patch_kernel(backbone)
    save_encoder(backbone, foundation_dir / PRETRAINED_NAME)
    return {"objective": described,
            "method": "full", "patch_embedding": patch, "not_saved": lost,
            "studies": len(studies), "epochs": epochs,
            "batch_size": batch_size, "lr": lr, "loss_per_epoch": losses,
            "seconds": time.perf_counter() - start, "encoder": ENCODER | (
                {"num_channels": 4} if channels else {}),
            "saved_as": f"save_pretrained -> <foundation_dir>/{PRETRAINED_NAME}",
            "started_from": f"transformers.Dinov2Model(Dinov2Config(**ENCODER)), seed {seed}"}


def encoder_digest(foundation_dir: Path) -> str:
    """sha256 of the pretrained encoder's weights (``PRETRAINED_NAME/model.safetensors``): what
    ties arms measured in different sittings to one pretraining."""
    return hashlib.sha256((foundation_dir / PRETRAINED_NAME / "model.safetensors").read_bytes()
                          ).hexdigest()


def public_features(public_dir: Path, foundation_dir: Path, *, channel_tokens: str,
                    name: str = PRETRAINED_NAME, image_size: int = 64, batch_size: int = 32,
                    centre_features: bool = False, scale_features: bool = False,
                    patch_init: str = "mean"):
    """The adapted model's pooled features ``[N, pooled]`` over the PUBLIC cohort in
    ``public_dir`` (labels hidden, no augmentation) and the model (for its signature), taken at
    the adaptation's start (LoRA's B and the presence embedding are zero there, so the method
    does not change them); ``centre_features``: minus the public mean already saved
    (``scale_features``: then over the public spread saved with it)."""
    from client.data.dataset import StudyDataset
    from client.data.site import load_site
    from medfed.feature_stats import pooled_features
    from models import MODELS

    studies = [dataclasses.replace(s, label=-1) for s in load_site(public_dir).studies]
    options = dict(weights=name, method="linear_probe", image_size=image_size, num_classes=3,
                   channel_tokens=channel_tokens, centre_features=centre_features,
                   scale_features=scale_features, patch_init=patch_init)
    model = MODELS.build("foundation", options, foundation_dir=foundation_dir).eval()
    return pooled_features(model, StudyDataset(studies, image_size),
                           batch_size=batch_size), model


def save_public_feature_mean(public_dir: Path, foundation_dir: Path, *, channel_tokens: str,
                             name: str = PRETRAINED_NAME, image_size: int = 64,
                             batch_size: int = 32, patch_init: str = "mean") -> dict:
    """Write ``<foundation_dir>/<name>/feature_mean.safetensors`` (``centre_features``): the
    mean of the adapted model's pooled features over the PUBLIC cohort in ``public_dir`` -
    never a site's studies (``disjointness`` checks the draws against this cohort)
    (``public_features``). The model subtracts it from the pooled features before the head,
    which removes their common component: under DP-SGD that component dominated every
    per-sample gradient of the head (session 21: norm ~15 vs a per-study spread of ~3).
    Also ``feature_scale.safetensors`` (``scale_features``): each dimension's public standard
    deviation around that mean, floored at 1e-3 of their median (a dimension without public
    spread is not blown up). Returns the mean's norm, the spread around it, the scale's
    range and how many dimensions were floored."""
    from models.foundation.centring import public_stats, save_feature_mean, save_feature_scale

    features, model = public_features(public_dir, foundation_dir, channel_tokens=channel_tokens,
                                      name=name, image_size=image_size, batch_size=batch_size,
                                      patch_init=patch_init)
    mean, scale, floored = public_stats(features)
    path = save_feature_mean(foundation_dir / name, mean, model.feature_signature)
    scale_path = save_feature_scale(foundation_dir / name, scale, model.feature_signature)
    return {"studies": len(features), "file": path.name, "signature": model.feature_signature,
            "mean_norm": float(mean.norm()),
            "median_distance_from_mean": float((features - mean).norm(dim=1).median()),
            "scale_file": scale_path.name, "scale_floored_dimensions": floored,
            "scale_min_median_max": [float(scale.min()), float(scale.median()),
                                     float(scale.max())]}


def save_public_feature_projection(public_dir: Path, foundation_dir: Path, *,
                                   channel_tokens: str, directions: int = 32,
                                   name: str = PRETRAINED_NAME, image_size: int = 64,
                                   batch_size: int = 32, patch_init: str = "mean") -> dict:
    """Write ``<foundation_dir>/<name>/feature_projection.safetensors``
    (``project_features``): the top ``directions`` principal directions of the PUBLIC
    cohort's pooled features centred on the public mean (``save_public_feature_mean`` first).
    Returns the fraction of the public variance each direction holds."""
    from models.foundation.projection import principal_directions, save_feature_projection

    features, model = public_features(public_dir, foundation_dir, channel_tokens=channel_tokens,
                                      name=name, image_size=image_size, batch_size=batch_size,
                                      centre_features=True, patch_init=patch_init)
    top, share = principal_directions(features, directions)
    path = save_feature_projection(foundation_dir / name, top, model.feature_signature)
    return {"studies": len(features), "file": path.name, "directions": directions,
            "variance_share": [round(float(v), 5) for v in share],
            "variance_share_cumulative": {str(k): round(float(share[:k].sum()), 4)
                                          for k in (4, 8, 16, 32) if k <= directions}}


PUBLIC_RECORD = "public_pretraining.json"     # in --work: how the encoder there was made


def public_wanted(*, patients: int, epochs: int, patch: str, objective: str,
                  lr: float | None) -> dict:
    """How a public pretraining is asked for: what ``public_pretraining`` compares with an
    earlier sitting's record before reusing its encoder (bench.foundation and
    bench.dp_centre ask the same way, so either reuses the other's)."""
    return {"public_patients": patients, "public_epochs": epochs, "public_seed": PUBLIC_SEED,
            "public_patch": patch, "public_objective": objective, "public_lr": lr,
            "encoder": ENCODER}


def public_pretraining(work: Path, foundation_dir: Path, wanted: dict, pretrain) -> dict:
    """The public pretraining's record, with the encoder's ``sha256``: reused from ``work``
    when an earlier sitting made it with the ``wanted`` settings (and its weights still hash
    to what it recorded), else ``pretrain()`` runs and its record is kept there."""
    record_path = work / PUBLIC_RECORD
    if record_path.exists() and (foundation_dir / PRETRAINED_NAME).is_dir():
        record = json.loads(record_path.read_text())
        if record.get("wanted") == wanted and record.get("sha256") == encoder_digest(
                foundation_dir):
            return record | {"reused": True}
    record_path.unlink(missing_ok=True)     # a pretraining stopped part-way leaves no record
    record = pretrain() | {"wanted": wanted}
    record["sha256"] = encoder_digest(foundation_dir)
    partial = record_path.with_suffix(".partial")
    partial.write_text(json.dumps(record, indent=2) + "\n")
    partial.replace(record_path)
    return record


# Settings added after arms were measured without them, and the value those arms had.
IMPLICIT_SETTINGS = {"channel_tokens": "per_channel", "public_objective": "mm_dino",
                     "dp_recipe": False}


def check_settings(old: dict, settings: dict) -> None:
    """``--resume``: ``old`` (an earlier result's ``mcc`` part) was measured with these
    ``settings`` (the draws list aside), else ``ValueError`` - asked before hours of public
    pretraining, not after."""
    mine = {k: v for k, v in settings.items() if k != "draws"}
    # a setting added later has, in an older file, the value every arm then ran with
    theirs = IMPLICIT_SETTINGS | {k: v for k, v in old.get("settings", {}).items()
                                  if k != "draws"}
    differ = {k: (theirs.get(k), v) for k, v in mine.items()
              if json.dumps(theirs.get(k)) != json.dumps(v)}
    if differ:
        raise ValueError(f"--resume: the earlier arms were measured with other settings "
                         f"(file, now): {differ}; use another --name")


def previous_draws(old: dict, settings: dict, digest: str) -> dict[int, dict]:
    """``--resume``: every draw (with the arms it finished) of an earlier result ``old`` (its
    ``mcc`` part) measured with these ``settings`` and the same pretrained encoder
    (``digest``) - draws not asked for this time are kept too, never dropped from the file;
    anything else is refused rather than mixed in."""
    if not old:
        return {}
    check_settings(old, settings)
    had = old.get("public_pretraining", {}).get("sha256")
    if had != digest:
        raise ValueError(f"--resume: the earlier arms used another pretrained encoder "
                         f"(sha256 {str(had)[:12]}, now {digest[:12]}); keep its --work folder")
    return {int(seed): draw for seed, draw in old.get("draws", {}).items()}


# ---------------------------------------------------------------- one draw of sites
def run_draw(seed: int, work: Path, foundation_dir: Path, settings: dict, arms: tuple[str, ...],
             public: dict[str, set[str]], on_arm=None, done: dict | None = None,
             variants: dict[str, tuple[str, list[str]]] | None = None) -> dict:
    """Synthesize the draw's sites (+ external hospital), check them against the public
    cohort, run ``arms``; ``on_arm(result_so_far)`` after each (a stopped run keeps them).
    ``done``: this draw's arms finished in an earlier sitting (``--resume``), not run again.
    ``variants``: extra arms, ``name -> (arm, overrides added to that arm's)``, e.g.
    ``{"dp_head": ("dp_lora", ["model.options.method=linear_probe"])}``."""
    from client.data.dataset import StudyDataset
    from client.data.site import load_site
    from client.runtime import label_subset
    from medfed.synth.sites import Scenario, synthesize
    from server.config import load_experiment

    from .heterogeneity import LastRound
    from .model_quality import centralized, federated

    root = work / f"draw-{seed}"
    if root.exists():           # an earlier sitting's copy: the seed gives the same sites
        import shutil

        shutil.rmtree(root)
    synthesize(root, n_sites=SITES, seed=seed, external=True,
               scenario=Scenario(patients=settings["patients_per_site"], label_fraction=1.0))
    names = [f"site-{i}" for i in range(SITES)] + ["external"]
    result = {"seed": seed, "disjoint": disjointness(
        public, {n: cohort_keys(root / n) for n in names}),
        "arms": dict((done or {}).get("arms", {}))}
    base = [f"data.root={root}", f"runs_dir={work / 'runs'}", f"federation.num_sites={SITES}",
            f"federation.num_rounds={settings['rounds']}",
            f"train.local_epochs={settings['local_epochs']}", "tracking.log_models=false",
            f"task.options.label_fraction={settings['label_fraction']}", f"seed={seed}"]
    foundation = ["model=foundation", f"model.options.weights={PRETRAINED_NAME}",
                  f"model.foundation_dir={foundation_dir}",
                  f"model.options.lora_rank={settings['lora_rank']}",
                  f"model.options.channel_tokens={settings['channel_tokens']}"]
    if settings.get("public_patch") == "channels":   # the encoder's kernel, slice by sequence
        foundation.append("+model.options.patch_init=channels")
    ledger = f".medfed/bench-foundation-{time.time_ns()}"      # + the arm: one ledger per arm
    overrides = {
        "supervised_scratch": base,
        "lora": [*base, *foundation],
        "mm_dino": [*base, *foundation, "pretrain=mm_dino",
                    f"pretrain.num_rounds={settings['pretrain_rounds']}",
                    f"pretrain.local_epochs={settings['pretrain_epochs']}"],
        "pooled": [*base, *foundation],
        "lora_ffa": [*base, *foundation, FFA],
        "pooled_ffa": [*base, *foundation, FFA],
        # Each site's operator budget just above the target, and a ledger of this run's own
        # (as bench.dp_utility gives its DP rows).
        "dp_lora": [*base, *foundation, "privacy=dpsgd",
                    f"privacy.epsilon={settings['dp_epsilon']}",
                    f"+federation.site_node_config={{dp-epsilon:{settings['dp_epsilon'] * 1.01},"
                    f"dp-delta:1e-5,privacy-dir:{ledger}}}",
                    *(DP_RECIPE if settings.get("dp_recipe") else [])],
    }
    for variant, (arm, extra) in (variants or {}).items():
        overrides[variant] = [*overrides[arm], *extra]
    # Each DP arm spends its own budget: sharing one site ledger, a second DP arm of the draw
    # would be refused by the sites' policy (the first arm already spent epsilon).
    overrides = {a: [o.replace(ledger, f"{ledger}-{a}") for o in arm_overrides]
                 for a, arm_overrides in overrides.items()}
    lora_cfg = load_experiment(overrides["lora"])
    classes = tuple(lora_cfg.task.class_names)
    external_studies = [s for s in load_site(root / "external", classes).studies if s.label >= 0]
    external = StudyDataset(external_studies, lora_cfg.task.image_size)
    labelled = [label_subset(load_site(root / f"site-{i}", classes)
                             .split("train", labelled_only=True), settings["label_fraction"])
                for i in range(SITES)]
    result["labelled_training_studies_per_site"] = [len(s) for s in labelled]
    result["external_studies"] = len(external_studies)
    for arm in arms:
        if arm in result["arms"]:
            continue
        start = time.perf_counter()
        cfg = load_experiment(overrides[arm])
        if arm in POOLED or (variants or {}).get(arm, ("",))[0] in POOLED:
            epochs = settings["rounds"] * settings["local_epochs"]
            scores = centralized(cfg, [s for site in labelled for s in site], epochs, external)
        else:
            last = LastRound()
            scores = federated(cfg, external, external_studies, observers=(last,))
            scores["site_test_mcc"] = last.test.get("mcc")      # pooled site test, last round
        result["arms"][arm] = scores | {"seconds": time.perf_counter() - start,
                                        "overrides": [o for o in overrides[arm]
                                                      if not o.startswith(("data.root", "runs_dir",
                                                                           "model.foundation_dir"))],
                                        "commit": commit()}
        logging.getLogger("bench.foundation").warning(
            "draw %d %-18s external MCC %.3f (%.0f s)", seed, arm, scores["external_mcc"],
            time.perf_counter() - start)
        if on_arm is not None:
            on_arm(result)
    return result


# ---------------------------------------------------------------- summary
def spread(values: list[float]) -> dict:
    """Mean, min, max and the values themselves (two draws: no standard deviation claimed)."""
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
            "values": values}


def summarize(draws: dict[int, dict]) -> dict:
    """Top-level figures over the draws that completed every arm they need."""
    def arm(name: str, metric: str = "external_mcc") -> list[float]:
        return [d["arms"][name][metric] for d in draws.values()
                if d["arms"].get(name, {}).get(metric) is not None]

    out: dict = {"external_mcc": {a: spread(arm(a)) for a in ARMS if arm(a)},
                 "site_test_mcc": {a: spread(arm(a, "site_test_mcc")) for a in ARMS
                                   if arm(a, "site_test_mcc")}}
    gaps = [d["arms"]["mm_dino"]["external_mcc"] - d["arms"]["supervised_scratch"]["external_mcc"]
            for d in draws.values() if {"mm_dino", "supervised_scratch"} <= set(d["arms"])]
    out["mm_dino_pretrained_minus_supervised_scratch"] = statistics.fmean(gaps) if gaps else None
    out["mm_dino_minus_scratch_per_draw"] = gaps
    mean = {a: v["mean"] for a, v in out["external_mcc"].items()}
    test = {a: v["mean"] for a, v in out["site_test_mcc"].items()}

    def ratio(a: str, b: str, of: dict = mean) -> float | None:
        return of[a] / of[b] if a in of and b in of and of[b] > 0 else None

    # DP vs non-DP on the sites' own test splits (bench.dp_utility's "test MCC"), and on the
    # external hospital beside it.
    out["dp_lora_over_lora_eps8"] = ratio("dp_lora", "lora", test)
    out["dp_lora_over_lora_eps8_external"] = ratio("dp_lora", "lora")
    out["federated_over_pooled"] = ratio("lora", "pooled")
    out["federated_over_pooled_ffa"] = ratio("lora_ffa", "pooled_ffa")
    out["mm_dino_over_pooled"] = ratio("mm_dino", "pooled")
    out["lora_pretrained_minus_supervised_scratch"] = (
        mean["lora"] - mean["supervised_scratch"]
        if {"lora", "supervised_scratch"} <= set(mean) else None)
    return out


def targets_met(summary: dict) -> dict:
    def at_least(key: str, goal: float) -> bool | None:
        return None if summary.get(key) is None else summary[key] >= goal

    return {"mm_dino_pretrained_minus_supervised_scratch":
            at_least("mm_dino_pretrained_minus_supervised_scratch", 0.05),
            "federated_over_pooled": at_least("federated_over_pooled", 0.9),
            "dp_lora_over_lora_eps8": at_least("dp_lora_over_lora_eps8", 0.97)}


__all__ = ["ARMS", "CENTRE", "DP_RECIPE", "DRAW_SEEDS", "ENCODER", "FEDERATED", "FFA", "HEAD_LR",
           "LP5", "SCALE", "PRETRAINED_NAME", "PUBLIC_OBJECTIVES", "PUBLIC_PATCH",
           "PUBLIC_SEED", "check_settings", "cohort_keys", "commit", "disjointness",
           "encoder_digest", "pretrain_public", "previous_draws", "public_cohort",
           "public_features", "public_pretraining", "public_wanted", "save_public_feature_mean",
           "save_public_feature_projection", "share_patch_embedding", "summarize", "targets_met",
           "write_back_fused_kernel", "write_back_patch_kernel"]
