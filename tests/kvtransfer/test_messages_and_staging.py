"""In-process pieces: wire-format validation, config validation, staging pack/unpack."""
import msgpack
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tandem.kvtransfer import KVTransferConfig
from tandem.kvtransfer.messages import Begin, Chunk, Error, Hello, MessageError, Ping, decode, encode
from tandem.kvtransfer.staging import block_id_tensor, gather_layers, scatter_layers


def test_messages_round_trip():
    for msg in (Hello("w-1"), Ping(), Error(None, "bad"), Error("r", "bad"),
                Begin("r", 3, [4, 5], 32, "bfloat16", [16, 8, 128]),
                Begin("r", 3, [4, 5], 2, "float8_e4m3fn", [16, 8, 128], [0.5, 1.0, 0.25, 3.0]),
                Chunk("r", 3, 7, 0, 2, 2 * 2 * 2 * 16 * 8 * 128 * 2, "bfloat16", [2, 2, 2, 16, 8, 128])):
        assert decode(encode(msg)) == msg


def test_begin_from_a_peer_without_kv_scales_has_none():
    body = {"type": "begin", "request_id": "r", "epoch": 0, "dst_block_ids": [1], "num_layers": 1,
            "dtype": "bfloat16", "block_shape": [1, 1, 1]}
    assert decode(msgpack.packb(body, use_bin_type=True)).kv_scales == []


@pytest.mark.parametrize("body, fragment", [
    ({"type": "begin", "request_id": "r", "epoch": 0, "dst_block_ids": [1, True], "num_layers": 2,
      "dtype": "float32", "block_shape": [1, 1, 1]}, "expected int"),
    ({"type": "begin", "request_id": "", "epoch": 0, "dst_block_ids": [1], "num_layers": 2,
      "dtype": "float32", "block_shape": [1, 1, 1]}, "length"),
    ({"type": "begin", "request_id": "r", "epoch": 0, "dst_block_ids": [], "num_layers": 2,
      "dtype": "float32", "block_shape": [1, 1, 1]}, "length"),
    ({"type": "chunk", "request_id": "r", "epoch": 0, "seq": -1, "layer_start": 0, "layer_end": 1,
      "nbytes": 4, "dtype": "float32", "shape": [1, 2, 1, 1, 1, 1]}, "out of range"),
    ({"type": "chunk", "request_id": "r", "epoch": 0, "seq": 0, "layer_start": 0, "layer_end": 1,
      "nbytes": 4, "dtype": "object", "shape": [1, 2, 1, 1, 1, 1]}, "dtype"),
    ({"type": "begin", "request_id": "r", "epoch": 0, "dst_block_ids": [1], "num_layers": 1,
      "dtype": "float8_e4m3fn", "block_shape": [1, 1, 1], "kv_scales": [1.0, -2.0]}, "finite positive"),
    ({"type": "begin", "request_id": "r", "epoch": 0, "dst_block_ids": [1], "num_layers": 1,
      "dtype": "float8_e4m3fn", "block_shape": [1, 1, 1], "kv_scales": [1, 1]}, "finite positive"),
    ({"type": "hello", "sender_id": "x"}, "missing field"),
    ({"type": "ping", "extra": 1}, "unexpected fields"),
    ({"type": 5}, "unknown message type"),
])
def test_decode_rejects_malformed_fields(body, fragment):
    with pytest.raises(MessageError, match=fragment):
        decode(msgpack.packb(body, use_bin_type=True))


_KEYS = st.sampled_from(["type", "request_id", "epoch", "seq", "dst_block_ids", "num_layers",
                         "dtype", "shape", "nbytes", "layer_start", "layer_end", "sender_id",
                         "version", "reason", "block_shape", "junk"])
