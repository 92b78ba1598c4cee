"""DP-LoRA at epsilon 8 with and without ``centre_features`` and the other DP levers (issue 24's
">= 0.97x test MCC").

One draw of ``bench.foundation_mcc`` (fused tokens, 3 sites x ~600 patients, 10% labels,
20 rounds x 5 local epochs), its public pretraining reused from ``--work`` (or made there,
the same settings as ``python -m bench.foundation --channel-tokens fused``), the public
feature mean written beside the encoder (``save_public_feature_mean``: public cohort only),
then only the arms asked for, in one process, side by side:

    python -m bench.dp_centre --work DIR [--draw 0] [--arms dp_head,dp_head_centred,...]
        [--seeds K] [--resume]

Arms (``VARIANTS``; ``lora`` and ``dp_lora`` are foundation_mcc's own): DP-SGD head only
(``method=linear_probe``, lr 1e-2) uncentred and centred, non-DP head only centred, DP-LoRA
centred; session 24's levers: DP-LoRA centred with the patch embedding frozen
(``freeze_patch_embed``) at rank 8 and rank 2, and non-DP LoRA centred + frozen (what the
frozen recipe can reach without noise); with the pooled features (centred) projected on
their top 16 PUBLIC principal directions (``project_features``, the directions written by
``save_public_feature_projection``): DP and non-DP head only, DP-LoRA with and without the
frozen patch embedding; session 26: with the centred features also divided by their PUBLIC
per-dimension spread (``scale_features``, ``feature_scale.safetensors`` written with the
mean): DP and non-DP head only, DP and non-DP LoRA; session 27: the head at its own learning
rate (``train.head_lr``, the DP head-only arms' 1e-2; adapters and embeddings at lr): DP-LoRA
standardised, and non-DP LoRA as the bench runs it; with per-group clipping
(``privacy.head_clip_share=0.8``: the head's part of each gradient clipped to C sqrt(0.8), the
rest to C sqrt(0.2); same noise): DP-LoRA standardised with the head's rate, also with the
patch embedding frozen (from an encoder of the same sequences its kernel is already the
pretrained one; trainable, it takes ~2/3 of the noise); session 28: self-training
(``task.options.pseudo_label_threshold=0.9``: every site's unlabelled studies join the training
with the received model's confident labels, one local epoch over ~10x the studies; DP-SGD's
sample rate and accounting then cover every training study): DP-LoRA standardised with the
head's rate, and non-DP LoRA; session 29: linear probing then fine-tuning
(``train.head_only_rounds=5``: rounds 1-5 train the head alone), DP-LoRA standardised with
the head's rate, also with per-group clipping giving the adapters most of the bound after the
head-only rounds (``head_clip_share=0.2``), and non-DP LoRA; session 30, on that DP recipe:
augmentation multiplicity (``privacy.augmentation_multiplicity=4``: each drawn study's gradient
the mean over 4 augmented views before its clipping), LoRA on the last two of the four
blocks only, and non-DP LoRA with the DP recipe's settings (standardised, head lr, 5
head-only rounds); session 31: DP and non-DP with that recipe at 30% and 100% of the
labels (2 and 1 local epochs). Writes ``results/<--name>.json`` (never foundation.json's figures);
ratios are against the ``lora`` arm when it ran here, else against ``--lora-reference``
given as ``external,site_test`` (say where it came from in RESULTS.md). ``--seeds K``: every arm
also with K - 1 more training seeds on the same draw (``arm@seed<k>``; ``--first-seed F``:
seeds F .. F + K - 1 instead); ``seeds`` in the JSON gives each arm's per-seed MCC, mean and
spread, and the ratios are of the means.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from . import foundation_mcc as fm
from .common import RESULTS_DIR, commit, machine

# the DP recipe's parts (foundation_mcc.DP_RECIPE): CENTRE (session 23), SCALE (session 26:
# public standardisation), HEAD_LR (session 27: the head at the head-only arms' rate 1e-2, the
# rest at lr), LP5 (session 29: rounds 1-5 train the head alone)
CENTRE, SCALE, HEAD_LR, LP5 = fm.CENTRE, fm.SCALE, fm.HEAD_LR, fm.LP5
FREEZE = "+model.options.freeze_patch_embed=true"
FFA = fm.FFA                                     # session 38: FFA-LoRA
PROJ = "+model.options.project_features=16"      # of 32 public directions; pooled is 384
HEAD = ["model.options.method=linear_probe", "train.lr=0.01"]
HEAD_CLIP = "privacy.head_clip_share=0.8"   # session 27: per-group clipping, head C sqrt(0.8)
# session 28: self-training - each round the site also trains on the unlabelled studies the
# received model labels with probability >= 0.9 (~10x the studies, so one local epoch)
PSEUDO = ["task.options.pseudo_label_threshold=0.9", "train.local_epochs=1"]
PSEUDO_GENTLE = ["task.options.pseudo_label_threshold=0.97", "task.options.pseudo_label_weight=0.3",
                 "train.local_epochs=1"]
# session 31: the same recipe with more labelled studies a site (the draw's labelled training
# studies at 30% / 100% instead of 10%, fewer local epochs so a round takes about as many steps:
# DP-SGD's sample rate falls ~3x / ~10x and with it the noise multiplier epsilon 8 needs)
LABELS30 = ["task.options.label_fraction=0.3", "train.local_epochs=2"]
LABELS100 = ["task.options.label_fraction=1.0", "train.local_epochs=1"]
LAST2 = ("+model.options.lora_targets=[layer.2.attention.q_proj,layer.2.attention.v_proj,"
         "layer.3.attention.q_proj,layer.3.attention.v_proj]")
VARIANTS = {
    "dp_head": ("dp_lora", HEAD),
    "dp_head_centred": ("dp_lora", [*HEAD, CENTRE]),
    "head_centred": ("lora", [*HEAD, CENTRE]),
    "dp_lora_centred": ("dp_lora", [CENTRE]),
    "dp_lora_frozen": ("dp_lora", [CENTRE, FREEZE]),
    "dp_lora_frozen_r2": ("dp_lora", [CENTRE, FREEZE, "model.options.lora_rank=2"]),
    "lora_frozen": ("lora", [CENTRE, FREEZE]),
    "dp_head_proj": ("dp_lora", [*HEAD, CENTRE, PROJ]),
    "head_proj": ("lora", [*HEAD, CENTRE, PROJ]),
    "dp_lora_proj": ("dp_lora", [CENTRE, PROJ]),
    "dp_lora_frozen_proj": ("dp_lora", [CENTRE, FREEZE, PROJ]),
    "dp_head_std": ("dp_lora", [*HEAD, CENTRE, SCALE]),
    "head_std": ("lora", [*HEAD, CENTRE, SCALE]),
    "dp_lora_std": ("dp_lora", [CENTRE, SCALE]),
    "lora_std": ("lora", [CENTRE, SCALE]),
    "dp_lora_std_hlr": ("dp_lora", [CENTRE, SCALE, HEAD_LR]),
    "lora_hlr": ("lora", [HEAD_LR]),
    "dp_lora_std_hlr_pg": ("dp_lora", [CENTRE, SCALE, HEAD_LR, HEAD_CLIP]),
    "dp_lora_std_hlr_pg_frozen": ("dp_lora", [CENTRE, SCALE, HEAD_LR, HEAD_CLIP, FREEZE]),
    "dp_lora_std_hlr_pl": ("dp_lora", [CENTRE, SCALE, HEAD_LR, *PSEUDO]),
    "lora_pl": ("lora", PSEUDO),
    # without the head's own rate: the DP models trained with it ended over-confident (>= 0.9
    # on 93-98% of the hidden studies, 41-84% right), their pseudo-labels one class per site
    "dp_lora_std_pl": ("dp_lora", [CENTRE, SCALE, *PSEUDO]),
    "lora_e1": ("lora", ["train.local_epochs=1"]),     # what one local epoch alone costs
    # gentler: only near-certain labels (0.97), each at 0.3 of a true label's weight
    "dp_lora_std_hlr_pl2": ("dp_lora", [CENTRE, SCALE, HEAD_LR, *PSEUDO_GENTLE]),
    "lora_pl2": ("lora", PSEUDO_GENTLE),
    # session 29: linear probing, then fine-tuning - rounds 1-5 of 20 train the head alone
    # (the adapters get no noise while the head, ~97% of the first gradients' norm, settles)
    "dp_lora_std_hlr_lp5": ("dp_lora", [CENTRE, SCALE, HEAD_LR, LP5]),
    "lora_lp5": ("lora", [LP5]),
    # ... and once the head fits, most of the clipping bound to the adapters (head C sqrt(0.2))
    "dp_lora_std_hlr_lp5_pg2": ("dp_lora", [CENTRE, SCALE, HEAD_LR, LP5,
                                            "privacy.head_clip_share=0.2"]),
    # session 30: augmentation multiplicity (De et al. 2022) - each drawn study enters a step
    # as 4 augmented views whose gradients are averaged before its clipping (same sigma, C, q)
    "dp_lora_std_hlr_lp5_am4": ("dp_lora", [CENTRE, SCALE, HEAD_LR, LP5,
                                            "privacy.augmentation_multiplicity=4"]),
    # ... and LoRA on the last two of the four blocks only (half the adapters, so half the
    # noise's squared norm on them)
    "dp_lora_std_hlr_lp5_last2": ("dp_lora", [CENTRE, SCALE, HEAD_LR, LP5, LAST2]),
    # the DP recipe's settings without DP: what the same recipe reaches without noise
    "lora_std_hlr_lp5": ("lora", [CENTRE, SCALE, HEAD_LR, LP5]),
    # session 38: FFA-LoRA (every lora_A frozen at its seeded init, only lora_B trains): the
    # sites' average is then exact and DP-SGD noises half the adapter coordinates. lora_ffa
    # and pooled_ffa (the same FFA recipe centrally) are bench.foundation's own arms since
    # session 39 (foundation_mcc.FFA), run here by name with --seeds.
    "dp_lora_std_hlr_lp5_ffa": ("dp_lora", [CENTRE, SCALE, HEAD_LR, LP5, FFA]),
    # session 39, registered before the run: lora_ffa, pooled and pooled_ffa over seeds 0-7 of
    # both draws; FFA becomes bench.foundation's lora and pooled arms only if federated FFA's
    # external-MCC mean over the 16 runs beats plain LoRA's (0.561 over the same 16) and
    # reaches >= 0.9x pooled_ffa's mean. Outcome: 0.555 and 0.930x - not adopted
    # (bench/RESULTS.md, "FFA-LoRA over seeds, session 39")
    # session 37: the head's own rate for the head-only rounds only. Non-DP, that rate cost
    # 0.06 site-test MCC (lora_hlr vs lora, session 27's encoder) while head-only rounds cost
    # nothing (lora_lp5); under DP it helped (+0.05, dp_lora_std_hlr vs dp_lora_std) - but
    # with the head already fitted in rounds 1-5, does the later rounds' DP fit still need it?
    "dp_lora_std_hlr5_lp5": ("dp_lora", [CENTRE, SCALE, HEAD_LR, LP5,
                                         "train.head_lr_rounds=5"]),
    # session 40, registered before the run: ten head-only rounds instead of five. Five gave
    # +0.021 site-test under DP and nothing without it (session 29); under DP the adapters'
    # per-coordinate signal is 1e-3 of the noise (results/foundation_dp_centre_snr.json), so
    # every adapter round adds noise to the features the head reads. Seeds 0-7 of both draws,
    # all reported; it replaces LP5 in foundation_mcc.DP_RECIPE only if its 16-seed mean beats
    # the recipe's 16 seeds (bench.dp_seeds: site-test 0.511, external 0.525) on BOTH
    # site-test and external MCC. Outcome: 0.485 / 0.505 (0.902x plain LoRA) - not adopted
    # (bench/RESULTS.md, "Ten head-only rounds, session 40")
    "dp_lora_std_hlr_lp10": ("dp_lora", [CENTRE, SCALE, HEAD_LR, "train.head_only_rounds=10"]),
    # session 41, registered before the run: the DP recipe with IA3 instead of LoRA (DP-SGD
    # covers IA3's scaling vectors since ed96582). IA3 trains 2 x 192 scales a block (1.5k
    # adapter coordinates against rank-8 LoRA's 24.6k), so the noise's squared norm on the
    # adapters is ~16x smaller at the same sigma and C. Seeds 0-3 of both draws on encoder
    # 1937ce5a, all reported, against the recipe (dp_lora_std_hlr_lp5) and plain LoRA on the
    # same 8 (draw, seed) runs. It becomes the README's suggested DP-SGD recipe only if its
    # mean beats the DP-LoRA recipe's on the same 8 runs on BOTH site-test and external MCC;
    # the goal figure (DP-LoRA / LoRA) is not changed by it either way. Outcome: site-test
    # +0.002, external -0.003 against the recipe on the same 8 runs (0.510 / 0.513) - level,
    # not suggested (bench/RESULTS.md, "DP-SGD with IA3 instead of LoRA, session 41")
    "dp_ia3_std_hlr_lp5": ("dp_lora", [CENTRE, SCALE, HEAD_LR, LP5, "model.options.method=ia3"]),
    # session 31: DP and non-DP with that recipe at 30% and 100% of the labels
    "dp_lora_std_hlr_lp5_l30": ("dp_lora", [CENTRE, SCALE, HEAD_LR, LP5, *LABELS30]),
    "lora_std_hlr_lp5_l30": ("lora", [CENTRE, SCALE, HEAD_LR, LP5, *LABELS30]),
    "dp_lora_std_hlr_lp5_l100": ("dp_lora", [CENTRE, SCALE, HEAD_LR, LP5, *LABELS100]),
    "lora_std_hlr_lp5_l100": ("lora", [CENTRE, SCALE, HEAD_LR, LP5, *LABELS100]),
}
SETTINGS = {"sites": fm.SITES, "patients_per_site": 600, "label_fraction": 0.1, "rounds": 20,
            "local_epochs": 5, "pretrain_rounds": 5, "pretrain_epochs": 1, "lora_rank": 8,
            "dp_epsilon": 8.0, "channel_tokens": "fused"}


def seed_name(arm: str, k: int) -> str:
    """The arm run with its draw's k-th extra training seed (k = 0: the arm itself)."""
    return arm if k == 0 else f"{arm}@seed{k}"


