"""`ServerArgs`: the HTTP server's options, validated once when built."""

from __future__ import annotations

from dataclasses import dataclass, field

from radixflow.runtime.config import EngineConfig

_LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class ServerArgs:
    """Options of the HTTP server; `engine` configures the scheduler process.

    `max_waiting_requests`: requests in flight beyond `engine.max_running_requests` before new
    ones get 503. `max_new_tokens_limit`: None = the context length. `log_interval`: scheduler
    steps between log lines (0 = off). `watchdog_timeout`: seconds without a sign of progress
    from the scheduler, while requests are in flight, before /health answers 503.
    `request_timeout`: seconds after which a request is aborted with 504 (None = never).
    `header_timeout` / `body_timeout`: seconds a client may take to send its request headers /
    between two chunks of its body. `allowed_origins` / `allowed_hosts`: browser Origins and Host
    names accepted besides the server's own (`*` = any; see guard.RequestGuard)."""

    engine: EngineConfig = field(default_factory=EngineConfig)
    host: str = "127.0.0.1"
    port: int = 30000  # 0 = any free port (the ready line names it)
    api_key: str | None = None
    served_model_name: str | None = None
    max_waiting_requests: int = 1024
    max_request_bytes: int = 8 * 1024 * 1024
    max_n: int = 16
    max_new_tokens_limit: int | None = None
    max_top_logprobs: int = 20
    log_interval: int = 40
    log_level: str = "info"
    health_generate_timeout: float = 60.0
    startup_timeout: float = 900.0
    watchdog_timeout: float = 120.0
    request_timeout: float | None = None
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    allowed_origins: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty")
        for name in ("max_request_bytes", "max_n", "health_generate_timeout", "startup_timeout", "watchdog_timeout",
                     "header_timeout", "body_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.request_timeout is not None and self.request_timeout <= 0:
            raise ValueError(f"request_timeout must be > 0, got {self.request_timeout}")
        for name in ("allowed_origins", "allowed_hosts"):
            value = getattr(self, name)
            if not isinstance(value, tuple) or not all(isinstance(v, str) and v for v in value):
                raise ValueError(f"{name} must be a tuple of non-empty strings, got {value!r}")
        for name in ("max_waiting_requests", "max_top_logprobs", "log_interval"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_new_tokens_limit is not None and self.max_new_tokens_limit < 1:
            raise ValueError("max_new_tokens_limit must be >= 1")
        if self.log_level not in _LOG_LEVELS:
            raise ValueError(f"log_level must be one of {_LOG_LEVELS}, got {self.log_level!r}")