_VALUES = st.one_of(st.integers(-(1 << 63), (1 << 64) - 1), st.text(max_size=8), st.none(),
                    st.booleans(), st.floats(allow_nan=False),
                    st.sampled_from(["begin", "chunk", "hello", "ping", "cancel", "float32"]),
                    st.lists(st.integers(-5, 1 << 40), max_size=7))


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.binary(max_size=64),
                 st.dictionaries(_KEYS, _VALUES, max_size=9).map(
                     lambda d: msgpack.packb(d, use_bin_type=True))))
def test_decode_returns_a_valid_message_or_raises_message_error(frame):
    try:
        msg = decode(frame)
    except MessageError as exc:
        assert str(exc)
    else:
        assert decode(encode(msg)) == msg  # whatever passes validation is a well-formed message


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="timeout_s"):
        KVTransferConfig(timeout_s=0)
    with pytest.raises(ValueError, match="peer_timeout_s"):
        KVTransferConfig(heartbeat_s=2, peer_timeout_s=1)
    with pytest.raises(ValueError, match="min_message_bytes"):
        KVTransferConfig(min_message_bytes=10, max_message_bytes=5)
    with pytest.raises(ValueError, match="worker_id"):
        KVTransferConfig(worker_id="has space")
    with pytest.raises(ValueError, match="control_port"):
        KVTransferConfig(control_port=70000)


def test_gather_then_scatter_moves_exactly_the_chosen_blocks():
    torch.manual_seed(0)
    src = torch.randn(5, 2, 12, 4, 2, 3).to(torch.bfloat16)
    dst = torch.randn(5, 2, 12, 4, 2, 3).to(torch.bfloat16)
    expected = dst.clone()
    src_ids, dst_ids = torch.tensor([7, 1, 4]), torch.tensor([0, 11, 5])
    staging = gather_layers(src, 1, 4, src_ids)
    assert staging.shape == (3, 2, 3, 4, 2, 3) and staging.is_contiguous()
    assert torch.equal(staging, src[1:4][:, :, src_ids])
    scatter_layers(staging, dst, 1, 4, dst_ids)
    expected[1:4, :, dst_ids] = src[1:4][:, :, src_ids]
    assert torch.equal(dst, expected)


def test_block_ids_are_validated():
    with pytest.raises(ValueError, match="out of range"):
        block_id_tensor([0, 12], 12, torch.device("cpu"), "dst_block_ids", unique=True)
    with pytest.raises(ValueError, match="duplicates"):
        block_id_tensor([3, 3], 12, torch.device("cpu"), "dst_block_ids", unique=True)
    with pytest.raises(ValueError, match="empty"):
        block_id_tensor([], 12, torch.device("cpu"), "dst_block_ids", unique=True)


def test_api_rejects_bad_input_in_process():
    from tandem.kvtransfer import KVReceiver, KVSender

    cache = torch.randn(2, 2, 8, 2, 1, 4)
    with pytest.raises(ValueError, match="contiguous"):
        KVReceiver(cache.transpose(2, 3).contiguous().transpose(2, 3))
    with KVReceiver(cache.clone()) as receiver, KVSender(cache.clone()) as sender:
        handle = receiver.expect("a", [1, 2], 2)
        with pytest.raises(ValueError, match="already expected"):
            receiver.expect("a", [3], 2)
        with pytest.raises(ValueError, match="registered to another request"):
            receiver.expect("b", [2, 3], 2)
        with pytest.raises(ValueError, match="num_layers"):
            receiver.expect("c", [4], 3)
        with pytest.raises(ValueError, match="tcp://"):
            sender.begin("a", "localhost:1", [0], [1])
        with pytest.raises(ValueError, match="src blocks but"):
            sender.begin("a", receiver.address, [0], [1, 2])
        session = sender.begin("a", receiver.address, [5, 6], [1, 2])
        with pytest.raises(ValueError, match="in order"):
            session.send_layers(1, 2)
        session.send_layers(0, 2)
        session.finish(10)
        handle.wait(10)
        assert torch.equal(receiver.kv_cache[:, :, [1, 2]], sender.kv_cache[:, :, [5, 6]])
