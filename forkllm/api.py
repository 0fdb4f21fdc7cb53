"""The offline Python API, shaped like vLLM's: LLM(...).generate / .chat."""

from __future__ import annotations

import time
from collections.abc import Sequence as Seq
from typing import Any, TypeVar, overload

from forkllm.engine.config import EngineConfig
from forkllm.engine.llm_engine import LLMEngine, PromptInput
from forkllm.engine.outputs import CompletionOutput, RequestOutput
from forkllm.engine.policy import TreePolicy, run_policies
from forkllm.engine.sampling_params import RequestOutputKind, SamplingParams
from forkllm.threads import MapReduce, ThreadResult
from forkllm.threads.factory import ThreadSpec, generate_trees, make_policy, make_trees
from forkllm.threads.policy import DEFAULT_MAX_DEPTH
from forkllm.tokenizer import Tokenizer
from forkllm.tools.executor import ToolExecutor
from forkllm.tools.formats import DEFAULT_FORMAT, get_format
from forkllm.tools.prompt import render_chat
from forkllm.tools.runtime import (
    RoundGrammar,
    ToolPolicy,
    ToolTurnRenderer,
)
from forkllm.tools.runtime_schema import ToolLike, as_tools

R = TypeVar("R")

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]

Conversation = list[dict[str, Any]]
ThreadPrompt = str | list[int] | Conversation | Seq[str]


