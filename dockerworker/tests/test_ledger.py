"""The acknowledgement bookkeeping, table by table: which ack may go out when."""

from __future__ import annotations

import pytest

from dockerworker.ledger import Ledger


def ledger_with(tags: list[int]) -> Ledger[str]:
    ledger: Ledger[str] = Ledger()
    for tag in tags:
        ledger.received(tag)
    return ledger


@pytest.mark.parametrize(
    "in_hand, settled, ack, left",
    [
        ([1, 2, 3], [], None, 3),
        ([1, 2, 3], [1], 1, 2),
        ([1, 2, 3], [1, 2, 3], 3, 0),
        ([1, 2, 3], [2, 3], None, 3),  # the oldest holds back the rest
        ([1, 2, 3], [1, 3], 1, 2),
        ([5, 7, 9], [5, 7], 7, 1),  # tags need not be consecutive
    ],
    ids=["none-settled", "oldest", "all", "oldest-unsettled", "gap", "sparse-tags"],
)
def test_the_ack_covers_the_longest_settled_run_from_the_oldest_input(in_hand, settled, ack, left):
    ledger = ledger_with(in_hand)
    for tag in settled:
        ledger.settle(tag)

    assert ledger.take_ack() == ack
    assert ledger.in_hand == left


@pytest.mark.parametrize(
    "settled, ack",
    [
        ([(1, True), (2, False)], 1),
        ([(1, False), (2, True)], 2),
        ([(1, False), (2, False)], None),
    ],
    ids=["nacked-last", "nacked-first", "all-nacked"],
)
def test_a_handed_back_input_leaves_the_run_but_is_never_the_acked_tag(settled, ack):
    ledger = ledger_with([1, 2])
    for tag, acked in settled:
        ledger.settle(tag, acked=acked)

    assert ledger.take_ack() == ack
    assert ledger.in_hand == 0


def test_an_ack_is_offered_once_and_a_later_settle_extends_it():
    ledger = ledger_with([1, 2, 3])
    ledger.settle(2)
    ledger.settle(1)

    assert ledger.take_ack() == 2
    assert ledger.take_ack() is None
    ledger.settle(3)
    assert ledger.take_ack() == 3


def test_a_multiple_confirm_answers_every_publish_up_to_its_number_in_publish_order():
    ledger: Ledger[str] = Ledger()
    for seq, record in [(1, "a"), (2, "b"), (3, "c"), (4, "d")]:
        ledger.published(seq, record)

    assert ledger.confirmed(3, multiple=True) == ["a", "b", "c"]
    assert ledger.awaiting_confirm == 1
    assert ledger.confirmed(3, multiple=True) == []


def test_a_single_confirm_answers_only_its_own_publish():
    ledger: Ledger[str] = Ledger()
    ledger.published(1, "a")
    ledger.published(2, "b")

    assert ledger.confirmed(2, multiple=False) == ["b"]
    assert ledger.confirmed(2, multiple=False) == []
    assert ledger.confirmed(1, multiple=False) == ["a"]


def test_nothing_is_acked_before_it_is_settled_whatever_the_confirms_say():
    # Confirms answer publishes; only settle() makes an input ackable.
    ledger = ledger_with([1, 2])
    ledger.published(1, "result of 1")
    ledger.published(2, "result of 2")

    ledger.confirmed(2, multiple=True)

    assert ledger.take_ack() is None


def test_the_oldest_matching_unconfirmed_publish_is_found():
    ledger: Ledger[str] = Ledger()
    for seq, record in [(1, "next:a"), (2, "errors:b"), (3, "next:c")]:
        ledger.published(seq, record)

    assert ledger.find_unconfirmed(lambda r: r.startswith("next")) == "next:a"
    ledger.confirmed(1, multiple=False)
    assert ledger.find_unconfirmed(lambda r: r.startswith("next")) == "next:c"
    assert ledger.find_unconfirmed(lambda r: r.startswith("retry")) is None


def test_abandoning_forgets_everything_and_returns_what_awaited_a_confirm():
    ledger = ledger_with([1, 2])
    ledger.published(1, "a")
    ledger.published(2, "b")
    ledger.settle(1)

    assert ledger.abandon() == ["a", "b"]
    assert (ledger.in_hand, ledger.awaiting_confirm, ledger.take_ack()) == (0, 0, None)
