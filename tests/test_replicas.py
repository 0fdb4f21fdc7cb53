"""Many replicas behind one endpoint (forkllm/server/replicas): the router on its own, then a local
Ray cluster with two tiny replicas behind the real app: routing by prefix, a fork group on one
replica, streaming, disconnect, a killed replica's requests retried, metrics per replica, and
policies (scaling, thread trees) with their tree and thread events streamed back."""

from __future__ import annotations

import ctypes
import json
import pickle
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import httpx
import pytest

from forkllm.engine.sampling_params import SamplingParams
from forkllm.server.replicas.cluster import call_in_lasting_thread
from forkllm.server.replicas.router import Router


def _ids(seed: int, n: int = 64) -> list[int]:
    return [(seed * 1000 + j) % 40_000 + 10 for j in range(n)]


# ---- the router ----------------------------------------------------------------------------------
def test_prefix_routing_keeps_a_prefix_on_its_replica():
    r = Router(3, "prefix")
    first = {s: r.pick(_ids(s)) for s in range(3)}
    assert sorted(first.values()) == [0, 1, 2]  # new prefixes spread to the least used
    for s in range(3):  # the same system prompt with another question: where it went before
        assert r.pick(_ids(s) + [7, 8, 9] * 10) == first[s]
    assert [load.prefix_pages for load in r.loads] == [4, 4, 4]


def test_an_imbalanced_load_goes_to_the_least_loaded_replica():
    r = Router(2, "prefix", balance_abs=2, balance_rel=1.5)
    home = r.pick(_ids(1))
    for _ in range(5):
        r.started(home)
    assert r.pick(_ids(1)) != home  # its prefix is there, but that replica is far busier
    for _ in range(5):
        r.finished(home)
    assert r.pick(_ids(1)) == home


def test_round_robin_and_least_loaded_and_dead_replicas():
    rr = Router(3, "round_robin")
    assert [rr.pick(_ids(0)) for _ in range(6)] == [0, 1, 2, 0, 1, 2]
    ll = Router(2, "least_loaded")
    ll.started(0)
    assert ll.pick(_ids(0)) == 1
    ll.mark(1, False)
    assert ll.pick(_ids(0)) == 0 and ll.pick(_ids(0), exclude=[1]) == 0
    ll.mark(0, False)
    with pytest.raises(RuntimeError, match="no live replica"):
        ll.pick(_ids(0))
    with pytest.raises(ValueError, match="router must be one of"):
        Router(2, "random")


def test_the_simulator_shows_prefix_routing_keeping_each_cache_warm():
    """Replicas on paper (bench/replica_sim.py): 4 replicas, 16 system prompts, caches that hold
    8 each: prefix routing keeps every replica's share cached, round-robin thrashes all of them."""
    from forkllm.bench.replica_sim import Costs, make_trace, simulate

    trace = make_trace(16, 320, 20, 2.0, 400, 16, seed=1)
    prefix = simulate(trace, 4, "prefix", Costs(), cache_tokens=8 * 320)
    rr = simulate(trace, 4, "round_robin", Costs(), cache_tokens=8 * 320)
    assert prefix["completed"] == rr["completed"] == 400
    assert prefix["hit_rate"] > 0.8 and prefix["hit_rate"] > 2 * rr["hit_rate"]
    assert prefix["ttft_mean"] < rr["ttft_mean"]
    split = simulate(trace, 4, "prefix", Costs(), cache_tokens=8 * 320, split=1)
    assert split["completed"] == 400


