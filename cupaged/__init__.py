"""cupaged: a PagedAttention LLM inference engine with no PyTorch.

`import cupaged` is cheap: it compiles nothing and needs no CUDA. `LLM` and the engine load
on first use.
"""
from cupaged.outputs import CompletionOutput, RequestOutput
from cupaged.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "LLMEngine", "EngineConfig", "SamplingParams", "RequestOutput", "CompletionOutput"]


def __getattr__(name: str):
    if name == "LLM":
        from cupaged.llm import LLM
        return LLM
    if name == "LLMEngine":
        from cupaged.engine.engine import LLMEngine
        return LLMEngine
    if name == "EngineConfig":
        from cupaged.config import EngineConfig
        return EngineConfig
    raise AttributeError(f"module 'cupaged' has no attribute {name!r}")