class LLM:
    """An engine plus batch helpers. `LLM()` loads the embedded SmolLM2-135M-Instruct.

    Keyword arguments are EngineConfig fields: dtype, device, block_size, kv_cache_memory,
    max_num_seqs, max_num_batched_tokens, max_model_len, load_format, seed, ...
    """

    def __init__(self, model: Any = None, **engine_kwargs: Any) -> None:
        self.engine = LLMEngine(EngineConfig(model=model, **engine_kwargs))
        self._tool_executor: ToolExecutor | None = None

    def get_tokenizer(self) -> Tokenizer:
        if self.engine.tokenizer is None:
            raise ValueError("this model was loaded without a tokenizer")
        return self.engine.tokenizer

    # ---- generate -----------------------------------------------------------------------------
    def generate(
        self,
        prompts: PromptInput | Seq[PromptInput],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text, token-id list, or {"prompt_token_ids": ...}); outputs in
        prompt order. `sampling_params` is one SamplingParams for all, or one per prompt."""
        batch = _as_batch(prompts)
        params = self._params_for(batch, sampling_params)
        return self._dispatch(batch, params, use_tqdm)

    def chat(
        self,
        messages: Conversation | Seq[Conversation],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        continue_final_message: bool = False,
        tools: Seq[ToolLike] | None = None,
        run_tools: bool = False,
        max_tool_rounds: int = 8,
        tool_timeout: float | None = 60.0,
        tool_grammar: RoundGrammar | Seq[RoundGrammar | None] | None = None,
        tool_format: str = DEFAULT_FORMAT,
    ) -> list[RequestOutput]:
        """Chat with one conversation (a list of {"role", "content"}) or a batch of them.

        `tools`: Python callables (their JSON schema comes from the signature and docstring),
        `Tool`s, or (OpenAI tool dict, callable) pairs; they are listed in the system prompt.
        With `run_tools` the engine runs the calls the model makes itself, while it keeps decoding
        (forkllm.tools.runtime): each call starts as soon as its markup closes, the calls of one
        message run concurrently, a call that raises or passes `tool_timeout` seconds gives the
        model an error message, and the sequence resumes from its own KV with the results, for at
        most `max_tool_rounds` messages with calls. Each output is then a ToolCompletionOutput:
        the last assistant message plus `tool_calls` (arguments, results, timings) and `messages`.
        n > 1 samples each run their own tools. `tool_grammar(r)` may force the format of
        assistant message r (a StructuredOutputsParams, or None); a list gives one per conversation. `tool_format`: how calls are
        written and read (forkllm.tools.formats: hermes, llama3_json, pythonic)."""
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError(
                "messages must be a non-empty list of {'role', 'content'} dicts (or a list of those)"
            )
        if isinstance(messages, list) and messages and isinstance(messages[0], dict):
            convs: list[Conversation] = [messages]  # type: ignore[list-item]
        else:
            convs = list(messages)  # type: ignore[arg-type]
        tok = self.get_tokenizer()
        if run_tools and not tools:
            raise ValueError("run_tools=True needs tools")
        table = as_tools(tools) if tools else None
        fmt = get_format(tool_format)
        rendered: list[tuple[str, list[int]]] = []
        for conv in convs:
            text = render_chat(
                tok,
                conv,
                tools=[t.spec() for t in table.values()] if table is not None else None,
                tool_format=fmt.name,
                chat_template=chat_template,
                add_generation_prompt=add_generation_prompt and not continue_final_message,
            )
            if continue_final_message:
                last = conv[-1].get("content") or ""
                text = text[: text.rfind(last) + len(last)] if last else text
            rendered.append((text, tok.encode(text, add_special_tokens=False)))
        prompts: list[PromptInput] = [{"prompt": t, "prompt_token_ids": ids} for t, ids in rendered]
        params = self._params_for(prompts, sampling_params)
        if not run_tools or table is None:
            return self._dispatch(prompts, params, use_tqdm)
        if any(p.threads is not None for p in params):
            raise ValueError("SamplingParams.threads cannot be combined with run_tools")
        renderer = ToolTurnRenderer(tok, fmt, chat_template)
        grammars: list[RoundGrammar | None]
        if isinstance(tool_grammar, (list, tuple)):
            grammars = list(tool_grammar)
            if len(grammars) != len(rendered):
                raise ValueError(f"got {len(grammars)} tool_grammar for {len(rendered)} conversations")
        else:
            grammars = [tool_grammar] * len(rendered)  # type: ignore[list-item]
        jobs: list[tuple[TreePolicy[RequestOutput], list[int], str]] = []
        for (text, ids), p, g in zip(rendered, params, grammars):
            policy = ToolPolicy(
                p, table, self.tool_executor, renderer, max_tool_rounds, tool_timeout, g, prompt=text
            )
            jobs.append((policy, ids, ""))
        return run_policies(self.engine, jobs)

    @property
    def tool_executor(self) -> ToolExecutor:
        """Runs the tools of `chat(..., run_tools=True)` (one thread pool and event loop per LLM)."""
        if self._tool_executor is None:
            self._tool_executor = ToolExecutor()
        return self._tool_executor

    # ---- inference-time scaling -----------------------------------------------------------------
    def scale(self, prompt: str | list[int] | Conversation, strategy: TreePolicy[R], chat: bool = True) -> R:
        """Run an inference-time scaling strategy (forkllm.scaling) on one question inside the
        engine: one prefill, forks for samples, prunes for losers, one batch."""
        return self.scale_batch([prompt], [strategy], chat=chat)[0]

    def scale_batch(
        self, prompts: Seq[str | list[int] | Conversation], strategies: Seq[TreePolicy[R]], chat: bool = True
    ) -> list[R]:
        """Several questions at once, one (fresh) strategy object each; all trees share each step."""

        if len(prompts) != len(strategies):
            raise ValueError(
                f"got {len(strategies)} strategies for {len(prompts)} prompts; pass one per prompt"
            )
        jobs = [(strategy, *self._scale_prompt(p, chat)) for p, strategy in zip(prompts, strategies)]
        return run_policies(self.engine, [(s, ids, q) for s, ids, q in jobs])

    # ---- reasoning threads ----------------------------------------------------------------------
    @overload
    def threads(
        self,
        prompt: ThreadPrompt,
        spec: ThreadSpec,
        sampling_params: SamplingParams | None = None,
        chat: bool = True,
        max_depth: int = DEFAULT_MAX_DEPTH,
        n: None = None,
    ) -> ThreadResult: ...
    @overload
    def threads(
        self,
        prompt: ThreadPrompt,
        spec: ThreadSpec,
        sampling_params: SamplingParams | None = None,
        chat: bool = True,
        max_depth: int = DEFAULT_MAX_DEPTH,
        *,
        n: int,
    ) -> list[ThreadResult]: ...
    def threads(
        self,
        prompt: ThreadPrompt,
        spec: ThreadSpec,
        sampling_params: SamplingParams | None = None,
        chat: bool = True,
        max_depth: int = DEFAULT_MAX_DEPTH,
        n: int | None = None,
    ) -> ThreadResult | list[ThreadResult]:
        """Run a thread tree inside the engine (forkllm.threads): a `Fanout`, `Subtasks` or
        model-driven `Protocol` from `prompt`, or a `MapReduce` over `prompt` (a list of chunks).
        Greedy unless `sampling_params` says. `n`: n trees of the prompt, one ThreadResult each
        (one prefill, the contexts forked from it as n samples are; tree i is the tree a lone
        run seeded `derive_seed(seed, i)` gives: threads/trees.py)."""
        return self.threads_batch([prompt], [spec], sampling_params, chat, max_depth, n=n)[0]

    @overload
    def threads_batch(
        self,
        prompts: Seq[ThreadPrompt],
        specs: Seq[ThreadSpec],
        sampling_params: SamplingParams | None = None,
        chat: bool = True,
        max_depth: int = DEFAULT_MAX_DEPTH,
        n: None = None,
    ) -> list[ThreadResult]: ...
    @overload
    def threads_batch(
        self,
        prompts: Seq[ThreadPrompt],
        specs: Seq[ThreadSpec],
        sampling_params: SamplingParams | None = None,
        chat: bool = True,
        max_depth: int = DEFAULT_MAX_DEPTH,
        *,
        n: int,
    ) -> list[list[ThreadResult]]: ...
    def threads_batch(
        self,
        prompts: Seq[ThreadPrompt],
        specs: Seq[ThreadSpec],
        sampling_params: SamplingParams | None = None,
        chat: bool = True,
        max_depth: int = DEFAULT_MAX_DEPTH,
        n: int | None = None,
    ) -> list[ThreadResult] | list[list[ThreadResult]]:
        """Several thread trees at once (n each, with `n`); all their threads share each step's batch."""
        if len(prompts) != len(specs):
            raise ValueError(f"got {len(specs)} thread specs for {len(prompts)} prompts; pass one per prompt")
        jobs: list[tuple[TreePolicy[Any], list[int], str]] = []
        for prompt, spec in zip(prompts, specs):
            chunks: list[str] = []
            if isinstance(spec, MapReduce):
                if isinstance(prompt, str) or not all(isinstance(c, str) for c in prompt):
                    raise ValueError("MapReduce: the prompt must be a list of chunks (strings)")
                chunks, prompt = list(prompt), spec.context  # type: ignore[arg-type]
            if n is None:
                policy: TreePolicy[Any] = make_policy(spec, sampling_params, chunks, max_depth)
            else:
                params = (sampling_params or SamplingParams(temperature=0.0)).clone(n=n)
                policy = make_trees(spec, params, chunks, max_depth)
            ids, question = self._scale_prompt(prompt, chat)  # type: ignore[arg-type]
            jobs.append((policy, ids, question))
        return run_policies(self.engine, jobs)

    def _scale_prompt(self, prompt: str | list[int] | Conversation, chat: bool) -> tuple[list[int], str]:
        """(prompt token ids, the question text scorers see)."""
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
            tok = self.get_tokenizer()
            text = tok.apply_chat_template(prompt)  # type: ignore[arg-type]
            question = str(prompt[-1].get("content", ""))  # type: ignore[union-attr]
            return tok.encode(text, add_special_tokens=False), question
        if isinstance(prompt, str):
            tok = self.get_tokenizer()
            if chat and tok.chat_template:
                return tok.encode(
                    tok.apply_chat_template([{"role": "user", "content": prompt}]), add_special_tokens=False
                ), prompt
            return tok.encode(prompt), prompt
        return self.engine.tokenize_prompt(list(prompt))[1], ""  # type: ignore[arg-type]

    # ---- internals ----------------------------------------------------------------------------
    def _params_for(
        self, batch: list[PromptInput], sp: SamplingParams | Seq[SamplingParams] | None
    ) -> list[SamplingParams]:
        if sp is None:
            sp = SamplingParams()
        if isinstance(sp, SamplingParams):
            plist = [sp] * len(batch)
        else:
            plist = list(sp)
            if len(plist) != len(batch):
                raise ValueError(
                    f"got {len(plist)} SamplingParams for {len(batch)} prompts; pass one or one per prompt"
                )
        return [
            p
            if p.output_kind is RequestOutputKind.FINAL_ONLY
            else p.clone(output_kind=RequestOutputKind.FINAL_ONLY)
            for p in plist
        ]

    def _dispatch(
        self, batch: list[PromptInput], params: list[SamplingParams], use_tqdm: bool
    ) -> list[RequestOutput]:
        """Prompts whose params carry `threads` run as thread trees (params.n each: one
        ThreadCompletionOutput per tree), the others as plain requests, in the same batches."""
        if all(p.threads is None for p in params):
            return self._run(batch, params, use_tqdm)
        engine = self.engine
        trees = {
            i: generate_trees(engine, prompt, p)
            for i, (prompt, p) in enumerate(zip(batch, params))
            if p.threads is not None
        }
        plain: dict[int, str] = {}
        waiting: dict[str, RequestOutput | None] = {}
        try:
            for i, (prompt, p) in enumerate(zip(batch, params)):
                if p.threads is None:
                    plain[i] = engine.add_request(prompt, p)
                    waiting[plain[i]] = None
            results = run_policies(engine, list(trees.values()), waiting)
        except BaseException:
            engine.abort_request([r for r, out in waiting.items() if out is None])
            raise
        by_index = {i: t.request_output(r, q or None) for (i, (t, _, q)), r in zip(trees.items(), results)}
        return [by_index[i] if i in by_index else waiting[plain[i]] for i in range(len(batch))]  # type: ignore[misc]

    def _run(
        self, batch: list[PromptInput], params: list[SamplingParams], use_tqdm: bool
    ) -> list[RequestOutput]:
        engine = self.engine
        ids: list[str] = []
        try:
            for prompt, p in zip(batch, params):
                ids.append(engine.add_request(prompt, p))
        except Exception:
            engine.abort_request(ids)
            raise
        pending = set(ids)
        results: dict[str, RequestOutput] = {}
        bar = _progress(len(ids)) if use_tqdm else None
        t0, n_out = time.perf_counter(), 0
        try:
            while pending:
                for out in engine.step():
                    if out.finished and out.request_id in pending:
                        pending.discard(out.request_id)
                        results[out.request_id] = out
                        n_out += sum(len(c.token_ids) for c in out.outputs)
                        if bar is not None:
                            bar.update(1)
                            bar.set_postfix_str(f"output {n_out / (time.perf_counter() - t0):.1f} tok/s")
                if pending and not engine.scheduler.has_unfinished():
                    raise RuntimeError("engine stopped with requests pending")  # never expected
        except BaseException:
            engine.abort_request(list(pending))
            raise
        finally:
            if bar is not None:
                bar.close()
        return [results[i] for i in ids]


def _as_batch(prompts: Any) -> list[PromptInput]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if isinstance(prompts, (list, tuple)):
        if not prompts:
            raise ValueError("prompts is empty")
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompts):
            return [list(prompts)]  # one prompt given as token ids
        return list(prompts)
    raise ValueError(f"prompts must be a string, token ids, or a list of those; got {type(prompts).__name__}")


def _progress(total: int) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc="Generating", unit="req", dynamic_ncols=True)
