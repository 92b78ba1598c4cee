"""bench.ingest runs its three arms on a small synthetic site and reports what it measured
(nothing written to bench/results from a test)."""

import bench.ingest as ib


def test_the_three_arms_run_and_the_ratios_follow_from_the_rates():
    payload = ib.main(["--patients", "12", "--repeats", "1"], write=False)
    details = payload["details"]
    rate = details["studies_per_second"]
    assert set(rate) == {"pydicom", "reader", "reader_2w"} and all(v > 0 for v in rate.values())
    assert details["studies"] >= 5 and details["images"] > details["studies"]
    assert details["skipped"]                      # the synth's PACS junk is counted
    assert abs(payload["ingest_ratio_vs_pydicom"] - rate["reader_2w"] / rate["pydicom"]) < 0.02
    assert payload["cache_load_seconds_5000"] is None and "not built" in \
        payload["not_measured"]["cache_load_seconds_5000"]
