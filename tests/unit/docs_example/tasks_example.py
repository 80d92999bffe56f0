"""A shop's tasks: charge an order, then mail its receipt."""

from magne import task

ledger: dict[str, int] = {}  # stands in for your database
gateway_failures = 0  # how many calls to the payment gateway fail before one gets through


class GatewayTimeout(Exception):
    pass


@task(max_retries=5, min_backoff=2, max_backoff=60)
def charge(order_id: str, cents: int) -> None:
    global gateway_failures
    if gateway_failures > 0:
        gateway_failures -= 1
        raise GatewayTimeout("the payment gateway did not answer")
    ledger[order_id] = ledger.get(order_id, 0) + cents
    send_receipt.send(order_id)


@task
def send_receipt(order_id: str) -> None:
    if order_id not in ledger:
        raise LookupError(f"no charge for {order_id}")
