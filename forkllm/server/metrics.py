"""Prometheus metrics for the server (a registry per app: no module-level state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    1.5,
    2.0,
    3.0,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "forkllm_requests",
            "HTTP requests to /v1 by endpoint and status code",
            ["endpoint", "status"],
            registry=r,
        )
        self.ttft = Histogram(
            "forkllm_time_to_first_token_seconds",
            "time from arrival to the first token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "forkllm_inter_token_latency_seconds",
            "time between generated tokens",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.generation_tokens = Counter("forkllm_generation_tokens", "tokens generated", registry=r)
        self.prompt_tokens = Counter("forkllm_prompt_tokens", "prompt tokens received", registry=r)
        self.running = Gauge("forkllm_num_sequences_running", "sequences in the running batch", registry=r)
        self.waiting = Gauge("forkllm_num_sequences_waiting", "sequences waiting for admission", registry=r)
        self.kv_used = Gauge("forkllm_kv_cache_pages_used", "KV pages held by sequences", registry=r)
        self.kv_total = Gauge("forkllm_kv_cache_pages_total", "KV pages in the pool", registry=r)
        self.kv_cached = Gauge("forkllm_kv_cache_pages_cached", "KV pages in the prefix cache", registry=r)
        self.hit_rate = Gauge(
            "forkllm_prefix_cache_hit_rate", "prompt tokens reused / prompt tokens", registry=r
        )
        self.preemptions = Gauge("forkllm_preemptions", "sequences preempted so far", registry=r)
        self.forks = Gauge("forkllm_forks", "sequences forked so far", registry=r)
        self.prompt_computed = Gauge(
            "forkllm_prompt_tokens_computed", "prompt tokens whose KV was computed (not reused)", registry=r
        )
        # speculative decoding (0 when off)
        # One series per replica (forkllm serve --replicas): the same gauges, labelled.
        self.replica = {
            key: Gauge(f"forkllm_replica_{key}", help, ["replica"], registry=r)
            for key, help in (
                ("alive", "1 while the replica answers"),
                ("running_seqs", "sequences in the replica's running batch"),
                ("waiting_seqs", "sequences waiting in the replica"),
                ("kv_pages_in_use", "KV pages held by the replica's sequences"),
                ("prefix_cache_hit_rate", "the replica's prefix cache hit rate"),
                ("generation_tokens", "tokens the replica generated"),
            )
        }
        self.spec = {
            key: Gauge(f"forkllm_{key}", help, registry=r)
            for key, help in (
                ("spec_draft_tokens", "draft tokens verified so far"),
                ("spec_accepted_tokens", "draft tokens accepted so far"),
                ("spec_acceptance_rate", "accepted / drafted tokens"),
                ("spec_mean_accepted_length", "tokens a drafted sequence gains per step (accepted + 1)"),
                ("spec_tree_drafts", "drafts with more than one branch (--speculative-tree-width)"),
                ("spec_branch_wins", "tree drafts whose kept path was not the first guess"),
                (
                    "spec_history_drafts",
                    "suffix drafts whose first token came from recent finished requests' outputs",
                ),
                ("spec_history_tokens", "output tokens held in the suffix drafts' history"),
            )
        }

    def update_engine(self, m: dict[str, float]) -> None:
        self.running.set(m.get("running_seqs", 0))
        self.waiting.set(m.get("waiting_seqs", 0))
        self.kv_used.set(m.get("kv_pages_in_use", 0))
        self.kv_total.set(m.get("kv_pages_total", 0))
        self.kv_cached.set(m.get("kv_pages_cached", 0))
        self.hit_rate.set(m.get("prefix_cache_hit_rate", 0.0))
        self.preemptions.set(m.get("preemptions", 0))
        self.forks.set(m.get("forks", 0))
        self.prompt_computed.set(m.get("prompt_tokens_computed", 0))
        for key, gauge in self.spec.items():
            gauge.set(m.get(key, 0))
        for name, value in m.items():
            if name.startswith("replica."):
                _, replica, key = name.split(".", 2)
                if key in self.replica:
                    self.replica[key].labels(replica=replica).set(value)

    def render(self) -> bytes:
        return generate_latest(self.registry)
