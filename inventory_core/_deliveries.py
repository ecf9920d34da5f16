"""Expected deliveries: the table of suppliers' notices not yet fully received.

A delivery is keyed by (merchant_id, delivery_id) and holds its location, the units still
expected per key, and its ETA. ``PartitionState.incoming`` indexes it by key; a row's
``incoming`` and ``incoming_eta_ms`` are derived from that index whenever a delivery of the
key changes (``rules/deliveries.py``). A delivery leaves the table when its last unit is
received or it is cancelled; one past its ETA stays (reads show the ETA in the past: it is
overdue) until then.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ._codec import integer, key_from_data, key_to_data
from ._model import Line
from ._tables import TableSchema

DeliveryId = tuple[str, str]  # (merchant_id, delivery_id)


@dataclass(frozen=True, slots=True)
class Delivery:
    location_id: str
    # The units still expected, per key (each positive), in the notice's order.
    lines: tuple[Line, ...]
    eta_ms: int


def _id_to_data(delivery_id: DeliveryId) -> list[str]:
    return list(delivery_id)


def _id_from_data(data: Any) -> DeliveryId:
    merchant_id, delivery_id = data
    return (str(merchant_id), str(delivery_id))


def _delivery_to_data(delivery: Delivery) -> list[Any]:
    lines = [[key_to_data(line.key), line.quantity] for line in delivery.lines]
    return [delivery.location_id, lines, delivery.eta_ms]


def _delivery_from_data(data: Any) -> Delivery:
    location_id, lines, eta_ms = data
    return Delivery(
        str(location_id),
        tuple(Line(key_from_data(key), integer(quantity)) for key, quantity in lines),
        integer(eta_ms),
    )


DELIVERIES: TableSchema[DeliveryId, Delivery] = TableSchema(
    name="deliveries",
    key_to_data=_id_to_data,
    key_from_data=_id_from_data,
    row_to_data=_delivery_to_data,
    row_from_data=_delivery_from_data,
)
