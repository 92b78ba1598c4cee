"""bench.ingest runs its arms on a small synthetic site and reports what it measured
(nothing written to bench/results from a test)."""

import bench.ingest as ib


def test_the_arms_run_and_the_ratios_follow_from_the_rates():
    payload = ib.main(["--patients", "12", "--repeats", "1", "--cache-patients", "12",
                       "--image-size", "32", "--train-samples", "4"], write=False)
    details = payload["details"]
    rate = details["studies_per_second"]
    assert set(rate) == {"pydicom", "reader", "reader_2w", "cached_2w"}
    assert all(v > 0 for v in rate.values())
    assert details["studies"] >= 5 and details["images"] > details["studies"]
    assert details["skipped"]                      # the synth's PACS junk is counted
    # the headline is the whole first ingest (it writes the cache); decode alone apart
    assert abs(payload["ingest_ratio_vs_pydicom"] - rate["cached_2w"] / rate["pydicom"]) < 0.02
    assert abs(payload["ingest_ratio_vs_pydicom_decode_only"]
               - rate["reader_2w"] / rate["pydicom"]) < 0.02
    assert abs(payload["ingest_ratio_vs_pydicom_decode_only_one_worker"]
               - rate["reader"] / rate["pydicom"]) < 0.02
    assert set(payload["definition"]) == {"ingest_ratio_vs_pydicom",
                                          "ingest_ratio_vs_pydicom_decode_only",
                                          "ingest_ratio_vs_pydicom_decode_only_one_worker"}
    # the cache arm: a first ingest that decodes and writes, a later process that loads it,
    # reads every training row once and trains; both figures come from that process
    cache = details["cache"]
    assert cache["first"]["cache"] == "miss" and cache["studies"] == cache["first"]["studies"]
    train = cache["train"]
    assert train["rows_read"] == cache["first"]["split_sizes"]["train"] > 0
    assert train["train_steps"] > 0 and cache["cache_disk_gb"] > 0
    assert payload["cache_load_seconds_5000"] == train["cache_load_seconds"] > 0
    assert payload["peak_rss_gb_5000"] == train["peak_rss_gb"] >= train["peak_rss_gb_after_imports"]
    row = ib.results_row(payload)                  # what bench/RESULTS.md would get
    assert row.startswith("| ingest |") and f"**{train['cache_load_seconds']:.2f} s**" in row
    assert f"**{train['peak_rss_gb']:.2f} GB**" in row
    assert f"**{payload['ingest_ratio_vs_pydicom']:.2f}x**" in row and "whole first ingest" in row
    assert f"{payload['ingest_ratio_vs_pydicom_decode_only']:.2f}x" in row
