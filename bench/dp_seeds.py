"""Issue 24's DP goal over every seed run so far: DP-LoRA at epsilon 8 (the DP recipe) vs
non-DP LoRA on the same encoder, pooled from ``bench.dp_centre`` runs (no training here).

    python -m bench.dp_seeds
    python -m bench.dp_seeds --federated     # federated / pooled over seeds (session 39)
    python -m bench.dp_seeds --dp dp_lora_std_hlr5_lp5 --add foundation_hlr5_draw0 \
        --add foundation_hlr5_draw1 --name foundation_dp_seeds_hlr5

Reads the per-seed MCC of ``SOURCES`` (``results/<name>.json``, each one draw of sites run
by ``bench.dp_centre --seeds``), refuses sources pretrained from different encoders (the
public encoder's sha256) or one (draw, seed) of an arm measured twice, and reports for the
DP recipe against plain LoRA and against the same recipe without noise: each arm's mean
and spread over seeds, the ratio of the means with its standard error (delta method, the
arms' seeds taken as independent), and the paired by-seed difference. Writes
``results/foundation_dp_seeds.json`` and the ``foundation_dp_seeds`` row of RESULTS.md.
"""

from __future__ import annotations

import json
import math
import statistics

from .common import RESULTS_DIR, update_results_md, write_result

SOURCES = ("foundation_am_seeds_draw0", "foundation_am_seeds_draw1",       # seeds 0-2
           "foundation_recipe_seeds_draw0", "foundation_recipe_seeds_draw1",
           "foundation_more_seeds_draw0", "foundation_more_seeds_draw1",    # seeds 3-5
           "foundation_seeds_6_7_draw0", "foundation_seeds_6_7_draw1")      # seeds 6-7
DP = "dp_lora_std_hlr_lp5"              # standardised features + head lr + 5 head-only rounds
REFERENCES = {"lora": "plain non-DP LoRA", "lora_std_hlr_lp5": "the DP recipe without noise"}
METRICS = ("site_test_mcc", "external_mcc")
GOAL = 0.97


def collect(sources=SOURCES) -> tuple[dict[str, dict[tuple[int, int], dict]], str]:
    """``{arm: {(draw, seed): {metric: value}}}`` over ``sources``, and their encoder."""
    arms: dict[str, dict[tuple[int, int], dict]] = {}
    encoders = set()
    for name in sources:
        result = json.loads((RESULTS_DIR / f"{name}.json").read_text())
        encoders.add(result["public_pretraining"]["sha256"])
        draw = result["draw"]["seed"]
        for run, values in result["draw"]["arms"].items():
            arm, _, k = run.partition("@seed")
            key = (draw, int(k or 0))
            if key in arms.setdefault(arm, {}):
                raise SystemExit(f"{arm} draw {draw} seed {key[1]} is measured twice "
                                 f"({name}); say which run counts")
            arms[arm][key] = {m: values.get(m) for m in METRICS}    # pooled: no site test
    if len(encoders) != 1:
        raise SystemExit(f"the sources were pretrained from {len(encoders)} encoders")
    return arms, encoders.pop()


def summary(runs: dict[tuple[int, int], dict], metric: str) -> dict:
    values = [runs[k][metric] for k in sorted(runs)]
    sd = statistics.stdev(values)
    return {"per_seed": values, "mean": statistics.fmean(values), "std": sd,
            "se": sd / math.sqrt(len(values)), "min": min(values), "max": max(values)}


def compare(dp: dict, reference: dict, metric: str, goal: float = GOAL) -> dict:
    """The ratio of the means (delta-method standard error) and the paired difference."""
    a, b = summary(dp, metric), summary(reference, metric)
    ratio = a["mean"] / b["mean"]
    se = ratio * math.hypot(a["se"] / a["mean"], b["se"] / b["mean"])
    common = sorted(set(dp) & set(reference))
    diffs = [dp[k][metric] - reference[k][metric] for k in common]
    return {"ratio": ratio, "ratio_se": se, "seeds": [len(dp), len(reference)],
            "paired_seeds": len(common), "paired_difference": statistics.fmean(diffs),
            "paired_difference_sd": statistics.stdev(diffs), "goal_met": ratio >= goal}


