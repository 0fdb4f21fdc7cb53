"""AsyncEngine: concurrent streams, validation errors, aborts free pages."""

from __future__ import annotations

import asyncio

import pytest
from conftest import tiny_llm

from forkllm import SamplingParams
from forkllm.engine.async_engine import AsyncEngine
from forkllm.engine.sampling_params import RequestOutputKind


@pytest.fixture()
def aengine():
    eng = AsyncEngine(tiny_llm().engine)
    yield eng
    eng.shutdown()


def test_concurrent_streams_match_offline(aengine):
    prompts = [[100 + i, 200 + i, 300 + i] for i in range(8)]
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
    expect = [o.outputs[0].token_ids for o in tiny_llm().generate(prompts, sp, use_tqdm=False)]

    async def one(p):
        ids = []
        async for out in aengine.generate(p, sp):
            ids += out.outputs[0].token_ids
        return ids

    async def main():
        return await asyncio.gather(*(one(p) for p in prompts))

    assert asyncio.run(main()) == expect


def test_bad_request_raises_and_engine_keeps_serving(aengine):
    async def main():
        with pytest.raises(ValueError, match="max_tokens"):
            async for _ in aengine.generate([1, 2], SamplingParams(max_tokens=0)):
                pass
        with pytest.raises(ValueError, match="prompt is empty"):
            async for _ in aengine.generate("", SamplingParams()):
                pass
        outs = [o async for o in aengine.generate([1, 2, 3], SamplingParams(max_tokens=4, ignore_eos=True))]
        return outs[-1]

    last = asyncio.run(main())
    assert last.finished and len(last.outputs[0].token_ids) == 4


def test_abandoned_stream_aborts_and_frees_pages(aengine):
    engine = aengine.engine
    free0 = engine.kv.pool.num_free

    async def main():
        gen = aengine.generate(list(range(100, 180)), SamplingParams(max_tokens=500, ignore_eos=True))
        n = 0
        async for _ in gen:
            n += 1
            if n == 3:
                break
        await gen.aclose()
        for _ in range(100):  # the abort lands before the engine's next step
            await asyncio.sleep(0.02)
            if not engine.has_unfinished_requests():
                break

    asyncio.run(main())
    assert not engine.has_unfinished_requests()
    assert engine.kv.pool.num_free == free0
