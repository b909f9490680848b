"""`RouterArgs`: the router's options, validated once when built."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from radixflow.runtime.server.args import ServerArgs

POLICIES = ("cache_aware", "round_robin", "random")


def normalize_worker_url(url: str) -> str:
    """`http[s]://host:port` (no trailing slash, no path); raises ValueError otherwise."""
    if not isinstance(url, str):
        raise ValueError(f"a worker URL must be a string, got {type(url).__name__}")
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as e:
        raise ValueError(f"bad worker URL {url!r}: {e}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or port is None:
        raise ValueError(f"bad worker URL {url!r}: expected http://HOST:PORT")
    if parts.path.strip("/") or parts.query or parts.fragment:
        raise ValueError(f"bad worker URL {url!r}: expected http://HOST:PORT, without a path")
    return f"{parts.scheme}://{parts.netloc}"


@dataclass(frozen=True)
class RouterArgs:
    """Options of `radixflow router`.

    Routing (policy `cache_aware`): a request goes to the worker whose tree matches the largest
    share of its text when that share is >= `cache_threshold`, else to the least-loaded worker;
    when the loads are imbalanced (max - min > `balance_abs_threshold` and max >
    `balance_rel_threshold` * min, counting in-flight requests) the least-loaded worker wins
    regardless. Each worker's tree holds at most `max_tree_chars` characters.
    Health: GET /health every `health_interval` s; `health_failures` failures in a row mark a
    worker dead (no traffic) until it answers again. A request that fails before any byte of
    its answer was forwarded is tried on up to `max_attempts` workers in all.
    `api_key`, `max_request_bytes`, `header_timeout`, `body_timeout`, `allowed_*`: as for the
    server (the same request guard). The client's Authorization header is passed on to workers."""

    worker_urls: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    port: int = 30000
    policy: str = "cache_aware"
    cache_threshold: float = 0.5
    balance_abs_threshold: int = 32
    balance_rel_threshold: float = 1.5
    max_tree_chars: int = 1 << 22
    health_interval: float = 2.0
    health_failures: int = 3
    health_timeout: float = 5.0
    request_timeout: float = 600.0
    max_attempts: int = 3
    api_key: str | None = None
    max_request_bytes: int = 8 * 1024 * 1024
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    allowed_origins: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()
    log_level: str = "info"

    def __post_init__(self) -> None:
        object.__setattr__(self, "worker_urls", tuple(normalize_worker_url(u) for u in self.worker_urls))
        if len(set(self.worker_urls)) != len(self.worker_urls):
            raise ValueError(f"worker URLs repeat: {list(self.worker_urls)}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if not 0.0 <= self.cache_threshold <= 1.0:
            raise ValueError(f"cache_threshold must be in [0, 1], got {self.cache_threshold}")
        if self.balance_abs_threshold < 0 or self.balance_rel_threshold < 1.0:
            raise ValueError("balance_abs_threshold must be >= 0 and balance_rel_threshold >= 1")
        for name in ("max_tree_chars", "health_failures", "max_attempts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("health_interval", "health_timeout", "request_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        self.guard_args()  # validates port, api_key, body limits, hosts, origins, log level

    def guard_args(self) -> ServerArgs:
        """The request guard's options (the server's guard runs in front of the router too)."""
        return ServerArgs(host=self.host, port=self.port, api_key=self.api_key,
                          max_request_bytes=self.max_request_bytes, header_timeout=self.header_timeout,
                          body_timeout=self.body_timeout, allowed_origins=self.allowed_origins,
                          allowed_hosts=self.allowed_hosts, log_level=self.log_level)
