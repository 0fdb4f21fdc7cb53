"""The one place a thread spec becomes its tree policy (the offline API and the server use it):
`make_policy` for one tree, `make_trees` for n trees of one prompt (threads/trees.py)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING

from forkllm.engine.events import TreeWatcher
from forkllm.engine.inputs import PromptInput
from forkllm.engine.policy import TreePolicy
from forkllm.engine.sampling_params import SamplingParams
from forkllm.threads.apr import AprPolicy
from forkllm.threads.base import ThreadTreePolicy
from forkllm.threads.policy import DEFAULT_MAX_DEPTH, ThreadPolicy
from forkllm.threads.protocols import Protocol, ProtocolPolicy
from forkllm.threads.result import ThreadEvent, ThreadResult
from forkllm.threads.spec import Fanout, MapReduce, Subtasks
from forkllm.threads.subtasks import SubtaskPolicy
from forkllm.threads.trees import ThreadTrees

if TYPE_CHECKING:
    from forkllm.engine.llm_engine import LLMEngine

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
    policy = _policy(spec, params, chunks, max_depth, on_event)
    policy.watch = watch
    return policy


def make_trees(
    spec: ThreadSpec,
    params: SamplingParams | None = None,
    chunks: Sequence[str] = (),
    max_depth: int = DEFAULT_MAX_DEPTH,
    on_event: Callable[[int, ThreadEvent], None] | None = None,
    watch: TreeWatcher | None = None,
) -> ThreadTrees:
    """`params.n` trees of `spec` from one prompt (their result: one ThreadResult each);
    `on_event(i, event)` gets tree i's thread events."""
    params = params or SamplingParams(temperature=0.0)
    one = params.clone(n=1)
    trees = ThreadTrees(
        [
            _policy(spec, one, chunks, max_depth, None if on_event is None else partial(on_event, i))
            for i in range(params.n)
        ]
    )
    trees.watch = watch
    return trees


def generate_trees(
    engine: LLMEngine, prompt: PromptInput, params: SamplingParams
) -> tuple[ThreadTrees, list[int], str]:
    """One prompt of `LLM.generate` / `LLM.chat` with `SamplingParams(threads=spec)`: params.n
    trees of the spec from the prompt as given (no chat template added: generate's contract),
    the question being the prompt's text. ValueError naming the field for what a tree cannot do."""
    spec = params.threads
    if isinstance(spec, MapReduce):
        raise ValueError(
            "SamplingParams.threads: a MapReduce takes its chunks as the prompt; run it with "
            "LLM.threads(chunks, spec)"
        )
    if not isinstance(spec, (Fanout, Subtasks, Protocol)):
        raise ValueError(
            "SamplingParams.threads must be a Fanout, Subtasks or Protocol (forkllm.threads), "
            f"got {type(spec).__name__}"
        )
    for name in ("logprobs", "prompt_logprobs"):
        if getattr(params, name) is not None:
            raise ValueError(f"SamplingParams.{name}: thread trees do not report logprobs; leave it out")
    text, ids = engine.tokenize_prompt(prompt)
    return make_trees(spec, params.clone(threads=None)), ids, text or ""


def _policy(
    spec: ThreadSpec,
    params: SamplingParams | None,
    chunks: Sequence[str],
    max_depth: int,
    on_event: Callable[[ThreadEvent], None] | None,
) -> ThreadTreePolicy:
    policy: ThreadTreePolicy
    if isinstance(spec, Subtasks):
        policy = SubtaskPolicy(spec, params, on_event)
    elif isinstance(spec, Protocol):
        policy = (AprPolicy if spec.name == "apr" else ProtocolPolicy)(spec, params, on_event)
    else:
        fan = spec.fanout(list(chunks)) if isinstance(spec, MapReduce) else spec
        policy = ThreadPolicy(fan, params, max_depth, on_event)
    return policy
