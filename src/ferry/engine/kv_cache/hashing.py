"""Chained block hashes: a full block is keyed by hash(parent block's hash, its token ids).

The chain makes a hash identify the whole prefix up to and including the block, so equal hashes
mean equal prefixes (up to a 128-bit collision) and a lookup walks the prompt block by block.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

ROOT_HASH = b"ferry-kv-root"


def hash_block(parent: bytes | None, token_ids: Sequence[int]) -> bytes:
    h = hashlib.blake2b(parent or ROOT_HASH, digest_size=16)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


def extend_block_hashes(hashes: list[bytes], token_ids: Sequence[int], num_tokens: int,
                        block_size: int) -> list[bytes]:
    """Append hashes for every full block within the first ``num_tokens`` tokens; return ``hashes``."""
    num_full = num_tokens // block_size
    for i in range(len(hashes), num_full):
        parent = hashes[i - 1] if i else None
        hashes.append(hash_block(parent, token_ids[i * block_size:(i + 1) * block_size]))
    return hashes
