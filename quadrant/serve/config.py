"""ServerConfig: what `quadrant serve` was asked for (model, address, limits, engine options).

Plain data checked at construction; it builds nothing. The routes, the guard and
the admission state all read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ServerConfig:
    model: str
    served_model_name: str | None = None  # the name clients send; default: `model`
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_queued_requests: int = 256  # beyond running + this many, new requests get 429
    max_body_bytes: int = 4 * 2**20
    shutdown_timeout: float = 30.0  # seconds to finish in-flight requests on SIGTERM
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    # More models (serve/model_pool.py): loaded on first request, unloaded after keep_alive seconds idle.
    extra_models: dict[str, str] = field(default_factory=dict)  # served name -> model reference
    serve_pulled: bool = True  # every model pulled into the store is servable too, as in Ollama
    keep_alive: float = 300.0  # default seconds an on-demand model stays loaded idle (< 0: for good)
    max_loaded_models: int = 3  # the primary included

    def __post_init__(self) -> None:
        if self.max_loaded_models < 1:
            raise ValueError("max_loaded_models must be >= 1")
        if self.max_queued_requests < 0:
            raise ValueError("max_queued_requests must be >= 0")
        if self.max_body_bytes < 1024:
            raise ValueError("max_body_bytes must be at least 1024")
        if not 0 < self.port < 65536:
            raise ValueError("port must be in 1..65535")

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model
