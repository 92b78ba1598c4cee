"""bench.dp_centre's seeds: each arm again with other training seeds on the same draw, and
the per-arm summary the ratios are taken from."""

from __future__ import annotations

import pytest

from bench import dp_centre


def test_seeded_arms_keep_their_recipe_and_change_only_the_training_seed():
    variants, arms = dp_centre.with_seeds(dp_centre.VARIANTS, ("lora", "dp_head_centred"), 3,
                                          draw=1)
    assert arms == ("lora", "dp_head_centred", "lora@seed1", "dp_head_centred@seed1",
                    "lora@seed2", "dp_head_centred@seed2")
    assert variants["lora@seed2"] == ("lora", ["seed=2001"])
    base, extra = dp_centre.VARIANTS["dp_head_centred"]
    assert variants["dp_head_centred@seed1"] == (base, [*extra, "seed=1001"])
    assert variants["dp_head_centred"] == dp_centre.VARIANTS["dp_head_centred"]
    assert dp_centre.with_seeds(dp_centre.VARIANTS, ("lora",), 1, draw=0) == (
        dp_centre.VARIANTS, ("lora",))
    with pytest.raises(SystemExit):
        dp_centre.with_seeds(dp_centre.VARIANTS, ("lora",), 0, draw=0)
    more, arms = dp_centre.with_seeds(dp_centre.VARIANTS, ("lora",), 2, draw=1, first=3)
    assert arms == ("lora@seed3", "lora@seed4")
    assert (more["lora@seed3"], more["lora@seed4"]) == (("lora", ["seed=3001"]),
                                                        ("lora", ["seed=4001"]))
    assert "lora@seed1" not in more


def test_the_summary_folds_an_arms_seeds_into_mean_and_spread():
    arms = {"lora": {"external_mcc": 0.5, "site_test_mcc": 0.6},
            "lora@seed1": {"external_mcc": 0.7, "site_test_mcc": 0.4},
            "dp_head": {"external_mcc": 0.3, "site_test_mcc": None}}
    summary = dp_centre.seed_summary(arms)
    assert summary["lora"]["seeds"] == 2
    external = summary["lora"]["external_mcc"]
    assert external["per_seed"] == [0.5, 0.7] and (external["min"], external["max"]) == (0.5, 0.7)
    assert (external["mean"], external["std"]) == pytest.approx((0.6, 0.1))
    assert summary["lora"]["site_test_mcc"]["mean"] == pytest.approx(0.5)
    assert summary["dp_head"]["site_test_mcc"] == {"per_seed": [None], "mean": None}
