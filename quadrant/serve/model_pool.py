"""ModelPool: the models one server answers for, loaded on first request and unloaded when idle.

The model named on the command line loads at start and stays (pinned). Others, the extra ones
named with `--models` and, as Ollama does, every model pulled into the store, load on their first
request, on a thread, and unload after `keep_alive` seconds without a request (Ollama's rule:
each request may set its own; negative keeps it loaded, 0 unloads it once idle). At most
`max_loaded_models` are loaded together: a new one first unloads the least recently used idle
one, and when every loaded model is busy the request gets a 503 to retry.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from dataclasses import dataclass, replace

from quadrant.loader import store
from quadrant.serve.admission import ServerState
from quadrant.serve.config import ServerConfig
from quadrant.serve.errors import OpenAIError
from quadrant.serve.metrics import ServerMetrics

log = logging.getLogger("quadrant.serve")
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


@dataclass
class Slot:
    name: str
    state: ServerState
    pinned: bool
    last_used: float
    keep_alive: float  # seconds idle before unloading; < 0: never
    loading: asyncio.Future | None = None

    @property
    def expires_at(self) -> float | None:
        """time.time() at which an idle slot unloads; None: never."""
        if self.pinned or self.keep_alive < 0:
            return None
        return self.last_used + self.keep_alive


def parse_keep_alive(value: float | int | str | None, default: float) -> float:
    """Seconds from Ollama's keep_alive (a number of seconds, or '5m', '1h', '30s', '-1'); ValueError if bad."""
    if value is None:
        return default
    if isinstance(value, bool):
        raise ValueError("keep_alive must be a duration")
    if isinstance(value, (int, float)):
        return float(value)
    match = re.fullmatch(r"\s*(-?\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*", value)
    if match is None:
        raise ValueError(f"keep_alive: {value!r} is not a duration like 30s, 5m or 1h")
    number, unit = float(match.group(1)), match.group(2) or "s"
    return number * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]


class ModelPool:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.metrics = ServerMetrics()  # one registry for the whole server
        self.primary = ServerState(config, self.metrics)
        now = time.time()
        self.slots: dict[str, Slot] = {config.model_name: Slot(config.model_name, self.primary, True, now, -1)}
        self.extra = dict(config.extra_models)  # served name -> model reference
        self._lock = threading.Lock()

    # -- which models ----------------------------------------------------------------------------
    def servable(self) -> list[str]:
        """Every name a request may use: the primary, the extras, the pulled catalogue models."""
        names = [self.config.model_name, *self.extra]
        if self.config.serve_pulled:
            names += [m.name for m in store.list_models()]
        return list(dict.fromkeys(names))

    def resolve(self, name: str) -> tuple[str, str] | None:
        """(slot name, model reference) for a request's model name; None if not served."""
        if name in (self.config.model_name, self.config.model):
            return self.config.model_name, self.config.model
        if name in self.extra:
            return name, self.extra[name]
        # Only a plain model name reaches the store: a request never names a file.
        if self.config.serve_pulled and _MODEL_NAME.fullmatch(name) and not store.looks_like_path(name):
            canonical = store.canonical_name(name)
            if canonical == store.canonical_name(self.config.model_name):
                return self.config.model_name, self.config.model
            if store.find_stored(canonical) is not None:
                return canonical, canonical
        return None

    # -- the request's engine --------------------------------------------------------------------
    async def get(self, name: str | None, keep_alive: float | int | str | None = None) -> ServerState:
        """The loaded ServerState for `name` (None: the primary), loading it first if need be."""
        if name is None:
            return self.primary
        resolved = self.resolve(name)
        if resolved is None:
            raise OpenAIError(404, f"the model {name!r} does not exist; this server serves "
                                   f"{', '.join(repr(n) for n in self.servable())}", "invalid_request_error",
                              param="model", code="model_not_found")
        slot_name, ref = resolved
        try:
            seconds = parse_keep_alive(keep_alive, self.config.keep_alive)
        except ValueError as e:
            raise OpenAIError(400, str(e), param="keep_alive") from None
        slot = self.slots.get(slot_name)
        if slot is None:
            slot = await self._load(slot_name, ref, seconds)
        elif slot.loading is not None:
            await asyncio.shield(slot.loading)
        if slot.state.load_error is not None:
            self.slots.pop(slot_name, None)
            raise OpenAIError(500, f"loading {slot_name} failed: {slot.state.load_error}", "server_error",
                              code="model_load_failed")
        slot.last_used = time.time()
        if keep_alive is not None:
            slot.keep_alive = seconds
        return slot.state

    async def _load(self, name: str, ref: str, keep_alive: float) -> Slot:
        self._make_room()
        config = replace(self.config, model=ref, served_model_name=name, extra_models={},
                         engine_kwargs={**self.config.engine_kwargs, "cpu_compile_at_start": False})
        state = ServerState(config, self.metrics)
        loop = asyncio.get_running_loop()
        slot = Slot(name, state, False, time.time(), keep_alive, loop.create_future())
        self.slots[name] = slot
        log.info("loading %s on first request", name)
        try:
            await asyncio.to_thread(state.load)
        finally:
            assert slot.loading is not None
            slot.loading.set_result(None)
            slot.loading = None
        return slot

    def _make_room(self) -> None:
        """Unload the least recently used idle model while the budget is full; 503 if all are busy."""
        while len(self.slots) >= self.config.max_loaded_models:
            idle = [s for s in self.slots.values() if not s.pinned and s.loading is None and s.state.active == 0]
            if not idle:
                raise OpenAIError(503, f"{len(self.slots)} models are loaded (--max-loaded-models) and all are busy; "
                                       "retry shortly", "service_unavailable", code="models_busy",
                                  headers={"Retry-After": "2"})
            self.unload(min(idle, key=lambda s: s.last_used).name)

    def unload(self, name: str) -> None:
        slot = self.slots.pop(name, None)
        if slot is not None and slot.state.llm is not None:
            log.info("unloading %s", name)
            threading.Thread(target=slot.state.llm.shutdown, name=f"unload-{name}", daemon=True).start()

    async def reap_forever(self, every: float = 1.0) -> None:
        """Unload idle models whose keep_alive has run out (runs for the server's life)."""
        while True:
            await asyncio.sleep(every)
            now = time.time()
            for slot in list(self.slots.values()):
                expires = slot.expires_at
                if expires is not None and expires <= now and slot.loading is None and slot.state.active == 0:
                    self.unload(slot.name)

    def loaded(self) -> list[Slot]:
        return [s for s in self.slots.values() if s.loading is None and s.state.llm is not None]

    def shutdown(self) -> None:
        for slot in list(self.slots.values()):
            if slot.state.llm is not None:
                slot.state.llm.shutdown()
