"""FedBN-style partial sharing: parameters matching name patterns stay at each site.

Sites never receive nor send the local parameters (e.g. normalisation layers, the head);
they keep their own copies in their node state. The server aggregates only the shared
parameters and keeps its initial copy of the local ones so the global record stays a
complete model (for checkpoints and the registry; its local parts are placeholders).
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from protocol import wire
from protocol.partial import local_keys

from .state import StatelessWrapper


class PartialSharing(StatelessWrapper, Strategy):
    """Wrap ``strategy`` so parameters matching ``patterns`` are never sent or aggregated.

    Stateless: the server's copy of the local parameters is part of every global record (and
    so of every checkpoint's arrays); a resumed run takes it from there."""

    kind = "partial-sharing"

    def __init__(self, strategy: Strategy, patterns: list[str]):
        if not patterns:
            raise ValueError("PartialSharing needs at least one local-parameter pattern")
        self.strategy = strategy
        self.patterns = list(patterns)
        self._local: dict = {}

    def summary(self) -> None:
        self.strategy.summary()

    def _split(self, arrays: ArrayRecord) -> ArrayRecord:
        local = set(local_keys(arrays.keys(), self.patterns))
        if not self._local:
            self._local = {k: arrays[k] for k in arrays.keys() if k in local}
        return ArrayRecord({k: a for k, a in arrays.items() if k not in local})

    def _complete(self, shared: ArrayRecord | None, order: list[str]) -> ArrayRecord | None:
        if shared is None:
            return None
        merged = {**{k: shared[k] for k in shared.keys()}, **self._local}
        return ArrayRecord({k: merged[k] for k in order})

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._order = list(arrays.keys())
        config[wire.LOCAL_PARAMS] = self.patterns
        return self.strategy.configure_train(server_round, self._split(arrays), config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        shared, metrics = self.strategy.aggregate_train(server_round, replies)
        return self._complete(shared, self._order), metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        config[wire.LOCAL_PARAMS] = self.patterns
        return self.strategy.configure_evaluate(server_round, self._split(arrays), config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)


class FrozenSharing(PartialSharing):
    """Wrap ``strategy`` for models whose ``frozen`` weights do not train (linear probe, LoRA
    base weights): sites receive them beside the trainable ones (``wire.FROZEN_ARRAYS``) and
    send back only the trainable ones, which are all the inner strategy sees and aggregates.
    The global record stays the complete model.

    ``send_frozen=False`` (a foundation model): each site holds the frozen base itself and
    checks it by digest, so only the trainable arrays travel, in both directions."""

    kind = "frozen-sharing"

    def __init__(self, strategy: Strategy, frozen: list[str], *, send_frozen: bool = True):
        super().__init__(strategy, list(frozen))
        self._frozen_names = set(frozen)
        self.send_frozen = send_frozen

    def _split(self, arrays: ArrayRecord) -> ArrayRecord:
        if not self._local:
            self._local = {k: arrays[k] for k in arrays.keys() if k in self._frozen_names}
        return ArrayRecord({k: a for k, a in arrays.items() if k not in self._frozen_names})

    def _attach(self, messages: Iterable[Message]) -> list[Message]:
        messages = list(messages)
        if not self.send_frozen:
            return messages
        frozen = ArrayRecord(dict(self._local))
        for msg in messages:
            msg.content[wire.FROZEN_ARRAYS] = frozen
        return messages

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._order = list(arrays.keys())
        return self._attach(self.strategy.configure_train(server_round, self._split(arrays),
                                                          config, grid))

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self._attach(self.strategy.configure_evaluate(server_round, self._split(arrays),
                                                             config, grid))
