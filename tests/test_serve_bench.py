"""`forkllm bench serve --hostile` and `--overload` smoke runs: a few seconds against a tiny-model
server with tiny sizes. Checks the report's fields and that its counts add up; no timing
assertions (the numbers come from the real benchmark)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from test_real_clients import KEY, serve_tiny  # noqa: E402

from forkllm.bench.hostile import parse_limit  # noqa: E402
from forkllm.bench.serve_bench import build_parser, check_loopback, run_serve_bench  # noqa: E402

ROW_FIELDS = {
    "rate",
    "sent",
    "completed",
    "rejected_503",
    "retry_after",
    "errors",
    "lost",
    "ttft_p50",
    "ttft_p99",
    "itl_p50",
    "itl_p99",
    "completed_per_s",
}


@pytest.fixture(scope="module")
def base_url():
    # max_num_waiting low enough for the overload run to meet 503s; max_model_len small so the
    # near-context prompt is quick on two CPU cores.
    with serve_tiny("--max-model-len", "256", "--max-num-waiting", "8") as url:
        yield url


def _args(base_url, tmp_path, *extra):
    return build_parser().parse_args(
        [
            "--url",
            base_url,
            "--api-key",
            KEY,
            "--prompt-len",
            "16-32",
            "--output-range",
            "2-4",
            "--request-timeout",
            "60",
            "--out-dir",
            str(tmp_path),
            *extra,
        ]
    )


def _check_row(r):
    assert set(r) >= ROW_FIELDS
    assert r["sent"] == r["completed"] + r["rejected_503"] + r["errors"] + r["lost"]
    assert r["retry_after"] <= r["rejected_503"]


def test_hostile_mode_report(base_url, tmp_path):
    args = _args(
        base_url,
        tmp_path,
        "--hostile",
        "--hostile-rate",
        "4",
        "--duration",
        "2",
        "--hostile-max-tokens",
        "3",
        "--near-context-margin",
        "4",
    )
    rep = run_serve_bench(args)
    assert rep["mode"] == "hostile"
    for phase in ("clean", "hostile"):
        _check_row(rep[phase])
    # the same seeded arrivals in both phases
    assert rep["clean"]["sent"] == rep["hostile"]["sent"] > 0
    assert "ttft_p99_ratio" in rep and set(rep["targets"]) == {
        "ttft_p99_ratio_at_most",
        "ratio_met",
        "zero_silent_drops",
    }
    hc = rep["hostile_client"]
    assert hc["rounds"] >= 1
    assert (
        hc["sent"]
        == len(hc["attempts"])
        == sum(hc[k] for k in ("ok", "refused", "rejected", "error", "lost"))
    )
    kinds = [a["kind"] for a in hc["attempts"]]
    assert {"near_context", "many_samples", "scaling"} <= set(kinds)
    assert hc["near_context_tokens"] == 256 - 4
    assert hc["n_asked"] == 256 and hc["scaling_n_asked"] == 64
    assert rep["silent_drops"] == rep["clean"]["lost"] + rep["hostile"]["lost"] + hc["lost"]
    saved = list(tmp_path.glob("w5-hostile-*.json"))
    assert len(saved) == 1 and json.loads(saved[0].read_text())["hostile_client"]["sent"] == hc["sent"]
    assert list(tmp_path.glob("w5-hostile-*.md"))


def test_overload_mode_report(base_url, tmp_path):
    rep = run_serve_bench(_args(base_url, tmp_path, "--overload", "--rates", "40", "--duration", "1"))
    assert rep["mode"] == "overload"
    assert 1 <= len(rep["rows"]) <= 4  # at most three rates added to reach 2x the sustained rate
    for r in rep["rows"]:
        _check_row(r)
    assert rep["rejected_503"] == sum(r["rejected_503"] for r in rep["rows"])
    assert rep["silent_drops"] == sum(r["lost"] for r in rep["rows"])
    assert {"sustainable_req_s", "highest_offered_over_sustainable", "retry_after"} <= set(rep)


def test_abuse_modes_refuse_remote_servers():
    check_loopback("http://127.0.0.1:8000/v1")
    check_loopback("http://localhost:8000/v1")
    check_loopback("http://[::1]:8000/v1")
    with pytest.raises(SystemExit, match="only target a server on this machine"):
        check_loopback("http://10.0.0.5:8000/v1")
    with pytest.raises(SystemExit):
        check_loopback("https://api.example.com/v1")


def test_parse_limit():
    assert parse_limit("n must be at most 128, got 256", 256) == 128
    assert parse_limit("scaling.n=64 exceeds the limit of 32", 64) == 32
    assert parse_limit("n must be at most 512", 256) is None  # not below what was asked
    assert parse_limit("tools are not supported", 256) is None


def test_traffic_bodies_of_text_and_token_id_prompts():
    """The replicas trace sends token ids and must keep its shared prefixes: no tag there (a tag
    on token ids is an error, not a crash mid-run); text prompts get the tag in front."""
    from forkllm.bench.serve_bench import Traffic

    ids = Traffic("u", {}, "m", [[1, 2, 3]], [8], True, 60.0)
    assert ids.body(0)["prompt"] == [1, 2, 3]
    with pytest.raises(ValueError, match="token-id prompts"):
        ids.body(0, "[r1] ")
    text = Traffic("u", {}, "m", ["hello"], [8], False, 60.0)
    body = text.body(0, "[r1] ")
    assert body["prompt"] == "[r1] hello" and "ignore_eos" not in body
