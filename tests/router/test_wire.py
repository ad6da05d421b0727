"""Event batches and load reports round-trip through msgpack and reject malformed payloads."""
from __future__ import annotations

import msgpack
import pytest

from tandem.protocol.kv_events import AllBlocksCleared, BlocksRemoved, BlocksStored, KVEventBatch, decode_batch, encode_batch
from tandem.protocol.load import ReplicaLoad, decode_load, encode_load


def test_batch_round_trip_keeps_64_bit_hashes():
    big = (1 << 64) - 1
    batch = KVEventBatch(
        "replica-a",
        7,
        [BlocksStored([1, big], None), BlocksStored([5], big), BlocksRemoved([1]), AllBlocksCleared()],
        123.5,
    )
    assert decode_batch(encode_batch(batch)) == batch


@pytest.mark.parametrize(
    "wire",
    [
        ["r", -1, 0.0, []],
        ["", 0, 0.0, []],
        ["r", 0, 0.0, [["stored", [-1], None]]],
        ["r", 0, 0.0, [["stored", ["x"], None]]],
        ["r", 0, 0.0, [["removed", [1], 2]]],
        ["r", 0, 0.0, [["exploded"]]],
        ["r", 0, 0.0],
        {"replica_id": "r"},
    ],
)
def test_malformed_batches_are_rejected(wire):
    with pytest.raises(ValueError):
        decode_batch(msgpack.packb(wire))


def test_load_round_trip_and_validation():
    load = ReplicaLoad("r", 3, 2, 4000, 900, 100, 400, 17.0)
    assert decode_load(encode_load(load)) == load
    assert load.outstanding_tokens == 4900 and load.kv_usage == 0.75
    with pytest.raises(ValueError):
        decode_load(msgpack.packb(["r", 3, 2, -5, 0, 0, 0, 1.0]))
