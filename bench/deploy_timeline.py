"""A deployed exchange hop by hop, from the lines ``protocol.hoptrace`` writes.

Every process of a traced deployment (``python -m bench.deploy --trace``) appends one JSON line
per hop to one file. Per instruction message (one site's part of one exchange) this lines up the
hops on one clock, measured from the moment the ServerApp started pushing the exchange:

    serverapp.push -> serverapp.pushed -> supernode.received -> supernode.stored ->
    launcher.claimed -> runner.start -> runner.pulled -> runner.approved -> runner.handled ->
    runner.pushed -> supernode.reply_seen -> supernode.replied -> serverapp.collected

and reports, per hop, the median time since the previous one (and the median offset from the
push), over the exchanges of rounds 2..n; plus the exchange's wall time (push to last reply
collected), the gap from the last reply to the next push (aggregation and the ServerApp's own
work) and the SuperLink's request count and time per route.

    python -m bench.deploy_timeline TRACE.jsonl
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

HOPS = ("serverapp.pushed", "supernode.received", "supernode.stored", "launcher.claimed",
        "runner.start", "runner.pulled", "runner.approved", "runner.handled", "runner.pushed",
        "supernode.reply_seen", "supernode.replied", "serverapp.collected")


def _median(xs: list[float]) -> float:
    return round(statistics.median(xs) * 1000, 1) if xs else float("nan")


def exchanges(lines: list[dict]) -> list[dict]:
    """One entry per ServerApp exchange: its push time and, per message, the time of each hop."""
    lines = sorted(lines, key=lambda x: x["t"])
    by_msg: dict[str, dict[str, float]] = defaultdict(dict)
    site_of: dict[str, str] = {}
    for x in lines:
        if x["msg"] and x["hop"] not in by_msg[x["msg"]]:
            by_msg[x["msg"]][x["hop"]] = x["t"]
        if x["hop"] == "runner.pulled":
            site_of[x["msg"]] = x["site"]
        if x["hop"] == "supernode.received":
            by_msg[x["msg"]]["kind"] = x.get("kind", "")
    # hops without a message id (claim, runner start): the last one of the site before the
    # runner pulled the message
    for msg, site in site_of.items():
        pulled = by_msg[msg]["runner.pulled"]
        for hop in ("launcher.claimed", "runner.start"):
            ts = [x["t"] for x in lines if x["hop"] == hop and x.get("site") == site
                  and x["t"] <= pulled]
            if ts:
                by_msg[msg][hop] = ts[-1]
    pushes = [x["t"] for x in lines if x["hop"] == "serverapp.push"]
    out = []
    for i, start in enumerate(pushes):
        end = pushes[i + 1] if i + 1 < len(pushes) else float("inf")
        msgs = {m: h for m, h in by_msg.items()
                if start <= h.get("serverapp.pushed", -1) < end}
        if msgs:
            out.append({"push": start, "next_push": end if end != float("inf") else None,
                        "messages": msgs})
    return out


def summarize(lines: list[dict], skip_first_round: bool = True) -> dict:
    """Median per-hop gaps (ms) over the traced exchanges, by exchange kind."""
    ex = exchanges(lines)
    kinds: dict[str, list[dict]] = defaultdict(list)
    for e in ex:
        kind = next(iter(e["messages"].values())).get("kind", "?")
        kinds[kind].append(e)
    report = {}
    for kind, es in kinds.items():
        es = es[1:] if skip_first_round and len(es) > 1 else es
        gaps: dict[str, list[float]] = defaultdict(list)
        offsets: dict[str, list[float]] = defaultdict(list)
        walls, afters = [], []
        for e in es:
            last = max(h.get("serverapp.collected", e["push"]) for h in e["messages"].values())
            walls.append(last - e["push"])
            if e["next_push"]:
                afters.append(e["next_push"] - last)
            for h in e["messages"].values():
                prev = e["push"]
                for hop in HOPS:
                    if hop in h:
                        gaps[hop].append(h[hop] - prev)
                        offsets[hop].append(h[hop] - e["push"])
                        prev = h[hop]
        report[kind] = {
            "exchanges": len(es),
            "exchange_ms": _median(walls),
            "after_last_reply_to_next_push_ms": _median(afters),
            "hops": {hop: {"gap_ms": _median(gaps[hop]), "at_ms": _median(offsets[hop])}
                     for hop in HOPS if gaps[hop]},
        }
    return report


def superlink_requests(lines: list[dict]) -> dict:
    """Per SuperLink route: number of requests and median / total handling time (ms)."""
    by: dict[str, list[float]] = defaultdict(list)
    for x in lines:
        if x["hop"] == "superlink.request":
            by[x["route"]].append(x["ms"])
    return {r: {"n": len(v), "median_ms": round(statistics.median(v), 2),
                "total_ms": round(sum(v), 1)} for r, v in sorted(by.items())}


def load(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def format_table(report: dict) -> str:
    rows = []
    for kind, r in report.items():
        rows.append(f"{kind}: {r['exchanges']} exchanges, exchange {r['exchange_ms']} ms, "
                    f"last reply -> next push {r['after_last_reply_to_next_push_ms']} ms")
        for hop, v in r["hops"].items():
            rows.append(f"  {hop:22s} +{v['gap_ms']:8.1f} ms   at {v['at_ms']:8.1f} ms")
    return "\n".join(rows)


if __name__ == "__main__":
    data = load(Path(sys.argv[1]))
    print(format_table(summarize(data)))
    print(json.dumps(superlink_requests(data), indent=1))