# Issue 24's other goal over seeds, "federated >= 0.9x pooled" (external MCC): each federated
# LoRA recipe against the same recipe trained centrally on the union of the sites' labelled
# studies (bench.dp_centre's pooled arms, seeds 0-7 of both draws, session 39).
FED_SOURCES = (*SOURCES, "foundation_ffa_draw0", "foundation_ffa_draw1",          # seed 0
               "foundation_ffa_pooled_s0_draw0", "foundation_ffa_pooled_s0_draw1",
               "foundation_ffa_seeds_draw0", "foundation_ffa_seeds_draw1")       # seeds 1-7
FED_PAIRS = {"lora": "pooled", "lora_ffa": "pooled_ffa"}
FED_GOAL = 0.9


def federated(sources=FED_SOURCES, name: str = "foundation_fed_seeds") -> dict:
    """Federated / pooled external MCC over seeds for each pair in ``FED_PAIRS`` (and FFA-LoRA
    against plain LoRA, both federated); writes ``results/<name>.json`` and its RESULTS row."""
    arms, encoder = collect(sources)
    missing = sorted({a for pair in FED_PAIRS.items() for a in pair} - set(arms))
    if missing:
        raise SystemExit(f"no seeds of {missing} in the sources")
    metric = "external_mcc"
    out = {"sources": list(sources), "encoder_sha256": encoder, "goal": FED_GOAL,
           "metric": metric,
           "arms": {a: summary(arms[a], metric) for pair in FED_PAIRS.items() for a in pair},
           "over_pooled": {fed: compare(arms[fed], arms[pooled], metric, FED_GOAL)
                           for fed, pooled in FED_PAIRS.items()},
           "ffa_over_plain": compare(arms["lora_ffa"], arms["lora"], metric, 1.0)}
    path = write_result(name, out)
    cells = "; ".join(
        f"{fed} / {pooled} **{out['over_pooled'][fed]['ratio']:.3f}×** ± "
        f"{out['over_pooled'][fed]['ratio_se']:.3f} ({len(arms[fed])} / {len(arms[pooled])} "
        f"seeds; goal ≥ {FED_GOAL}: "
        f"{'met' if out['over_pooled'][fed]['goal_met'] else 'not met'})"
        for fed, pooled in FED_PAIRS.items())
    means = ", ".join(f"{a} {v['mean']:.3f} (sd {v['std']:.3f}, n {len(v['per_seed'])})"
                      for a, v in out["arms"].items())
    ffa = out["ffa_over_plain"]
    context = (f"external MCC means: {means}; federated FFA-LoRA - plain LoRA paired by seed "
               f"{ffa['paired_difference']:+.3f} (sd {ffa['paired_difference_sd']:.3f}, "
               f"{ffa['paired_seeds']} seeds); ± is the ratio's standard error; pooled from "
               f"{len(sources)} bench.dp_centre runs on encoder {encoder[:8]}, no training here")
    update_results_md(name, f"| {name} | {cells} | {context} | `results/{path.name}` |")
    print(cells)
    print(context)
    return out


