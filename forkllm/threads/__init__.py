"""Reasoning threads inside the engine: fan-out / map-reduce trees whose threads share the
context's pages, decode in one batch, and are joined by page reference (`kv_concat`) or by
recomputation (`reprefill`); long tasks as subtasks whose working KV is pruned (subtasks.py);
threads the model opens itself (protocols.py: Multiverse / ThreadWeaver tags, apr.py: APR's
spawn/join calls). See policy.py for the runtime, kv/concat.py for the page join."""

from forkllm.threads.apr import AprPolicy
from forkllm.threads.policy import ThreadPolicy
from forkllm.threads.protocols import PROTOCOLS, Protocol, ProtocolPolicy
from forkllm.threads.result import ThreadEvent, ThreadInfo, ThreadResult
from forkllm.threads.spec import JOINS, Fanout, MapReduce, Subtasks
from forkllm.threads.subtasks import SubtaskPolicy

__all__ = [
    "AprPolicy",
    "JOINS",
    "Fanout",
    "MapReduce",
    "PROTOCOLS",
    "Protocol",
    "ProtocolPolicy",
    "SubtaskPolicy",
    "Subtasks",
    "ThreadEvent",
    "ThreadInfo",
    "ThreadPolicy",
    "ThreadResult",
]
