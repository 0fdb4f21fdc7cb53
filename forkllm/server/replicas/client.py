"""RayEngineClient: the server's EngineClient over N engine replicas, one Ray actor each.

The HTTP front end stays one FastAPI process; it keeps a tokenizer and the input checks (from the
first replica) so requests are validated and routed without a model. Each request is routed
(replicas/router.py) to one replica as a whole and its outputs stream back item by item. A client
that leaves aborts the request on its replica. A replica that dies (its actor or process killed)
is marked dead; its requests that had not streamed anything yet are retried on another replica,
the others end with a clear error; Ray restarts the actor and the replica is routed to again once
it answers. A watched request's tree events (`tree_events`) stream back between its outputs. A
policy (a scaling strategy, thread trees) runs on one replica as a whole too: its front-end
callbacks (the tree watcher of `tree_events`, the thread-event listener of a streamed `threads`
request) stay here, and the calls the replica collects in their place stream back in engine order
and are replayed to them before the result (replicas/callbacks.py); retries, errors and aborts
are those of a plain request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator
from typing import Any, TypeVar

from forkllm.engine.async_engine import EngineDeadError, request_work
from forkllm.engine.events import TreeEvent, TreeWatcher
from forkllm.engine.inputs import InputProcessor, PromptInput
from forkllm.engine.outputs import RequestOutput
from forkllm.engine.policy import TreePolicy
from forkllm.engine.sampling_params import SamplingParams
from forkllm.server.replicas import callbacks
from forkllm.server.replicas.actor import EngineReplica
from forkllm.server.replicas.cluster import init_ray
from forkllm.server.replicas.router import Router
from forkllm.tokenizer import Tokenizer

R = TypeVar("R")
logger = logging.getLogger("forkllm.replicas")

# Metric keys summed over replicas (everything else: summed too, except the ratios recomputed).
_RATIO = "prefix_cache_hit_rate"


class RayEngineClient:
    def __init__(
        self,
        engine_kwargs: dict[str, Any],
        replicas: int,
        router: str = "prefix",
        ray_address: str | None = None,
        cpus_per_replica: float = 1.0,
        gpus_per_replica: float = 0.0,
        threads: int | None = None,
        ray_init: dict[str, Any] | None = None,
        poll_seconds: float = 0.5,
    ) -> None:
        import ray

        if replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {replicas}")
        self.router = Router(replicas, router)
        self._owns_ray = not ray.is_initialized()  # then shutdown() stops (or leaves) the cluster
        self._ray_stopped = threading.Event()
        if self._owns_ray:
            init: dict[str, Any] = {
                "address": ray_address,
                "include_dashboard": False,
                "log_to_driver": False,
            }
            if ray_address is None:
                init["num_cpus"] = max(int(cpus_per_replica * replicas), 1)
            init_ray({**init, **(ray_init or {})}, self._ray_stopped)  # outlives this thread
        actor: Any = ray.remote(EngineReplica).options(
            num_cpus=cpus_per_replica, num_gpus=gpus_per_replica, max_restarts=-1, max_task_retries=0
        )
        threads = threads or max(int(cpus_per_replica), 1)
        self.actors: list[Any] = [actor.remote(engine_kwargs, i, threads) for i in range(replicas)]
        infos = ray.get([a.info.remote() for a in self.actors])
        info = infos[0]
        self._tokenizer: Tokenizer | None = info["tokenizer"]
        self._vocab_size = int(info["vocab_size"])
        self._max_model_len = int(info["max_model_len"])
        self._describe = f"{replicas} replicas ({router} routing) of: {info['describe']}"
        self.inputs = InputProcessor(
            self._tokenizer, self._vocab_size, self._max_model_len, info["eos_token_ids"]
        )
        self._work: list[dict[str, int]] = [{} for _ in range(replicas)]  # request id -> request_work
        self._metrics: list[dict[str, float]] = [{} for _ in range(replicas)]
        self._waiting = [0] * replicas
        self._closed = False
        self.retries = 0  # requests re-sent to another replica after theirs died
        self.poll_seconds = poll_seconds
        self._poller: asyncio.Task[None] | None = None

    # ---- facts --------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Tokenizer | None:
        return self._tokenizer

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def is_running(self) -> bool:
        return not self._closed and any(load.alive for load in self.router.loads)

    @property
    def num_waiting(self) -> int:
        """The least waiting of the live replicas (503 only when every replica is over the limit)."""
        live = [w for w, load in zip(self._waiting, self.router.loads) if load.alive]
        return min(live) if live else 0

    @property
    def pending_tokens(self) -> int:
        live = [sum(w.values()) for w, load in zip(self._work, self.router.loads) if load.alive]
        return min(live) if live else 0

    def expected_ttft(self, prompt_tokens: int) -> float | None:
        """Not estimated across replicas (serve refuses --max-expected-ttft with --replicas)."""
        return None

    def describe(self) -> str:
        return self._describe

    def replica_status(self) -> list[dict[str, Any]]:
        """Per replica, for /health: alive, requests in flight, requests routed to it."""
        return [
            {
                "replica": i,
                "status": "ok" if load.alive else "down",
                "requests": load.requests,
                "routed": load.routed,
            }
            for i, load in enumerate(self.router.loads)
        ]

    def tokenize_prompt(self, prompt: PromptInput) -> tuple[str | None, list[int]]:
        return self.inputs.tokenize_prompt(prompt)

    def metrics(self) -> dict[str, float]:
        """Summed over replicas (the hit rate recomputed from the summed tokens), plus each
        replica's own under `replica.<i>.<name>` and whether it is alive."""
        out: dict[str, float] = {}
        for i, m in enumerate(self._metrics):
            for key, value in m.items():
                out[key] = out.get(key, 0.0) + value
                out[f"replica.{i}.{key}"] = value
            out[f"replica.{i}.alive"] = float(self.router.loads[i].alive)
        prompt = out.get("prompt_tokens", 0.0)
        out[_RATIO] = out.get("prefix_cache_reused_tokens", 0.0) / prompt if prompt else 0.0
        return out

    # ---- requests -----------------------------------------------------------------------------
    async def generate(
        self,
        prompt: PromptInput,
        params: SamplingParams,
        request_id: str,
        priority: int = 0,
        watch: TreeWatcher | None = None,
    ) -> AsyncIterator[RequestOutput]:
        import ray
        from ray.exceptions import RayTaskError

        self._ensure_poller()
        _, ids = self.inputs.tokenize_prompt(prompt)
        req = self.inputs.make_request(
            prompt, params, request_id, priority=priority
        )  # checks, as one engine would
        tried: list[int] = []
        while True:
            i = self._pick(ids, tried)
            gen = (
                self.actors[i]
                .generate.options(num_returns="streaming")
                .remote(prompt, params, request_id, priority, watch is not None)
            )
            self.router.started(i)
            self._work[i][request_id] = request_work(req, self._max_model_len)
            sent = done = False
            try:
                async for ref in gen:
                    item: RequestOutput | list[TreeEvent] = await ref
                    sent = True
                    if isinstance(item, list):  # tree events (only sent when watched)
                        for event in item:
                            if watch is not None:
                                watch(event)
                        await asyncio.sleep(0)  # a watcher may hand them to this loop: before the output
                        continue
                    done = item.finished
                    yield item
                done = True
                return
            except RayTaskError as e:
                done = True
                raise _cause(e) from None
            except Exception as e:
                if not _died(e):
                    raise
                self._dead(i, e)
                if sent:
                    done = True
                    raise EngineDeadError(f"replica {i} died while streaming this request") from None
                tried.append(i)
                self.retries += 1
            finally:
                self.router.finished(i)
                self._work[i].pop(request_id, None)
                if not done:  # the caller left (or the replica died): stop it there
                    with contextlib.suppress(Exception):
                        self.actors[i].abort.remote(request_id)
                    with contextlib.suppress(Exception):
                        ray.cancel(gen)

    def abort(self, request_id: str) -> None:
        for i, work in enumerate(self._work):
            if request_id in work:
                self.actors[i].abort.remote(request_id)

    async def run_policy(self, policy: TreePolicy[R], prompt_ids: list[int], question: str) -> R:
        """Run on one replica without the policy's callbacks; the calls made there are replayed
        to them here, in order, before the result is returned."""
        import ray
        from ray.exceptions import RayTaskError

        self._ensure_poller()
        found = callbacks.find(policy)
        paths = [path for path, _ in found]
        listeners = [fn for _, fn in found]
        tried: list[int] = []
        while True:
            i = self._pick(prompt_ids, tried)
            with callbacks.stripped(policy, paths):  # pickled by remote(), without its closures
                gen = (
                    self.actors[i]
                    .run_policy.options(num_returns="streaming")
                    .remote(policy, prompt_ids, question, paths)
                )
            self.router.started(i)
            sent = done = False
            try:
                async for ref in gen:
                    item: callbacks.PolicyEvents | callbacks.PolicyResult = await ref
                    if isinstance(item, callbacks.PolicyEvents):
                        sent = True
                        callbacks.replay(item, listeners)
                        await asyncio.sleep(0)  # a listener may hand them to this loop: before the result
                        continue
                    done = True
                    return item.value  # type: ignore[no-any-return]
                done = True
                raise EngineDeadError(f"replica {i} ended a policy without its result")
            except RayTaskError as e:
                done = True
                raise _cause(e) from None
            except Exception as e:
                if not _died(e):
                    raise
                self._dead(i, e)
                if sent:
                    done = True
                    raise EngineDeadError(f"replica {i} died while streaming this request") from None
                tried.append(i)
                self.retries += 1
            finally:
                self.router.finished(i)
                if not done:  # the caller left (or the replica died): stop the policy there
                    with contextlib.suppress(Exception):
                        ray.cancel(gen)

    def shutdown(self) -> None:
        import ray

        self._closed = True
        if self._poller is not None:
            self._poller.cancel()
        for a in self.actors:
            with contextlib.suppress(Exception):
                ray.kill(a)
        if self._owns_ray:  # a local cluster's daemons stop now, not when the process is killed
            with contextlib.suppress(Exception):
                ray.shutdown()
            self._ray_stopped.set()

    # ---- replicas -----------------------------------------------------------------------------
    def _pick(self, ids: list[int], tried: list[int]) -> int:
        try:
            return self.router.pick(ids, exclude=tried)
        except RuntimeError:
            raise EngineDeadError("no replica is alive to run this request") from None

    def _dead(self, i: int, error: BaseException) -> None:
        if self.router.loads[i].alive:
            logger.warning("replica %d died (%s); Ray restarts it", i, type(error).__name__)
        self.router.mark(i, False)
        self._work[i].clear()

    def _ensure_poller(self) -> None:
        if self._poller is None or self._poller.done():
            self._poller = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        """Every poll_seconds: each replica's metrics and queue (the overload check and /metrics
        read them); a dead replica that answers again is routed to again."""
        while not self._closed:
            t0 = time.monotonic()
            for i, actor in enumerate(self.actors):
                try:
                    self._metrics[i] = await asyncio.wait_for(_await(actor.metrics.remote()), 5.0)
                    self._waiting[i] = int(self._metrics[i].get("waiting_seqs", 0))
                    if not self.router.loads[i].alive:
                        logger.warning("replica %d is back", i)
                        self.router.mark(i, True)
                except Exception:
                    self.router.mark(i, False)
            await asyncio.sleep(max(0.0, self.poll_seconds - (time.monotonic() - t0)))


async def _await(ref: Any) -> Any:
    return await ref


def _died(e: BaseException) -> bool:
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    return isinstance(e, ActorDiedError | ActorUnavailableError | RayActorError)


def _cause(e: BaseException) -> BaseException:
    """The replica's own exception (a ValueError for bad input keeps its 400)."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, BaseException) else e
