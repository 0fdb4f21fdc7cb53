"""forkllm: an LLM inference engine for parallel inference."""

from forkllm.api import LLM
from forkllm.engine.outputs import CompletionOutput, Logprob, RequestOutput
from forkllm.engine.sampling_params import RequestOutputKind, SamplingParams
from forkllm.structured import StructuredOutputsParams

__version__ = "0.20.0"

__all__ = [
    "LLM",
    "SamplingParams",
    "RequestOutput",
    "CompletionOutput",
    "Logprob",
    "RequestOutputKind",
    "StructuredOutputsParams",
]
