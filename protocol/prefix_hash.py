"""The hash chain that names a full KV block by its tokens and everything before it.

Workers (prefix cache) and the router (prefix index) must compute identical values in
different processes, so this uses a keyed-free, stable digest (blake2b over the parent hash and
the token ids), never Python's salted `hash()`.
"""
from __future__ import annotations

import array
import hashlib
import struct
import sys
from collections.abc import Sequence

ROOT_HASH = 0  # the parent of a sequence's first block


def hash_block(parent_hash: int, token_ids: Sequence[int]) -> int:
    """64-bit hash of one full block given its parent's hash."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(struct.pack("<Q", parent_hash))
    digest.update(struct.pack(f"<{len(token_ids)}I", *token_ids))
    return int.from_bytes(digest.digest(), "little")


def hash_full_blocks(token_ids: Sequence[int], block_size: int, parent_hash: int = ROOT_HASH) -> list[int]:
    """Hashes of every *full* block of `token_ids` (a trailing partial block has none); the
    same values as `hash_block` block by block, with the tokens packed once (about 2x faster,
    the router hashes every prompt)."""
    num_tokens = len(token_ids) - len(token_ids) % block_size
    packed = array.array("I", token_ids[:num_tokens])
    if sys.byteorder != "little":
        packed.byteswap()
    data = memoryview(packed).cast("B")
    step = 4 * block_size
    hashes: list[int] = []
    blake2b, from_bytes = hashlib.blake2b, int.from_bytes
    for start in range(0, 4 * num_tokens, step):
        digest = blake2b(parent_hash.to_bytes(8, "little") + data[start : start + step], digest_size=8)
        parent_hash = from_bytes(digest.digest(), "little")
        hashes.append(parent_hash)
    return hashes
