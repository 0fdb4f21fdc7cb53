"""The one place a thread spec becomes its tree policy (the offline API and the server use it)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from forkllm.engine.events import TreeWatcher
from forkllm.engine.policy import TreePolicy
from forkllm.engine.sampling_params import SamplingParams
from forkllm.threads.apr import AprPolicy
from forkllm.threads.base import ThreadTreePolicy
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
    watch: TreeWatcher | None = None,
) -> TreePolicy[ThreadResult]:
    """The policy that runs `spec` (`chunks`: a MapReduce's input); `on_event` gets the thread
    events (threads/result.py), `watch` the engine's tree events (engine/events.py)."""
    policy: ThreadTreePolicy
    if isinstance(spec, Subtasks):
        policy = SubtaskPolicy(spec, params, on_event)
    elif isinstance(spec, Protocol):
        policy = (AprPolicy if spec.name == "apr" else ProtocolPolicy)(spec, params, on_event)
    else:
        fan = spec.fanout(list(chunks)) if isinstance(spec, MapReduce) else spec
        policy = ThreadPolicy(fan, params, max_depth, on_event)
    policy.watch = watch
    return policy
