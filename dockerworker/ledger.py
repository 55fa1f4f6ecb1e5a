"""The acknowledgement bookkeeping of one channel: pure, no I/O.

Owns: which inputs are in hand, which publishes wait for their confirm and
what each was for, and which acknowledgement may go out now.

Architecture Invariant: a delivery tag is offered for acknowledgement only
after `settle(tag)`, and the pump settles an input only from the confirm of
the publish of its result (or of its error or retry). Acknowledgements go
out in delivery order, as one `multiple` ack covering the longest run of
settled inputs from the oldest in hand: an input whose result is not yet
confirmed holds back the ack of every input after it, never the other way.

Publish numbers are the channel's confirm numbers (1, 2, 3, ... in publish
order); a `multiple` confirm settles every publish up to its number.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Generic, TypeVar

Record = TypeVar("Record")


class Ledger(Generic[Record]):
    """Inputs in hand and publishes awaiting confirms, for one channel."""

    def __init__(self) -> None:
        self._in_hand: deque[int] = deque()
        # Settled inputs: True when acked, False when handed back (nacked).
        self._settled: dict[int, bool] = {}
        # Insertion order is publish order, which `confirmed` relies on.
        self._unconfirmed: dict[int, Record] = {}

    def __repr__(self) -> str:
        return f"Ledger(in_hand={len(self._in_hand)}, unconfirmed={len(self._unconfirmed)})"

    @property
    def in_hand(self) -> int:
        return len(self._in_hand)

    @property
    def awaiting_confirm(self) -> int:
        return len(self._unconfirmed)

    def received(self, tag: int) -> None:
        """Input `tag` is in hand; tags must come in delivery order."""
        self._in_hand.append(tag)

    def published(self, seq: int, record: Record) -> None:
        """Publish number `seq` was sent; `record` says what it was for."""
        self._unconfirmed[seq] = record

    def confirmed(self, seq: int, multiple: bool) -> list[Record]:
        """The records a confirm (ack or nack) of `seq` answers, in publish order."""
        if not multiple:
            record = self._unconfirmed.pop(seq, None)
            return [] if record is None else [record]
        answered = []
        for number in self._unconfirmed:
            if number > seq:
                break
            answered.append(number)
        return [self._unconfirmed.pop(number) for number in answered]

    def find_unconfirmed(self, matches: Callable[[Record], bool]) -> Record | None:
        """The oldest publish still awaiting its confirm for which `matches` holds."""
        return next((record for record in self._unconfirmed.values() if matches(record)), None)

    def settle(self, tag: int, *, acked: bool = True) -> None:
        """Input `tag` is done with: to be acked, or (`acked=False`) handed back
        with a nack the caller has sent already."""
        self._settled[tag] = acked

    def take_ack(self) -> int | None:
        """The tag to acknowledge with `multiple` now, or None: the longest run
        of settled inputs from the oldest in hand is removed, and the last
        acked tag in it returned. Never a nacked tag: the broker no longer
        knows it, and a `multiple` ack of an unknown tag closes the channel."""
        highest = None
        while self._in_hand and self._in_hand[0] in self._settled:
            tag = self._in_hand.popleft()
            if self._settled.pop(tag):
                highest = tag
        return highest

    def abandon(self) -> list[Record]:
        """The connection is gone: forget everything, return what awaited a confirm."""
        records = list(self._unconfirmed.values())
        self._unconfirmed.clear()
        self._in_hand.clear()
        self._settled.clear()
        return records