def test_a_policys_callbacks_are_found_stripped_for_the_trip_and_collected_there():
    """What stays on the front end (replicas/callbacks.py): n thread trees' watcher and each
    tree's thread-event listener; the policy pickles without them, and gets them back."""
    from forkllm.server.replicas import callbacks
    from forkllm.threads import Fanout
    from forkllm.threads.factory import make_trees

    seen: list = []
    policy = make_trees(
        Fanout(["a", "b"]),
        SamplingParams(n=2),
        on_event=lambda i, ev: seen.append((i, ev)),
        watch=lambda ev: seen.append(ev),
    )
    found = callbacks.find(policy)
    paths = [p for p, _ in found]
    assert paths == [("watch",), ("policies", 0, "log", "on_event"), ("policies", 1, "log", "on_event")]
    with pytest.raises((pickle.PicklingError, AttributeError)):
        pickle.dumps(policy)  # lambdas here; on the server, closures over the stream's event loop
    with callbacks.stripped(policy, paths):
        copy = pickle.loads(pickle.dumps(policy))
    assert callbacks.find(policy) == found and callbacks.find(copy) == []
    calls: list = []
    callbacks.install(copy, paths, lambda k, ev: calls.append((k, ev)))
    copy.policies[1].log.emit("spawn", 0, [1, 2])
    copy.watch("tree")
    callbacks.replay(callbacks.PolicyEvents(calls), [fn for _, fn in found])
    assert seen[0][0] == 1 and seen[0][1].event == "spawn" and seen[1] == "tree"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_child_spawned_off_the_main_thread_outlives_that_thread():
    """Linux sends a child's parent-death signal when the thread that spawned it exits: Ray's
    daemons, spawned so, died with `forkllm serve`'s loading thread. `call_in_lasting_thread`
    spawns from a thread that lasts."""
    libc = ctypes.CDLL(None, use_errno=True)

    def spawn() -> subprocess.Popen:
        return subprocess.Popen(["sleep", "60"], preexec_fn=lambda: libc.prctl(1, signal.SIGKILL, 0, 0, 0))

    children: list[subprocess.Popen] = []
    for how in (spawn, lambda: call_in_lasting_thread(spawn)):
        t = threading.Thread(target=lambda how=how: children.append(how()))
        t.start()
        t.join()
    plain, lasting = children
    try:
        assert plain.wait(10) == -signal.SIGKILL  # what happened to Ray's GCS and raylet
        time.sleep(0.2)
        assert lasting.poll() is None
    finally:
        lasting.kill()
        lasting.wait()


# ---- two replicas on a local Ray cluster ---------------------------------------------------------
ray = pytest.importorskip("ray")
openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from test_server import LiveServer  # noqa: E402

from forkllm.server.app import ServerConfig, create_app  # noqa: E402
from forkllm.server.replicas.client import RayEngineClient  # noqa: E402

TINY = dict(
    model="tiny", load_format="dummy", dtype="float32", kv_cache_memory="64MiB", seed=0, max_model_len=2048
)
SYSTEM = "You are a careful assistant who answers in one line. " * 8


@pytest.fixture(scope="module")
def replicas():
    # Built on a thread that ends at once, as `forkllm serve` builds it (its loading thread): the
    # Ray daemons must outlive that thread (see test_the_ray_daemons_outlive_the_thread_that_started_them).
    box: dict = {}

    def build() -> None:
        box["client"] = RayEngineClient(
            TINY, 2, ray_init={"object_store_memory": 80 * 1024**2}, poll_seconds=0.2
        )

    loader = threading.Thread(target=build)
    loader.start()
    loader.join()
    client = box["client"]
    srv = LiveServer(create_app(ServerConfig(served_model_name="tiny"), engine=client))
    yield client, srv
    srv.stop()
    ray.shutdown()


