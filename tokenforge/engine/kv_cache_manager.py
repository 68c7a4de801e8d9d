"""KVCacheManager: which blocks each request holds, and the prefix cache over chained block hashes.

A full block's hash covers its tokens and, through its parent's hash, every token before it, so
equal hashes mean equal prefixes. Only full blocks are cached; a request always computes at least
its last token itself (its logits are needed).
"""

import hashlib
from array import array
from collections.abc import Sequence

from tokenforge.engine.block_pool import Block, BlockPool
from tokenforge.engine.request import Request


def hash_block(parent_hash: bytes | None, token_ids: Sequence[int]) -> bytes:
    digest = hashlib.sha256(parent_hash or b"")
    digest.update(array("q", token_ids).tobytes())
    return digest.digest()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True):
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.block_pool = BlockPool(num_blocks, enable_caching)
        self.req_to_blocks: dict[str, list[Block]] = {}
        self.req_to_hashes: dict[str, list[bytes]] = {}
        self.num_cached_blocks: dict[str, int] = {}  # blocks of the request already hashed
        # Prefix-cache statistics, in tokens, counted once per successful admission (allocate_slots).
        self.num_prefix_queried_tokens = 0
        self.num_prefix_hit_tokens = 0

    @property
    def num_free_blocks(self) -> int:
        return self.block_pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.block_pool.usage

    def get_block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_to_blocks.get(request_id, [])]

    def get_computed_blocks(self, request: Request) -> tuple[list[Block], int]:
        """Longest cached prefix of the request: (blocks, number of tokens they hold)."""
        if not self.enable_caching:
            return [], 0
        # At most num_tokens - 1 tokens may come from the cache: the last one is computed.
        max_hit_blocks = (request.num_tokens - 1) // self.block_size
        hashes = self._block_hashes(request, max_hit_blocks)
        hits = []
        for block_hash in hashes[:max_hit_blocks]:
            block = self.block_pool.get_cached_block(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * self.block_size

    def allocate_slots(
        self, request: Request, num_new_tokens: int, new_computed_blocks: Sequence[Block] = ()
    ) -> list[Block] | None:
        """Makes room for num_new_tokens more tokens; None (and no change) if blocks run out.

        new_computed_blocks are prefix-cache hits for a request being admitted; they hold the
        tokens before request.num_computed_tokens + their length.
        """
        is_admission = request.request_id not in self.req_to_blocks
        blocks = self.req_to_blocks.setdefault(request.request_id, [])
        num_computed = request.num_computed_tokens + len(new_computed_blocks) * self.block_size
        num_required = cdiv(num_computed + num_new_tokens, self.block_size)
        num_new_blocks = max(0, num_required - len(blocks) - len(new_computed_blocks))
        # Hits that sit in the free queue stop being free once touched.
        num_free_hits = sum(1 for b in new_computed_blocks if b.ref_cnt == 0)
        if num_new_blocks > self.block_pool.num_free_blocks - num_free_hits:
            if not blocks:
                del self.req_to_blocks[request.request_id]
            return None
        self.block_pool.touch(list(new_computed_blocks))
        blocks.extend(new_computed_blocks)
        if new_computed_blocks:
            self.num_cached_blocks[request.request_id] = len(blocks)
        new_blocks = self.block_pool.get_new_blocks(num_new_blocks)
        blocks.extend(new_blocks)
        if is_admission and self.enable_caching:
            # Counted here, not in get_computed_blocks: a request that waits for blocks asks again
            # every step, and would otherwise be counted once per step.
            self.num_prefix_queried_tokens += request.num_tokens
            self.num_prefix_hit_tokens += len(new_computed_blocks) * self.block_size
        return new_blocks

    def cache_blocks(self, request: Request) -> None:
        """Hashes the request's blocks that are full of computed tokens into the prefix cache."""
        if not self.enable_caching:
            return
        num_full = request.num_computed_tokens // self.block_size
        start = self.num_cached_blocks.get(request.request_id, 0)
        if num_full <= start:
            return
        hashes = self._block_hashes(request, num_full)
        blocks = self.req_to_blocks[request.request_id]
        for i in range(start, num_full):
            self.block_pool.cache_block(blocks[i], hashes[i])
        self.num_cached_blocks[request.request_id] = num_full

    def trim(self, request: Request, num_tokens: int) -> None:
        """Frees the request's blocks past those that num_tokens tokens need: the slots of
        rejected draft tokens (speculative decoding). Trimmed blocks were never hashed."""
        blocks = self.req_to_blocks.get(request.request_id, [])
        num_kept = cdiv(num_tokens, self.block_size)
        if len(blocks) > num_kept:
            assert num_kept >= self.num_cached_blocks.get(request.request_id, 0)
            self.block_pool.free_blocks(list(reversed(blocks[num_kept:])))
            del blocks[num_kept:]

    def free(self, request: Request) -> None:
        """Releases the request's blocks, tail first (a prefix's head outlives its tail)."""
        blocks = self.req_to_blocks.pop(request.request_id, [])
        self.block_pool.free_blocks(list(reversed(blocks)))
        self.num_cached_blocks.pop(request.request_id, None)

    def forget(self, request: Request) -> None:
        """Drops per-request bookkeeping once the request is gone for good."""
        self.free(request)
        self.req_to_hashes.pop(request.request_id, None)

    def _block_hashes(self, request: Request, num_blocks: int) -> list[bytes]:
        hashes = self.req_to_hashes.setdefault(request.request_id, [])
        if len(hashes) < num_blocks:
            token_ids = request.all_token_ids
            bs = self.block_size
            for i in range(len(hashes), num_blocks):
                parent = hashes[i - 1] if i else None
                hashes.append(hash_block(parent, token_ids[i * bs : (i + 1) * bs]))
        return hashes
