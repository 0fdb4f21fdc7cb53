"""Appending sampled tokens to sequences and turning requests into RequestOutputs.

`append_tokens` takes one or more tokens per sequence per step (speculative decoding accepts
several): each is appended, detokenized and checked against the stop conditions in order, and
tokens after the one that finished the sequence are dropped. A constrained sequence's grammar
state advances by each token before it is appended (a token the grammar rejects is never
appended: GrammarViolation), and the sequence ends ("stop") when its grammar is complete.
`make_output` builds a request's RequestOutput in the shape its params ask for (cumulative,
delta, or final only), holding back text that could still turn into a stop string.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence as Seq

from forkllm.engine.detokenizer import find_stop_string
from forkllm.engine.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from forkllm.engine.sampling_params import RequestOutputKind
from forkllm.engine.sequence import Request, Sequence
from forkllm.structured.state import GrammarViolation
from forkllm.tokenizer import Tokenizer

TokenLogprob = tuple[float, PositionLogprobs] | None


class OutputProcessor:
    def __init__(
        self,
        tokenizer: Tokenizer | None,
        eos_token_ids: list[int],
        max_model_len: int,
        finish: Callable[[Sequence], None],
    ) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self._finish = finish  # releases a finished sequence's pages (the engine's tree ops)

    def append_tokens(self, seq: Sequence, tokens: Seq[int], logprobs: Seq[TokenLogprob], now: float) -> int:
        """Append tokens in order until one finishes the sequence; returns how many were kept."""
        m = seq.request.metrics
        if m.first_token_time is None and tokens:
            m.first_token_time = now
        for i, (token, lp) in enumerate(zip(tokens, logprobs)):
            if self._append(seq, token, lp):
                return i + 1
        return len(tokens)

    def _append(self, seq: Sequence, token: int, lp: TokenLogprob) -> bool:
        """Append one token; True when it finished the sequence."""
        if seq.grammar is not None:
            try:
                seq.grammar.advance((token,))
            except GrammarViolation as e:
                raise GrammarViolation(f"sequence {seq.seq_id!r}: {e}") from None
        seq.token_ids.append(token)
        if lp is not None and seq.logprobs is not None:
            seq.cumulative_logprob += lp[0]
            seq.logprobs.append(lp[1])
        p = seq.params
        delta = ""
        if self.tokenizer is not None:
            delta = seq.detok.step(self.tokenizer, seq.token_ids, p.skip_special_tokens)
        n_out = seq.num_output_tokens
        reason: str | None = None
        stop_reason: int | str | None = None
        if n_out >= p.min_tokens:
            if not p.ignore_eos and token in self.eos_token_ids:
                reason = "stop"
            elif token in (p.stop_token_ids or ()):
                reason, stop_reason = "stop", token
            elif p.stop_strings and delta:
                hit = find_stop_string(seq.detok.text, len(delta), p.stop_strings)
                if hit is not None:
                    i, stop = hit
                    seq.detok.text = seq.detok.text[: i + (len(stop) if p.include_stop_str_in_output else 0)]
                    reason, stop_reason = "stop", stop
        if reason is None and seq.grammar is not None and seq.grammar.is_finished:
            reason = "stop"  # the grammar is complete: only EOS could follow
        max_new = p.max_tokens if p.max_tokens is not None else self.max_model_len - seq.num_prompt_tokens
        over = seq.token_limit is not None and seq.num_tokens >= seq.token_limit
        if reason is None and (n_out >= max_new or seq.num_tokens >= self.max_model_len or over):
            reason = "length"
        if reason is None:
            return False
        if self.tokenizer is not None and not isinstance(stop_reason, str):
            # Emit bytes still held back for a partial character (not after a stop string cut).
            seq.detok.step(self.tokenizer, seq.token_ids, p.skip_special_tokens, flush=True)
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        self._finish(seq)
        return True

    def make_output(self, req: Request) -> RequestOutput | None:
        kind = req.params.output_kind
        finished = req.finished
        if kind is RequestOutputKind.FINAL_ONLY and not finished:
            return None
        holdback = max((len(s) for s in req.params.stop_strings), default=1) - 1
        outs = []
        for seq in req.seqs:
            text = seq.detok.text
            if not seq.finished and holdback:
                text = text[: max(len(text) - holdback, seq.sent_text_len)]
            out_ids = seq.output_token_ids
            logprobs = seq.logprobs
            if kind is RequestOutputKind.DELTA:
                if seq.sent_tokens == len(out_ids) and (not seq.finished or seq.finish_sent):
                    continue
                seq.finish_sent = seq.finished
                new_text = text[seq.sent_text_len :]
                new_ids = out_ids[seq.sent_tokens :]
                new_lp = None if logprobs is None else logprobs[seq.sent_tokens :]
                seq.sent_text_len, seq.sent_tokens = len(text), len(out_ids)
                text, out_ids, logprobs = new_text, new_ids, new_lp
            outs.append(
                CompletionOutput(
                    index=seq.index,
                    text=text,
                    token_ids=list(out_ids),
                    cumulative_logprob=seq.cumulative_logprob if seq.logprobs is not None else None,
                    logprobs=list(logprobs) if logprobs is not None else None,
                    finish_reason=seq.finish_reason,
                    stop_reason=seq.stop_reason,
                )
            )
        if not outs:
            return None
        return RequestOutput(
            request_id=req.request_id,
            prompt=req.prompt,
            prompt_token_ids=req.prompt_token_ids,
            prompt_logprobs=req.prompt_logprobs,
            outputs=outs,
            finished=finished,
            metrics=req.metrics,
            num_cached_tokens=req.seqs[0].num_reused_tokens if req.seqs else 0,
        )