def same_runs(arms: dict, encoder: str, sources: tuple, dp_arm: str, name: str) -> dict:
    """``dp_arm`` against plain LoRA, the DP-LoRA recipe (``DP``) and that recipe without
    noise on exactly the (draw, seed) runs ``dp_arm`` has; writes ``results/<name>.json``
    and its RESULTS row. Another DP method than DP-LoRA: not issue 24's goal figure."""
    runs = set(arms[dp_arm])
    references = {"lora": REFERENCES["lora"], DP: "the DP-LoRA recipe",
                  "lora_std_hlr_lp5": REFERENCES["lora_std_hlr_lp5"]}
    lacking = {ref: sorted(runs - set(arms.get(ref, {}))) for ref in references}
    if any(lacking.values()):
        raise SystemExit(f"references without some of {dp_arm}'s runs: {lacking}")
    same = {ref: {k: arms[ref][k] for k in runs} for ref in (dp_arm, *references)}
    out = {"sources": list(sources), "encoder_sha256": encoder, "dp_arm": dp_arm,
           "runs": sorted(runs),
           "arms": {arm: {m: summary(same[arm], m) for m in METRICS} for arm in same},
           "over": {ref: {m: compare(same[dp_arm], same[ref], m) for m in METRICS}
                    for ref in references}}
    path = write_result(name, out)
    over = out["over"]
    figure = "; ".join(
        f"{dp_arm} / {ref}: site-test **{over[ref]['site_test_mcc']['ratio']:.3f}×** ± "
        f"{over[ref]['site_test_mcc']['ratio_se']:.3f} (paired "
        f"{over[ref]['site_test_mcc']['paired_difference']:+.3f}), external "
        f"{over[ref]['external_mcc']['ratio']:.3f}× (paired "
        f"{over[ref]['external_mcc']['paired_difference']:+.3f})" for ref in references)
    means = ", ".join(f"{arm} {out['arms'][arm]['site_test_mcc']['mean']:.3f} / "
                      f"{out['arms'][arm]['external_mcc']['mean']:.3f}" for arm in same)
    context = (f"the same {len(runs)} (draw, seed) runs {sorted(runs)}; site-test / external "
               f"MCC means: {means}; ± is the ratio's standard error; pooled from "
               f"{len(sources)} bench.dp_centre runs on encoder {encoder[:8]}, no training "
               "here; not issue 24's DP-LoRA goal figure")
    update_results_md(name, f"| {name} | {figure} | {context} | `results/{path.name}` |")
    print(figure)
    print(context)
    return out


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dp", default=DP, help="the DP arm to compare (default: the recipe)")
    parser.add_argument("--add", action="append", default=[],
                        help="another results/<name>.json holding that arm's seeds")
    parser.add_argument("--name", default="foundation_dp_seeds")
    parser.add_argument("--same-runs", action="store_true",
                        help="compare only on the (draw, seed) runs the --dp arm has, and with "
                             "the DP-LoRA recipe too (an arm run on a subset of the seeds)")
    parser.add_argument("--federated", action="store_true",
                        help="federated / pooled over seeds instead (FED_SOURCES, "
                             "results/foundation_fed_seeds.json)")
    args = parser.parse_args(argv)
    if args.federated:
        federated((*FED_SOURCES, *args.add))
        return
    sources = (*SOURCES, *args.add)
    arms, encoder = collect(sources)
    dp_arm, name = args.dp, args.name
    if args.same_runs:
        same_runs(arms, encoder, sources, dp_arm, name)
        return
    out = {"sources": list(sources), "encoder_sha256": encoder, "dp_arm": dp_arm, "goal": GOAL,
           "arms": {arm: {m: summary(arms[arm], m) for m in METRICS}
                    for arm in (dp_arm, *REFERENCES)},
           "over": {ref: {m: compare(arms[dp_arm], arms[ref], m) for m in METRICS}
                    for ref in REFERENCES}}
    out["dp_lora_over_lora_eps8"] = out["over"]["lora"]["site_test_mcc"]["ratio"]
    path = write_result(name, out)
    lora, recipe = out["over"]["lora"], out["over"]["lora_std_hlr_lp5"]
    n = len(arms[dp_arm])

    def verdict(c: dict) -> str:
        return "met" if c["goal_met"] else f"not met, short by {GOAL - c['ratio']:.3f}x"
    figure = (f"DP-LoRA ({dp_arm}) ε=8 / plain non-DP LoRA site-test MCC over {n} seeds: "
              f"**{lora['site_test_mcc']['ratio']:.3f}×** ± "
              f"{lora['site_test_mcc']['ratio_se']:.3f} (goal ≥ {GOAL}: "
              f"{verdict(lora['site_test_mcc'])}); external "
              f"{lora['external_mcc']['ratio']:.3f}×; against the recipe without noise "
              f"{recipe['site_test_mcc']['ratio']:.3f}× / external "
              f"{recipe['external_mcc']['ratio']:.3f}×")
    means = ", ".join(f"{arm} {out['arms'][arm]['site_test_mcc']['mean']:.3f} "
                      f"(sd {out['arms'][arm]['site_test_mcc']['std']:.3f})"
                      for arm in (dp_arm, *REFERENCES))
    seeds = sorted({seed for _, seed in arms[dp_arm]})
    draws = sorted({draw for draw, _ in arms[dp_arm]})
    context = (f"site-test MCC mean over seeds {seeds[0]}-{seeds[-1]} of draws "
               f"{' and '.join(map(str, draws))}: {means}; paired by seed "
               f"DP - plain LoRA {lora['site_test_mcc']['paired_difference']:+.3f} (sd "
               f"{lora['site_test_mcc']['paired_difference_sd']:.3f}); ± is the ratio's "
               f"standard error; pooled from {len(sources)} bench.dp_centre runs on encoder "
               f"{encoder[:8]}, no training here")
    update_results_md(name, f"| {name} | {figure} | {context} | `results/{path.name}` |")
    print(figure)
    print(context)


if __name__ == "__main__":
    main()
