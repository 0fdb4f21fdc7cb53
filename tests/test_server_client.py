"""create_app over something that is not an AsyncEngine: any EngineClient (a replica router, say)
can stand behind the routes."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from forkllm.engine.llm_engine import PromptInput  # noqa: E402
from forkllm.engine.outputs import CompletionOutput, RequestOutput  # noqa: E402
from forkllm.engine.sampling_params import RequestOutputKind, SamplingParams  # noqa: E402
from forkllm.scaling.base import Policy, ScaleResult  # noqa: E402
from forkllm.server.app import ServerConfig, create_app  # noqa: E402
from forkllm.server.client import EngineClient  # noqa: E402


class EchoClient:
    """Answers every prompt with its own first characters, one token per character."""

    tokenizer = None
    max_model_len = 64
    vocab_size = 128
    is_running = True
    num_waiting = 0

    def __init__(self) -> None:
        self.request_ids: list[str] = []
        self.shut_down = False

    async def generate(
        self, prompt: PromptInput, params: SamplingParams, request_id: str, priority: int = 0, watch=None
    ) -> AsyncIterator[RequestOutput]:
        self.request_ids.append(request_id)
        assert isinstance(prompt, dict)
        ids = list(prompt["prompt_token_ids"])
        out = ids[: params.max_tokens]
        deltas = [[t] for t in out] if params.output_kind is RequestOutputKind.DELTA else [out]
        for k, delta in enumerate(deltas):
            last = k == len(deltas) - 1
            text = "".join(chr(t) for t in delta)
            reason = "length" if last else None
            yield RequestOutput(
                request_id, None, ids, None, [CompletionOutput(0, text, delta, None, None, reason)], last
            )

    def abort(self, request_id: str) -> None:
        pass

    async def run_policy(self, policy: Policy, prompt_ids: list[int], question: str) -> ScaleResult:
        raise ValueError("no policies here")

    def tokenize_prompt(self, prompt: PromptInput) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, [ord(c) for c in prompt]
        assert isinstance(prompt, list)
        return None, prompt

    def metrics(self) -> dict[str, float]:
        return {"running_seqs": 0, "waiting_seqs": 0}

    def shutdown(self) -> None:
        self.shut_down = True

    def describe(self) -> str:
        return "echo"


def test_fake_engine_client_serves_models_and_completions() -> None:
    fake = EchoClient()
    engine: EngineClient = fake  # the protocol is all create_app needs
    with TestClient(create_app(ServerConfig(served_model_name="echo"), engine=engine)) as http:
        assert http.get("/health").status_code == 200
        models = http.get("/v1/models").json()
        assert [(m["id"], m["max_model_len"]) for m in models["data"]] == [("echo", 64)]

        r = http.post("/v1/completions", json={"model": "echo", "prompt": "hello", "max_tokens": 3})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["choices"][0]["text"] == "hel" and body["choices"][0]["finish_reason"] == "length"
        assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}

        with http.stream(
            "POST", "/v1/completions", json={"prompt": "hey", "max_tokens": 2, "stream": True}
        ) as resp:
            lines = [ln for ln in resp.iter_lines() if ln]
        assert lines[-1] == "data: [DONE]" and len(lines) == 3

        r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 400 and r.json()["error"]["message"].startswith("this model has no tokenizer")
        assert "forkllm_requests_total" in http.get("/metrics").text
    assert fake.shut_down and len(fake.request_ids) == 2
