"""N-gram (prompt lookup) proposer: continue the longest recent n-gram that occurred before.

No extra model. Cheap enough to run every step: the search is bytes.rfind over the request's
token ids packed as 4-byte integers (C speed), longest n first, latest occurrence first.
"""

from array import array
from typing import TYPE_CHECKING

from tokenforge.spec.proposer import Proposal

if TYPE_CHECKING:
    from tokenforge.engine.request import Request

_ITEM_BYTES = 4  # array("i")


def find_continuation(token_ids: list[int], min_n: int, max_n: int, num_tokens: int) -> list[int]:
    """Up to num_tokens ids that followed the latest earlier occurrence of the longest suffix
    of token_ids of length in [min_n, max_n]; [] when no such suffix occurred before."""
    length = len(token_ids)
    if length < 2 or num_tokens < 1:
        return []
    data = array("i", token_ids).tobytes()
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        pattern = data[(length - n) * _ITEM_BYTES :]
        # An occurrence must start at or before length - n - 1, so at least one token follows it.
        end = (length - 1) * _ITEM_BYTES
        pos = data.rfind(pattern, 0, end)
        while pos != -1 and pos % _ITEM_BYTES:  # a match across token boundaries: look earlier
            pos = data.rfind(pattern, 0, pos + len(pattern) - 1)
        if pos != -1:
            return _copy_from(token_ids, pos // _ITEM_BYTES + n, num_tokens)
    return []


def _copy_from(token_ids: list[int], start: int, num_tokens: int) -> list[int]:
    """token_ids[start:] extended as an overlapping copy (LZ77-style): past the end, the copy
    reads its own output, so a repeating pattern keeps repeating."""
    length = len(token_ids)
    out: list[int] = []
    for i in range(num_tokens):
        j = start + i
        out.append(token_ids[j] if j < length else out[j - length])
    return out


class NgramProposer:
    draft_cost = 0.0

    def __init__(self, min_n: int = 1, max_n: int = 4):
        assert 1 <= min_n <= max_n
        self.min_n = min_n
        self.max_n = max_n

    def propose(self, requests: list["Request"], num_tokens: dict[str, int]) -> dict[str, Proposal]:
        proposals = {}
        for request in requests:
            token_ids = find_continuation(request.all_token_ids, self.min_n, self.max_n,
                                          num_tokens[request.request_id])
            if token_ids:
                proposals[request.request_id] = Proposal(token_ids)
        return proposals

    def prepare(self, requests: list["Request"]) -> None:
        pass  # nothing to compute ahead

    def release(self, live_request_ids: set[str]) -> None:
        pass  # stateless