def _chat(srv, question: str, **kw) -> dict:
    body = {
        "model": "tiny",
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
    }
    r = httpx.post(srv.url + "/v1/chat/completions", json={**body, "max_tokens": 4, **kw}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def _metric(srv, name: str) -> float:
    text = httpx.get(srv.url + "/metrics", timeout=10).text
    line = next(ln for ln in text.splitlines() if ln.startswith(name))
    return float(line.rsplit(" ", 1)[1])


def test_a_shared_system_prompt_lands_on_one_replica_and_n_samples_stay_together(replicas):
    client, srv = replicas
    before = [load.routed for load in client.router.loads]
    _chat(srv, "Name a color.")
    after_first = [load.routed for load in client.router.loads]
    home = next(i for i in range(2) if after_first[i] > before[i])
    for q in ("Name a fruit.", "Name a city."):
        _chat(srv, q)
    assert client.router.loads[home].routed - before[home] == 3  # the whole conversation family
    r = _chat(srv, "Name four animals.", n=4, temperature=1.0)
    assert sorted(c["index"] for c in r["choices"]) == [0, 1, 2, 3]
    time.sleep(0.6)  # the client polls the replicas' metrics
    forks = [client.metrics().get(f"replica.{i}.forks", 0.0) for i in range(2)]
    assert forks[home] >= 3 and forks[1 - home] == 0  # the 3 forks of n=4 ran where the prompt did


def test_streaming_through_a_replica(replicas):
    _, srv = replicas
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "stream": True}
    with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=60) as resp:
        lines = [ln for ln in resp.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and len(lines) >= 4


def test_tree_events_stream_from_the_replica_that_ran_the_request(replicas):
    """`tree_events` across replicas: the replica's engine watches the request and its events
    come back between the outputs, in order, as with one engine."""
    client, srv = replicas
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Name three birds."}],
        "max_tokens": 4,
        "n": 3,
        "temperature": 1.0,
        "seed": 1,
        "stream": True,
        "tree_events": True,
    }
    with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=60) as resp:
        assert resp.status_code == 200, resp.read()
        lines = [ln[len("data: ") :] for ln in resp.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(ln) for ln in lines[:-1]]
    events = [c["tree_event"] for c in chunks if "tree_event" in c]
    kinds = Counter(e["kind"] for e in events)
    assert kinds["root"] == 1 and kinds["fork"] == 2 and kinds["finish"] == 3 and kinds["done"] == 1
    assert events[0]["kind"] == "root" and events[-1]["kind"] == "done"
    first_fork = next(i for i, c in enumerate(chunks) if c.get("tree_event", {}).get("kind") == "fork")
    first_text = next(
        i for i, c in enumerate(chunks) if c["choices"] and c["choices"][0]["delta"].get("content")
    )
    assert first_fork < first_text  # forked at the first sample, reported before its text
    assert {c["choices"][0]["index"] for c in chunks if c["choices"]} == {0, 1, 2}


def _stream(srv, body: dict) -> list[dict]:
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "What is 2 + 3?"}],
        "stream": True,
        **body,
    }
    with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=60) as resp:
        assert resp.status_code == 200, resp.read()
        lines = [ln[len("data: ") :] for ln in resp.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(ln) for ln in lines[:-1]]


def _kinds(chunks: list[dict]) -> Counter[str]:
    return Counter(
        c["tree_event"]["kind"] for c in chunks if "tree_event" in c and c["tree_event"]["kind"] != "progress"
    )


def test_a_streamed_strategy_streams_its_tree_events_as_one_engine_does(replicas):
    """A scaling run's tree watcher stays on the front end; the replica's collected events come
    back in order: the same events, by kind, as the same request on one engine in-process."""
    from forkllm.engine.async_engine import AsyncEngine
    from forkllm.engine.config import EngineConfig
    from forkllm.engine.llm_engine import LLMEngine

    client, srv = replicas
    body = {
        "scaling": {"strategy": "self_consistency", "n": 4, "max_tokens": 6},
        "tree_events": True,
        "seed": 3,
    }
    chunks = _stream(srv, body)
    one = LiveServer(
        create_app(
            ServerConfig(served_model_name="tiny"), engine=AsyncEngine(LLMEngine(EngineConfig(**TINY)))
        )
    )
    try:
        alone = _stream(one, body)
    finally:
        one.stop()
    kinds = _kinds(chunks)
    assert kinds == _kinds(alone)
    assert kinds["root"] == 1 and kinds["fork"] == 3 and kinds["vote"] == 4 and kinds["finish"] == 4
    assert kinds["done"] == 1
    events = [c["tree_event"] for c in chunks if "tree_event" in c]
    assert events[0]["kind"] == "root" and events[-1]["kind"] == "done"
    scaling = chunks[-1]["scaling"]
    assert kinds["fork"] == scaling["forks"] and scaling["chosen"] in {e["seq"] for e in events}
    last_event = max(i for i, c in enumerate(chunks) if "tree_event" in c)
    first_text = next(
        i for i, c in enumerate(chunks) if c["choices"] and c["choices"][0]["delta"].get("content")
    )
    assert last_event < first_text  # the tree was drawn before the answer, as with one engine
    assert sum(load.requests for load in client.router.loads) == 0


