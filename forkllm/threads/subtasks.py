"""SubtaskPolicy: a long task as sequential subtasks whose working KV is pruned (TIMRUN).

The context computes its prompt (the token it samples then is dropped) and runs the subtasks one
at a time, each a child thread with its prompt appended. When a subtask stops (EOS or its
max_tokens) the context takes back its prompt and its last `conclusion_tokens` computed tokens
(`TreeOps.conclude`: KV moved, keys re-rotated to the context's next positions, nothing
recomputed) and the child's pages go back to the pool; the next subtask starts right after. With
`prune=False` the child is joined whole (`TreeOps.join_pages`, one child: no holes), so the
context keeps every working token: the baseline for the KV budget.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from forkllm.engine.sampling_params import SamplingParams
from forkllm.engine.sequence import Sequence, SequenceStatus
from forkllm.threads.base import ThreadTreePolicy
from forkllm.threads.result import ThreadEvent, ThreadInfo, ThreadResult
from forkllm.threads.spec import Subtasks

if TYPE_CHECKING:
    from forkllm.engine.llm_engine import LLMEngine


class SubtaskPolicy(ThreadTreePolicy):
    def __init__(
        self,
        spec: Subtasks,
        params: SamplingParams | None = None,
        on_event: Callable[[ThreadEvent], None] | None = None,
    ) -> None:
        if not isinstance(spec, Subtasks):
            raise TypeError(f"subtasks: expected Subtasks, got {type(spec).__name__}")
        super().__init__(params, on_event)
        self.spec = spec
        self.root: Sequence | None = None
        self.child: Sequence | None = None
        self.prompt_end = 0
        self.index = -1  # the subtask running (-1: the prompt; len(prompts): the answer)
        self.pages_after: list[int] = []  # the context's pages after each subtask concluded
        self.critical = self.gen_start = 0

    def start(self, engine: LLMEngine, prompt_ids: list[int], question: str) -> None:
        self.root, self.prompt_end = self._begin(engine, prompt_ids, self.params), len(prompt_ids)
        self.threads.append(ThreadInfo(0, None, question))
        self._park_on_stop(lambda s: s is not self.root or self.index < len(self.spec.prompts))

    def on_step(self, engine: LLMEngine) -> None:
        root, tree = self.root, self.tree
        assert root is not None and tree is not None
        self._measure()
        if self.child is not None and not self.child.finished:
            self.log.delta(len(self.threads) - 1, self.child.text)
        if self.index == len(self.spec.prompts):
            self.log.delta(0, root.text)
        if self.index == -1:
            if root.num_tokens > self.prompt_end:  # the prompt is in
                if root.status is not SequenceStatus.PAUSED:
                    engine.tree.pause(root)
                engine.tree.truncate(root, self.prompt_end)
                self._prompt_computed(self.prompt_end - root.num_reused_tokens)
                self._next()
        elif self.index < len(self.spec.prompts):
            child = self.child
            assert child is not None
            if child.finished:
                raise RuntimeError(f"subtask {self.index} ended: {child.finish_reason} ({child.stop_reason})")
            if child.status is SequenceStatus.PAUSED:
                self._conclude(child)
                self._next()
        elif root.finished:
            self._finished(root)
            sampled = root.num_tokens - self.gen_start
            self.threads[0].generated_tokens, self.threads[0].text = sampled, root.text
            self.threads[0].finish_reason = root.finish_reason
            self.generated_tokens += sampled
            self.critical += sampled
            self.log.emit("end", 0, tokens=sampled)

    def _next(self) -> None:
        """Spawn the next subtask, or append `then` and let the context answer."""
        engine, root, tree = self.engine, self.root, self.tree
        assert engine is not None and root is not None and tree is not None
        self.index += 1
        if self.index < len(self.spec.prompts):
            prompt = self.spec.prompts[self.index]
            ids = self._encode(prompt)
            limit = root.num_tokens + len(ids) + self.spec.max_tokens + 1
            (self.child,) = engine.tree.spawn(root, [ids], [limit])
            tree.forks += 1
            self.prefill_tokens += len(ids)
            info = ThreadInfo(len(self.threads), 0, prompt)
            self.threads.append(info)
            self.threads[0].children.append(info.id)
            self.log.emit("spawn", 0, [info.id])
            return
        then = self._encode(self.spec.then)
        tree.extend(root, then)
        self.prefill_tokens += len(then)
        self.gen_start = root.num_tokens
        root.token_limit = root.num_tokens + self.spec.final_max_tokens
        tree.resume(root)

    def _conclude(self, child: Sequence) -> None:
        engine, root = self.engine, self.root
        assert engine is not None and root is not None
        info = self.threads[-1]
        base = root.num_tokens
        prompt_len = len(self._encode(self.spec.prompts[self.index]))
        start = base + prompt_len  # its working tokens start here
        sampled = child.num_tokens - start
        info.generated_tokens, info.text, info.finish_reason = sampled, child.text, child.finish_reason
        self.generated_tokens += sampled
        self.critical += sampled
        end = child.num_computed_tokens
        if self.spec.prune:
            conclusion = max(start, end - self.spec.conclusion_tokens)
            engine.tree.conclude(root, child, [(base, start), (conclusion, end)])
            self.log.emit("prune", info.id, tokens=root.num_tokens)
        else:
            engine.tree.join_pages(root, [child])
            self.log.emit("join", 0, [info.id], join="kv_concat", tokens=root.num_tokens)
        self.pages_after.append(len(root.block_table))

    def result(self) -> ThreadResult:
        assert self.root is not None
        join = "prune" if self.spec.prune else "kv_concat"
        return self._result(
            join,
            self.critical,
            self.root.finish_reason,
            pages_after_subtasks=self.pages_after,
            token_ids=self.root.token_ids[self.gen_start :],
        )
