"""The offline target of `tokenforge bench --offline`: the same load sent straight to an in-process
AsyncEngine (no HTTP, no server), timed the same way as over HTTP. The chat template is applied per
request inside the timing, as the server does.
"""

import itertools

from tokenforge.bench.client import RequestTiming, StreamTimer
from tokenforge.engine.async_engine import AsyncEngine
from tokenforge.engine.llm import LLM
from tokenforge.errors import TokenforgeError
from tokenforge.sampling_params import SamplingParams


class OfflineClient:
    def __init__(self, engine: AsyncEngine, max_tokens: int, *, ignore_eos: bool = True):
        self.engine = engine
        self._templates = LLM(engine=engine.core)  # wraps the core: only its chat template is used
        self._params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=ignore_eos)
        self._ids = itertools.count()

    async def send(self, index: int, conversation: list[dict]) -> RequestTiming:
        timer = StreamTimer()
        num_tokens, num_prompt_tokens = 0, None
        try:
            prompt = self._templates.apply_chat_template(conversation)
            num_prompt_tokens = len(prompt)
            async for out in self.engine.generate(f"bench-{next(self._ids)}", prompt, self._params):
                if out.error is not None:
                    return timer.finish(num_tokens, num_prompt_tokens, error=out.error)
                if out.new_token_ids:
                    num_tokens += len(out.new_token_ids)
                    timer.on_tokens()
        except TokenforgeError as exc:
            return timer.finish(num_tokens, num_prompt_tokens, error=f"{type(exc).__name__}: {exc}")
        return timer.finish(num_tokens, num_prompt_tokens)