def test_streamed_thread_trees_stream_their_thread_events(replicas):
    """n=2 thread trees: each tree's thread-event listener and the trees' watcher are replayed on
    the front end (before, the listener's closure could not be pickled)."""
    _, srv = replicas
    spec = {"fanout": ["Facts.", "Guess."], "max_tokens": 3}
    chunks = _stream(srv, {"threads": spec, "n": 2, "tree_events": True, "max_tokens": 3, "temperature": 0})
    events = [c["thread_event"] for c in chunks if "thread_event" in c]
    assert {e["index"] for e in events} == {0, 1}
    for i in (0, 1):
        mine = [e["event"] for e in events if e["index"] == i]
        assert mine[0] == "spawn" and mine.count("join") == 1 and mine.count("end") == 3
    kinds = _kinds(chunks)
    assert kinds["join"] == 4 and kinds["done"] == 1
    assert [len(c["threads"]["threads"]) for c in chunks[-1]["choices"]] == [3, 3]
    plain = _stream(srv, {"threads": spec, "max_tokens": 3, "temperature": 0})  # listener only
    assert [e["event"] for e in (c["thread_event"] for c in plain if "thread_event" in c)][0] == "spawn"
    assert not _kinds(plain)


def test_a_policy_not_streamed_still_runs_on_a_replica(replicas):
    _, srv = replicas
    r = _chat(srv, "Pick a number.", scaling={"strategy": "best_of_n", "n": 2, "max_tokens": 4})
    assert len(r["scaling"]["candidates"]) == 2 and r["choices"][0]["message"]["content"] is not None


def test_a_client_that_leaves_a_streamed_policy_stops_it_on_its_replica(replicas):
    client, srv = replicas
    time.sleep(0.5)
    before = sum(client.metrics().get(f"replica.{i}.generation_tokens", 0.0) for i in range(2))
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "go on"}],
        "scaling": {"strategy": "self_consistency", "n": 2, "max_tokens": 1500},
        "tree_events": True,
        "stream": True,
    }
    with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=60) as resp:
        next(ln for ln in resp.iter_lines() if "tree_event" in ln)
    deadline = time.time() + 20
    while any(load.requests for load in client.router.loads) or client.metrics().get("running_seqs", 0) > 0:
        assert time.time() < deadline, "the policy kept running after its client left"
        time.sleep(0.2)
    time.sleep(0.5)
    after = sum(client.metrics().get(f"replica.{i}.generation_tokens", 0.0) for i in range(2))
    assert after - before < 1500  # stopped well before its 2 x 1500 tokens


def test_a_client_that_leaves_aborts_on_its_replica(replicas):
    client, srv = replicas
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "go on"}],
        "max_tokens": 1500,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=60) as resp:
        next(resp.iter_lines())
    deadline = time.time() + 20
    while any(w for w in client._work) or client.metrics().get("running_seqs", 0) > 0:
        assert time.time() < deadline, "the request kept running after its client left"
        time.sleep(0.2)


def test_metrics_and_health_per_replica(replicas):
    _, srv = replicas
    _chat(srv, "hello")
    time.sleep(0.5)
    assert _metric(srv, 'forkllm_replica_alive{replica="0"}') == 1.0
    assert _metric(srv, 'forkllm_replica_alive{replica="1"}') == 1.0
    health = httpx.get(srv.url + "/health", timeout=10).json()
    assert [r["status"] for r in health["replicas"]] == ["ok", "ok"]


