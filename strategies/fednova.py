"""FedNova (Wang et al., NeurIPS 2020): FedAvg with each site's update normalised by the
number of local steps it took.

With a fixed number of local epochs a site with ``n`` training studies takes ``~n / B`` steps,
so its update is ~``n`` times as long as a one-step update (with Adam, whose steps have a
fixed size, almost exactly); FedAvg then weights it by ``n`` again. A site counts ~``n**2``
where pooled training counts it ``n``, and the federation drifts towards the large sites
(FedNova's "objective inconsistency"). FedNova averages the per-step updates instead and
takes the mean number of steps of them::

    w <- w_global - tau_eff * sum_i p_i (w_global - w_i) / tau_i,   tau_eff = sum_i p_i tau_i

with ``p_i`` FedAvg's weights (``weighted_by_key``) and ``tau_i`` the local steps each site
reports (``wire.LOCAL_STEPS``). It runs in front of Flower's own FedAvg aggregation: each
reply's floating-point arrays become ``w_global - (tau_eff / tau_i)(w_global - w_i)``, whose
weighted mean is the line above; everything else (sampling, metrics, failures) is FedAvg's.

It needs every individual update and rescales them, so it neither runs behind secure
aggregation nor with site-level DP (the server's noise is calibrated to the clipped updates);
the configuration refuses both.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from protocol import wire


class FedNova(FedAvg):
    """Flower's FedAvg on step-normalised updates (module docstring)."""

    _global: ArrayRecord | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._global = arrays
        return super().configure_train(server_round, arrays, config, grid)

    @staticmethod
    def check_reply(msg: Message) -> str | None:
        """Why a train reply cannot be normalised (no positive step count), or None; the
        fault guard rejects such a reply like a malformed update."""
        metrics = msg.content.metric_records.get(wire.METRICS, MetricRecord())
        steps = metrics.get(wire.LOCAL_STEPS)
        if not isinstance(steps, (int, float)) or not np.isfinite(steps) or steps <= 0:
            return f"FedNova needs '{wire.LOCAL_STEPS}' > 0 in the train metrics, got {steps}"
        return None

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        usable = []
        for msg in replies:
            if msg.has_error():
                continue
            reason = self.check_reply(msg)
            if reason is not None:       # unguarded use: the guard has rejected these already
                raise ValueError(f"round {server_round}, node {msg.metadata.src_node_id}: "
                                 f"{reason}")
            metrics = msg.content.metric_records[wire.METRICS]
            usable.append((msg, float(metrics[wire.LOCAL_STEPS]),
                           float(metrics[self.weighted_by_key])))
        if usable:
            if self._global is None:
                raise RuntimeError("FedNova.aggregate_train before configure_train")
            total = sum(n for _, _, n in usable)
            tau_eff = sum(n * steps for _, steps, n in usable) / total
            for msg, steps, _ in usable:
                msg.content[wire.ARRAYS] = rescale(self._global, msg.content[wire.ARRAYS],
                                                   tau_eff / steps)
        return super().aggregate_train(server_round, replies)


def rescale(start: ArrayRecord, trained: ArrayRecord, factor: float) -> ArrayRecord:
    """``start + factor * (trained - start)`` for floating-point arrays (computed in float64,
    stored in ``trained``'s dtype); other arrays (counters) as trained, key order kept."""
    out = {}
    for key, array in trained.items():
        value = array.numpy()
        if value.dtype.kind != "f" or factor == 1.0:
            out[key] = array
            continue
        base = start[key].numpy().astype(np.float64)
        out[key] = Array((base + factor * (value.astype(np.float64) - base)).astype(value.dtype))
    return ArrayRecord(out)
