"""The engine's seams: flags generated from EngineConfig, the output processor's multi-token
append, seeds drawn on the engine's thread, and the one policy driver."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
from conftest import tiny_llm

from forkllm.cli import build_parser
from forkllm.engine.args import add_engine_args, engine_config, engine_kwargs
from forkllm.engine.config import EngineConfig
from forkllm.engine.policy import run_policies
from forkllm.engine.sampling_params import SamplingParams

FIELDS = [f.name for f in dataclasses.fields(EngineConfig)]


@pytest.mark.parametrize("command", ["generate", "chat", "serve", "bench", "solve", "eval"])
def test_every_engine_field_is_a_flag_with_the_configs_default(command):
    argv = {"bench": ["bench", "throughput"], "solve": ["solve", "q"]}.get(command, [command])
    args = build_parser().parse_args(argv)
    kw = engine_kwargs(args)
    assert sorted(kw) == sorted(FIELDS)
    assert engine_config(args) == EngineConfig()


def test_flags_reach_the_config():
    p = argparse.ArgumentParser()
    add_engine_args(p)
    args = p.parse_args(
        [
            "--no-enable-prefix-caching",
            "--no-enable-shared-prefix-attention",
            "--min-shared-prefix-tokens",
            "64",
            "--gpu-memory-utilization",
            "0.5",
            "--no-enable-cpu-kernels",
            "--kv-cache-memory",
            "512MiB",
            "--max-model-len",
            "1024",
        ]
    )
    cfg = engine_config(args)
    assert cfg.enable_prefix_caching is False and cfg.enable_shared_prefix_attention is False
    assert cfg.enable_chunked_prefill is True and cfg.enable_cpu_kernels is False
    assert (cfg.min_shared_prefix_tokens, cfg.gpu_memory_utilization) == (64, 0.5)
    assert (cfg.kv_cache_memory, cfg.max_model_len, cfg.num_kv_blocks) == ("512MiB", 1024, None)
    with pytest.raises(SystemExit):
        p.parse_args(["--load-format", "pickle"])


def test_append_tokens_stops_at_the_first_stop_and_drops_the_rest():
    """Speculative decoding appends several tokens per step: a stop token inside the run ends the
    sequence there, and what follows is not appended."""
    llm = tiny_llm()
    engine = llm.engine
    rid = engine.add_request([5, 6, 7], SamplingParams(max_tokens=10, stop_token_ids=[42], temperature=0))
    engine.step()  # prefill + the first sampled token
    seq = engine.requests[rid].seqs[0]
    before = seq.num_output_tokens
    kept = engine.outputs.append_tokens(seq, [11, 42, 13, 14], [None] * 4, now=0.0)
    assert kept == 2
    assert seq.output_token_ids[before:] == [11, 42]
    assert (seq.finished, seq.finish_reason, seq.stop_reason) == (True, "stop", 42)
    engine.abort_request(rid)


def test_append_tokens_stops_at_max_tokens():
    llm = tiny_llm()
    engine = llm.engine
    rid = engine.add_request([5, 6, 7], SamplingParams(max_tokens=3, ignore_eos=True, temperature=0))
    engine.step()
    seq = engine.requests[rid].seqs[0]
    assert engine.outputs.append_tokens(seq, [1, 2, 3, 4], [None] * 4, now=0.0) == 2
    assert seq.num_output_tokens == 3 and seq.finish_reason == "length"


def test_unseeded_requests_draw_seeds_in_admission_order():
    """make_request may run on any thread: the seed is drawn when the engine admits the request,
    so the first admitted request gets the engine's first seed whichever was made first."""
    params = SamplingParams(max_tokens=4, temperature=1.0)
    e1, e2 = tiny_llm().engine, tiny_llm().engine
    a1, b1 = e1.make_request([1, 2, 3], params), e1.make_request([4, 5, 6], params)
    e1.add_prepared(b1)
    e1.add_prepared(a1)
    b2, a2 = e2.make_request([4, 5, 6], params), e2.make_request([1, 2, 3], params)
    e2.add_prepared(b2)
    e2.add_prepared(a2)
    assert (b1.base_seed, a1.base_seed) == (b2.base_seed, a2.base_seed)
    assert b1.seqs[0].seed != a1.seqs[0].seed


class _Boom:
    """A policy that fails on its second step."""

    def __init__(self) -> None:
        self.done = False
        self.steps = 0
        self.stopped = False
        self.engine = None

    def start(self, engine, prompt_ids, question):
        self.engine = engine
        self.rid = engine.add_request(prompt_ids, SamplingParams(n=3, max_tokens=50, ignore_eos=True))

    def on_step(self, engine):
        self.steps += 1
        if self.steps == 2:
            raise RuntimeError("policy failed")

    def stop(self):
        self.stopped = True
        self.engine.abort_request(self.rid)

    def result(self):
        return self.steps


def test_a_failing_policy_is_stopped_and_its_error_raised():
    llm = tiny_llm()
    engine = llm.engine
    boom = _Boom()
    with pytest.raises(RuntimeError, match="policy failed"):
        run_policies(engine, [(boom, [1, 2, 3, 4], "")])
    assert boom.stopped
    assert engine.step_hooks == ()
    assert not engine.has_unfinished_requests()
    assert engine.kv.pool.num_used == 0


def test_readme_tree_policy_example():
    from forkllm.engine.policy import TreeRun

    class FirstToFinish:  # n samples; the first to finish wins, the rest are pruned
        done = False

        def start(self, engine, prompt_ids, question):
            self.tree = TreeRun(engine, prompt_ids, SamplingParams(n=8, max_tokens=64), budget=None)

        def on_step(self, engine):
            if self.tree.finished():
                for s in self.tree.live():
                    self.tree.prune(s)
                self.done = True

        def stop(self):
            self.tree.abort()

        def result(self):
            return self.tree.finished()[0].text

    llm = tiny_llm()
    policy = FirstToFinish()
    text = llm.scale("Name a prime.", policy)
    assert isinstance(text, str) and policy.done
    # the tiny random model never stops early: all 8 reach max_tokens in the same step
    assert [s.finish_reason for s in policy.tree.seqs] == ["length"] * 8
    assert not llm.engine.has_unfinished_requests() and llm.engine.kv.pool.num_used == 0