def with_seeds(variants: dict, arms: tuple[str, ...], seeds: int, draw: int, first: int = 0
               ) -> tuple[dict, tuple[str, ...]]:
    """``variants`` plus each of ``arms`` again with training seeds ``draw + 1000 k`` (k =
    first .. first + seeds - 1; k = 0 is the arm itself), and the arms to run, seed by seed
    (``first`` > 0: more seeds after a run of ``first``). The draw (sites, external hospital)
    and its labelled studies stay (``label_subset`` picks them by a hash of the study key);
    the seed changes the initialisation, shuffling and augmentation (DP-SGD's noise and
    sampling come from a CSPRNG whatever the seed)."""
    if seeds < 1 or first < 0:
        raise SystemExit("--seeds must be >= 1 and --first-seed >= 0")
    out = dict(variants)
    for arm in arms:
        base, extra = variants.get(arm, (arm, []))
        for k in range(max(first, 1), first + seeds):
            out[seed_name(arm, k)] = (base, [*extra, f"seed={draw + 1000 * k}"])
    return out, tuple(seed_name(a, k) for k in range(first, first + seeds) for a in arms)


def seed_summary(arms: dict) -> dict:
    """Per arm (seeds folded together): each seed's external and site-test MCC, their mean
    and spread (population standard deviation, min, max)."""
    import statistics

    grouped: dict[str, list[dict]] = {}
    for name, v in arms.items():
        grouped.setdefault(name.split("@seed")[0], []).append(v)

    def stats(values: list[float | None]) -> dict:
        if any(v is None for v in values):
            return {"per_seed": values, "mean": None}
        return {"per_seed": values, "mean": statistics.fmean(values),
                "std": statistics.pstdev(values), "min": min(values), "max": max(values)}
    return {arm: {"seeds": len(runs), "external_mcc": stats([r["external_mcc"] for r in runs]),
                  "site_test_mcc": stats([r.get("site_test_mcc") for r in runs])}
            for arm, runs in grouped.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--draw", type=int, default=0)
    parser.add_argument("--arms", default="dp_head,dp_head_centred,dp_lora_centred")
    parser.add_argument("--lora-reference", default=None,
                        help="external,site_test MCC of the non-DP lora arm measured elsewhere")
    parser.add_argument("--seeds", type=int, default=1,
                        help="run each arm with this many training seeds on the draw (the "
                             "first is the draw's own); the ratios use each arm's mean")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="start at the draw's k-th training seed (e.g. 3 after --seeds 3; "
                             "write to another --name and read both JSONs together)")
    parser.add_argument("--name", default="foundation_dp_centre")
    parser.add_argument("--resume", action="store_true",
                        help="keep the arms results/<--name>.json already holds for this draw")
    parser.add_argument("--public-objective", default="mm_dino", choices=fm.PUBLIC_OBJECTIVES,
                        help="the public encoder's pretraining (bench.foundation's option)")
    parser.add_argument("--public-patch", default="shared", choices=fm.PUBLIC_PATCH)
    parser.add_argument("--public-epochs", type=int, default=10)
    parser.add_argument("--public-lr", type=float, default=None,
                        help="default: 5e-4 for mm_dino (sessions 23-24's encoder), "
                             "pretrain=clip's own for clip")
    args = parser.parse_args()
    if args.public_lr is None and args.public_objective == "mm_dino":
        args.public_lr = 5e-4          # sessions 23-24's rate
    public_patch = args.public_patch
    settings = SETTINGS | ({"public_patch": public_patch} if public_patch == "channels" else {})
    patch_init = "channels" if public_patch == "channels" else "mean"
    wanted = fm.public_wanted(patients=600, epochs=args.public_epochs, patch=public_patch,
                              objective=args.public_objective, lr=args.public_lr)
    logging.basicConfig(level=logging.WARNING)
    variants, arms = with_seeds(VARIANTS, tuple(args.arms.split(",")), args.seeds, args.draw,
                                args.first_seed)
    work = args.work.resolve()
    foundation_dir, public_dir = work / "encoders", work / "public" / "site-0"
    foundation_dir.mkdir(parents=True, exist_ok=True)

    def pretrain() -> dict:
        fm.public_cohort(public_dir.parent, patients=wanted["public_patients"])
        return fm.pretrain_public(public_dir, foundation_dir, epochs=args.public_epochs,
                                  batch_size=16, lr=args.public_lr, image_size=64,
                                  patch=public_patch, objective=args.public_objective)

    record = fm.public_pretraining(work, foundation_dir, wanted, pretrain)
    mean = fm.save_public_feature_mean(public_dir, foundation_dir, patch_init=patch_init,
                                       channel_tokens=SETTINGS["channel_tokens"])
    projection = fm.save_public_feature_projection(public_dir, foundation_dir, directions=32,
                                                   patch_init=patch_init,
                                                   channel_tokens=SETTINGS["channel_tokens"])
    out = {"settings": settings | {"draw": args.draw}, "public_pretraining": record,
           "public_feature_mean": mean, "public_feature_projection": projection,
           "variants": variants, "commit": commit(),
           "machine": machine()}
    path = RESULTS_DIR / f"{args.name}.json"
    done = None
    if args.resume and path.is_file():
        earlier = json.loads(path.read_text())
        if [earlier["settings"], earlier["variants"]] != json.loads(json.dumps(
                (out["settings"], out["variants"]))):
            raise SystemExit(f"{path} was made with other settings or variants; not resuming")
        done = earlier.get("draw")

    def write(result: dict) -> None:
        out["draw"] = result
        out["seeds"] = seed_summary(result["arms"])
        scores = {a: (v["external_mcc"]["mean"], v["site_test_mcc"]["mean"])
                  for a, v in out["seeds"].items()}
        out.pop("lora_reference", None)         # measured here once the lora arm ran
        if "lora" not in scores and args.lora_reference:
            ext, test = (float(x) for x in args.lora_reference.split(","))
            scores["lora"] = (ext, test)
            out["lora_reference"] = {"external_mcc": ext, "site_test_mcc": test,
                                     "measured": "elsewhere (see RESULTS.md)"}
        ref = scores.get("lora")
        out["over_lora"] = {a: {"external": s[0] / ref[0] if ref and ref[0] > 0 else None,
                                "site_test": (s[1] / ref[1] if ref and s[1] is not None
                                              and ref[1] and ref[1] > 0 else None)}
                            for a, s in scores.items() if a != "lora"}
        path.write_text(json.dumps(out, indent=2, default=list) + "\n")

    public = fm.cohort_keys(public_dir)
    result = fm.run_draw(args.draw, work, foundation_dir, settings, arms, public,
                         on_arm=write, done=done, variants=variants)
    write(result)
    for arm, v in result["arms"].items():
        print(f"{arm:18s} external {v['external_mcc']:.3f} site-test "
              f"{v.get('site_test_mcc')} ({v['seconds']:.0f} s)")
    print(json.dumps(out["over_lora"], indent=1), f"\nwrote {path}")


if __name__ == "__main__":
    main()
