"""What registering one global model version costs the server, stage by stage.

The demo's model (``experiment=demo``) is registered for ``--versions`` rounds through the
tracker's own background writer (``server/tracking.py``, ``server/registration.py``), each
round with new weights, as a run registers them. Versions 2..N are written from the program
traced for version 1: the even ones are timed (wall and CPU seconds of the writer thread),
the odd ones profiled with cProfile, summed by stage (cumulative seconds per version, the
profiler's overhead included; stages nest, so they do not add up to the total). Version 1
(trace, check, imports) is timed and reported apart.

    python -m bench.registration_cost [--versions 9]
"""

from __future__ import annotations

import argparse
import cProfile
import logging
import pstats
import statistics
import tempfile
import time
from pathlib import Path

from .common import update_results_md, write_result

# label -> (file the function is in, function name); "~" for a built-in
STAGES = {
    "register_version": ("server/versions.py", "register_version"),
    "Model.log": ("mlflow/models/model.py", "log"),
    "model directory (flavor save_model)": ("server/model_export.py", "save_model"),
    "torch.export.save (graph serialised)": ("torch/export/__init__.py", "save"),
    "pt2 archive rewritten (weights only)": ("server/pt2_archive.py", "write"),
    "MLmodel written": ("mlflow/models/model.py", "save"),
    "probe check": ("models/serving.py", "forward"),
    "artifacts copied into the store": ("mlflow/tracking/client.py", "log_model_artifacts"),
    "logged model finalized": ("mlflow/tracking/client.py", "finalize_logged_model"),
    "logged model created": ("mlflow/tracking/fluent.py", "initialize_logged_model"),
    "run read (params)": ("mlflow/tracking/client.py", "get_run"),
    "run output linked": ("mlflow/tracking/client.py", "log_outputs"),
    "registered version created": ("server/versions.py", "create_version"),
    "backbone weights saved": ("models/weights.py", "save_pretrained"),
    "backbone weights uploaded": ("mlflow/tracking/client.py", "log_artifacts"),
    "sqlite commits": ("~", "<method 'commit' of 'sqlite3.Connection' objects>"),
}


def measure(versions: int, work: Path) -> dict:
    import mlflow
    import torch
    from flwr.app import ArrayRecord

    from models.tasks import build
    from server.config import load_experiment
    from server.tracking import MlflowTracker
    from strategies.observed import RoundRecord, SiteReply

    cfg = load_experiment(["experiment=demo", f"runs_dir={work / 'runs'}",
                           "tracking.log_models=true", "name=registration-cost"])
    tracker = MlflowTracker(cfg, work)
    register = tracker.writer._register
    per_version, profiles = [], []

    def profiled(writes):
        # versions 3, 5, ... profiled; the others timed without the profiler's overhead
        profile = cProfile.Profile() if writes.round > 1 and writes.round % 2 else None
        wall, cpu = time.perf_counter(), time.thread_time()
        if profile is not None:
            profile.enable()
        try:
            return register(writes)
        finally:
            if profile is not None:
                profile.disable()
                profiles.append(profile)
            else:
                per_version.append({"round": writes.round,
                                    "wall_s": time.perf_counter() - wall,
                                    "cpu_s": time.thread_time() - cpu})

    tracker.writer._register = profiled
    try:
        for rnd in range(1, versions + 1):
            torch.manual_seed(rnd)
            model, _ = build(cfg.model.name, cfg.model_options(), cfg.task.name,
                             cfg.task_options())
            tracker.on_train(RoundRecord(round=rnd, train=[SiteReply("site-0", 1, {})],
                                         arrays=ArrayRecord(model.state_dict())))
            tracker.on_round_end(RoundRecord(round=rnd))
            tracker.latest_version()          # one at a time: nothing else on the CPU
        reused, traced = tracker.export.reused, tracker.export.traced
        serialized = getattr(tracker.export, "serialized", None)   # (older code: no count)
    finally:
        tracker.finish("")
        mlflow.end_run()
    stats = pstats.Stats(*profiles)
    stages = {label: sum(v[3] for k, v in stats.stats.items()
                         if k[2] == fn and (file == "~" or k[0].endswith(file))) / len(profiles)
              for label, (file, fn) in STAGES.items()}
    rest = per_version[1:]
    return {"versions": versions, "traced": traced, "reused": reused,
            "serialized": serialized, "first_version": per_version[0],
            "per_version_wall_s": statistics.mean(v["wall_s"] for v in rest),
            "per_version_cpu_s": statistics.mean(v["cpu_s"] for v in rest),
            "stages_profiled_s": stages, "rounds": per_version}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--versions", type=int, default=9)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="medfed-bench-") as tmp:
        result = measure(args.versions, Path(tmp))
    result["definition"] = ("writer-thread seconds per registered version: even versions of "
                            "2..N (written from the program traced for version 1), timed "
                            "without a profiler; stages: cProfile cumulative seconds per "
                            "version over the odd versions 3..N (profiler overhead included, "
                            "stages nest)")
    path = write_result("registration_cost", result)
    for label, seconds in result["stages_profiled_s"].items():
        print(f"{label:40s} {seconds * 1000:8.1f} ms")
    first = result["first_version"]
    print(f"per version: CPU {result['per_version_cpu_s']:.3f}s, wall "
          f"{result['per_version_wall_s']:.3f}s; first version CPU {first['cpu_s']:.2f}s, "
          f"wall {first['wall_s']:.2f}s; reused {result['reused']}, archives serialised "
          f"again {result['serialized']}")
    top = sorted(((s, k) for k, s in result["stages_profiled_s"].items()
                  if k != "register_version"), reverse=True)[:3]
    update_results_md(
        "registration cost",
        f"| registration cost | one global model version (demo ViT): **{result['per_version_cpu_s']:.3f}s "
        f"CPU** of the writer thread ({result['per_version_wall_s']:.3f}s wall), even versions "
        f"2..{result['versions']} | first version (trace and check, once per phase) "
        f"{first['cpu_s']:.2f}s CPU; largest stages (profiled): "
        + ", ".join(f"{k} {s * 1000:.0f} ms" for s, k in top)
        + f" | `results/{path.name}` |")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
