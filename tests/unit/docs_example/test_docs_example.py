import decimal

import pytest
import tasks_example as shop

from magne.testing import worker


def test_a_charge_sends_its_receipt(magne_worker):
    shop.charge.send("order-1", 1250)
    magne_worker.join()  # runs what is queued, and what the tasks send, until nothing is left
    assert shop.ledger["order-1"] == 1250
    magne_worker.assert_ran(shop.send_receipt, "order-1")


def test_a_gateway_timeout_is_retried(magne_worker, monkeypatch):
    monkeypatch.setattr(shop, "gateway_failures", 2)
    shop.charge.send("order-2", 990)
    magne_worker.join()  # the backoffs (up to 2 s, then up to 4 s) pass on a simulated clock: no waiting
    [run] = magne_worker.succeeded(shop.charge)
    assert run.retries == 2
    assert [a["error-type"] for a in run.attempts] == ["GatewayTimeout", "GatewayTimeout"]
    assert len(magne_worker.retried) == 2


def test_a_receipt_without_a_charge_is_dead_lettered():
    with worker(threads=0) as w:  # synchronous: the tasks run in this thread, at join()
        shop.send_receipt.send("order-3")
        w.join()
    [dead] = w.dead_letters(shop.send_receipt)
    assert (dead.reason, dead.error_type, dead.error_message) == ("task raised", "LookupError", "no charge for order-3")


def test_arguments_must_be_json():
    with worker() as w, pytest.raises(TypeError, match="not JSON-serializable"):
        shop.charge.send("order-4", decimal.Decimal("12.50"))  # fails here, as it would in production
    assert w.sent == []