def test_the_ray_daemons_outlive_the_thread_that_started_them(replicas):
    """The fixture started the cluster on a thread that has ended: the GCS, raylet and helpers
    still run (before the fix they were SIGKILLed then, and the driver died 60 s later)."""
    node = ray._private.worker._global_node
    kinds = {kind for kind, _ in node.live_processes()}
    assert {"gcs_server", "raylet"} <= kinds
    assert node.dead_processes() == []
    assert ray.nodes()[0]["Alive"]


def _wait_all_alive(client, seconds: float = 90) -> None:
    deadline = time.time() + seconds
    while not all(load.alive for load in client.router.loads):
        assert time.time() < deadline, "Ray did not bring the replica back"
        time.sleep(0.5)


def test_a_killed_replica_is_routed_around_and_comes_back(replicas):
    client, srv = replicas
    prompt = _ids(99, 80)
    home = client.router.pick(prompt)  # this prompt's home from now on (the pick is recorded)
    ray.kill(client.actors[home], no_restart=False)
    retries = client.retries
    r = httpx.post(
        srv.url + "/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 4}, timeout=60
    )
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    # retried on the other replica, or routed there at once when the poll saw the death first
    assert client.retries == retries + 1 or not client.router.loads[home].alive
    _wait_all_alive(client)
    assert httpx.get(srv.url + "/health", timeout=10).json()["replicas"][home]["status"] == "ok"


def test_a_stream_cut_by_its_replica_dying_ends_with_an_error(replicas):
    client, srv = replicas
    _wait_all_alive(client)
    body = {"model": "tiny", "prompt": _ids(7, 40), "max_tokens": 1500, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=60) as resp:
        lines = resp.iter_lines()
        first = next(ln for ln in lines if ln.startswith("data: "))
        assert '"text"' in first
        where = next(i for i, w in enumerate(client._work) if w)
        ray.kill(client.actors[where], no_restart=False)
        rest = [ln for ln in lines if ln.startswith("data: ")]
    assert rest[-1] == "data: [DONE]"
    assert any('"error"' in ln and "died" in ln for ln in rest)
    _wait_all_alive(client)


def test_a_replica_dying_under_a_policy_retries_it_or_cuts_its_stream(replicas):
    """A policy whose replica dies before anything streamed runs again on the other replica; one
    whose events had streamed ends with an error, as a plain request does."""
    client, srv = replicas
    _wait_all_alive(client)
    spec = {"strategy": "self_consistency", "n": 2, "max_tokens": 400}
    box: dict = {}
    post = threading.Thread(target=lambda: box.update(r=_chat(srv, "Count on.", scaling=spec)))
    retries = client.retries
    post.start()
    deadline = time.time() + 20
    while not any(load.requests for load in client.router.loads):
        assert time.time() < deadline and post.is_alive(), "the policy never started"
        time.sleep(0.01)
    _kill_busy(client)
    post.join(60)
    assert len(box["r"]["scaling"]["candidates"]) == 2 and client.retries == retries + 1
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "go on"}],
        "scaling": {**spec, "max_tokens": 1500},
        "tree_events": True,
        "stream": True,
    }
    with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=60) as resp:
        lines = resp.iter_lines()
        next(ln for ln in lines if "tree_event" in ln)
        _kill_busy(client)  # the other one may still be coming back: both down a while
        rest = [ln for ln in lines if ln.startswith("data: ")]
    assert rest[-1] == "data: [DONE]"
    assert any('"error"' in ln and "died" in ln for ln in rest)
    _wait_all_alive(client)


def _kill_busy(client) -> None:
    """Kill the replica that runs a request now (Ray restarts it)."""
    busy = next(i for i, load in enumerate(client.router.loads) if load.requests)
    ray.kill(client.actors[busy], no_restart=False)
