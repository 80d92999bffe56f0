"""Ack coalescing against a model of the broker's unacked set (design invariant 3)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from magne.acks import AckCoalescer


class BrokerModel:
    """What RabbitMQ does with acks on one channel: a wrong one is a 406 that closes it."""

    def __init__(self, n: int) -> None:
        self.unacked = set(range(1, n + 1))

    def ack(self, tag: int, multiple: bool, finished: set[int]) -> None:
        assert tag in self.unacked, f"406: unknown delivery tag {tag}"
        covered = {t for t in self.unacked if t <= tag} if multiple else {tag}
        assert covered <= finished, f"acked unfinished deliveries {sorted(covered - finished)}"
        self.unacked -= covered

    def reject(self, tag: int) -> None:
        assert tag in self.unacked
        self.unacked.discard(tag)


@settings(max_examples=500, deadline=None)
@given(st.data())
def test_coalescer_never_406_never_acks_unfinished_and_acks_everything(data):
    n = data.draw(st.integers(1, 60))
    order = data.draw(st.permutations(range(1, n + 1)))
    rejected = data.draw(st.sets(st.sampled_from(range(1, n + 1)), max_size=n // 3))
    model = BrokerModel(n)
    c = AckCoalescer()
    finished: set[int] = set()
    i = 0
    while i < len(order):
        size = data.draw(st.integers(1, 8))
        batch = order[i:i + size]
        i += size
        acks = []
        for tag in batch:
            finished.add(tag)
            if tag in rejected:
                model.reject(tag)  # written before the batch's acks, as the I/O thread does
                c.mark_sent(tag)
            else:
                acks.append(tag)
        out = c.settle(acks)
        for tag, multiple in out:
            model.ack(tag, multiple, finished)
        # Eager: after each batch, nothing finished is left unacked.
        assert not (model.unacked & finished), f"finished but held back: {sorted(model.unacked & finished)}"
    assert not model.unacked


def test_in_order_batch_is_one_multiple_ack():
    c = AckCoalescer()
    assert c.settle([3, 1, 2]) == [(3, True)]
    assert c.settle([5]) == [(5, False)]
    assert c.settle([4]) == [(4, True)]  # 5 was acked singly: the multiple ack must stop at 4
    assert c.base == 5 and not c.sent


def test_state_stays_bounded_behind_one_long_running_delivery():
    """Invariant 9: 200,000 tags finished behind one unfinished tag are held as one run, not 200,000 entries."""
    c = AckCoalescer()
    n = 200_000
    for start in range(2, n + 2, 1000):
        c.settle(list(range(start, start + 1000)))
        assert len(c.sent) == 1
    assert c.settle([1]) == [(1, True)]  # the long task finishes: the prefix closes in one step
    assert c.base == n + 1 and not c.sent


def test_runs_merge_from_both_sides_and_rejects_count():
    c = AckCoalescer()
    assert c.settle([5, 3]) == [(3, False), (5, False)]
    c.mark_sent(4)  # a reject between them joins the runs
    assert c.sent == [[3, 5]]
    assert c.settle([2]) == [(2, False)]
    assert c.settle([1]) == [(1, True)]
    assert c.base == 5 and not c.sent
