"""The one place a thread spec becomes its tree policy (the offline API and the server use it)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from forkllm.engine.policy import TreePolicy
from forkllm.engine.sampling_params import SamplingParams
from forkllm.threads.policy import DEFAULT_MAX_DEPTH, ThreadPolicy
from forkllm.threads.protocols import Protocol, ProtocolPolicy
from forkllm.threads.result import ThreadEvent, ThreadResult
from forkllm.threads.spec import Fanout, MapReduce, Subtasks
from forkllm.threads.subtasks import SubtaskPolicy

ThreadSpec = Fanout | MapReduce | Subtasks | Protocol


def make_policy(
    spec: ThreadSpec,
    params: SamplingParams | None = None,
    chunks: Sequence[str] = (),
    max_depth: int = DEFAULT_MAX_DEPTH,
    on_event: Callable[[ThreadEvent], None] | None = None,
) -> TreePolicy[ThreadResult]:
    """The policy that runs `spec` (`chunks`: a MapReduce's input)."""
    if isinstance(spec, Subtasks):
        return SubtaskPolicy(spec, params, on_event)
    if isinstance(spec, Protocol):
        return ProtocolPolicy(spec, params, on_event)
    fan = spec.fanout(list(chunks)) if isinstance(spec, MapReduce) else spec
    return ThreadPolicy(fan, params, max_depth, on_event)
