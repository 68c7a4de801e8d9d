"""tokenforge: a self-hostable inference engine with an OpenAI-compatible API."""

from tokenforge.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # LLM pulls in torch and the model code: import it only when asked for.
    if name == "LLM":
        from tokenforge.engine.llm import LLM

        return LLM
    raise AttributeError(name)
