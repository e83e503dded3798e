"""Decode-only CPU steps through torch.compile'd graphs: the CPU's answer to CUDA graphs.

A decode step of the default model is ~60 small ops per layer; run one by one from Python
their dispatch costs about as much as the weights' matmuls. Inductor fuses the norms,
rotary and residual adds into a few C++ loops and calls the weight and attention kernels
(kernels/cpu_native.py's custom ops) directly. One graph per padded batch size
(1, 2, 4, 8, 16); the block-table width is a dynamic dimension, so a growing context
compiles nothing new. Padding rows write into a scratch block the scheduler never hands out
and attend to it alone.

A server compiles every graph before it serves (`compile_all`): about a minute each the first
time on 2 cores, seconds once inductor's cache under $QUADRANT_HOME/inductor has them.
Elsewhere (chat, the Python API) graphs compile on a background thread, batch size 1 from the
start and the others the first time a step needs them; until one is ready its steps run
eagerly (the compiler gets one process, so steps keep a core). Any failure (no C compiler, a model whose forward does not trace) leaves the eager path in place.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections import deque
from typing import Any

import torch
from tqdm import tqdm

from quadrant import envs
from quadrant.layers.attention import AttentionMetadata

log = logging.getLogger(__name__)

BATCH_SIZES = (1, 2, 4, 8, 16)
# An eager decode step's time over a compiled one's: the default model on 2 cores, 25 ms against
# 10 (BENCHMARKS.md). Steps past the largest graph run eagerly; the draft policy counts this.
EAGER_RATIO = 2.5
# Each extra row's share of a one-row step before a graph's own time is measured: the eager kernels'
# figure (BENCHMARKS.md); measured graphs on 2 cores came out between 0.13 and 0.7.
_PRIOR_ROW_COST = 0.25
# A graph's time is the lower quartile of its latest timings. Other load only ever slows a step, and a
# process's first steps run slow (7.4, 6.8, 5.8 ms, then 4.3 for one row here): a mean kept the
# rarely run one-row graph at 6.5 ms, a 2-row step then looked cheaper than one row, and a weak
# proposer drafted at a loss.
_TIMINGS_KEPT = 16
_ONE_ROW_TIMINGS = 4  # a lone drafting request takes plain steps until the one-row graph has this many


def compile_available() -> bool:
    """Inductor's CPU code needs a C++ compiler; QUADRANT_CPU_COMPILE=0 turns compiling off."""
    return envs.cpu_compile() and (shutil.which(os.environ.get("CXX", "g++")) is not None)


class CompiledDecode:
    def __init__(self, model: Any, block_size: int, scratch_block: int, max_batch: int) -> None:
        self.model = model
        self.block_size = block_size
        self.scratch_slot = scratch_block * block_size  # padding rows write here
        self.scratch_block = scratch_block
        self.sizes = [s for s in BATCH_SIZES if s <= max(1, max_batch)]
        if max_batch > self.sizes[-1] and max_batch < BATCH_SIZES[-1]:
            self.sizes.append(next(s for s in BATCH_SIZES if s >= max_batch))
        self.ready: set[int] = set()
        self.seconds: dict[int, float] = {}  # padded batch size -> time of a step (LM head included)
        self._timings: dict[int, deque[float]] = {}  # padded batch size -> its latest timings
        self._warmed: set[int] = set()  # graphs whose first real step has run (not timed)
        self._num_timed = 0  # steps timed so far
        self._timed_at: dict[int, int] = {}  # padded batch size -> _num_timed at its latest timing
        self.failed = False
        self._queued: set[int] = set()
        self._lock = threading.Lock()  # guards _queued
        self._compile_lock = threading.Lock()  # one compile at a time: two would only share the same cores
        self._threads = torch.get_num_threads()
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(envs.quadrant_home() / "inductor"))
        limit = getattr(torch._dynamo.config, "recompile_limit", 8)
        torch._dynamo.config.recompile_limit = max(limit, 4 * len(self.sizes))
        # The model's modules and parameters never change after load: guarding on them would cost
        # ~1 ms a step for nothing.
        self._compiled = torch.compile(self._forward, fullgraph=True, dynamic=False,
                                       options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe, "cpp_wrapper": True})

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, slot_block: torch.Tensor,
                 slot_offset: torch.Tensor, seq_lens: torch.Tensor, tables: torch.Tensor, tree_start: torch.Tensor,
                 tree_mask: torch.Tensor) -> torch.Tensor:
        bs, width = tables.shape
        meta = AttentionMetadata(
            query_start_loc=torch.arange(bs + 1, dtype=torch.int32),
            seq_lens=seq_lens,
            max_query_len=1,
            max_seq_len=width * self.block_size,
            query_start_loc_cpu=list(range(bs + 1)),
            seq_lens_cpu=[1] * bs,  # unread: padded decode masks by the seq_lens tensor
            slot_mapping=slot_block * self.block_size + slot_offset,
            block_tables=tables,
            slot_block=slot_block,
            slot_offset=slot_offset,
            padded_decode=True,
            tree_start=tree_start,
            tree_mask=tree_mask,
        )
        return self.model(ids, positions, meta)

    def _inputs(self, input_ids: list[int], positions: list[int], slots: list[int], seq_lens: list[int],
                tables: list[list[int]], bs: int, tree: tuple[list[int], list[int]] | None = None) -> list[torch.Tensor]:
        pad = bs - len(input_ids)
        # Token trees: each row's span start and ancestor bits; other rows' spans start past their context.
        tree_start, tree_mask = tree if tree is not None else (seq_lens, [-1] * len(seq_lens))
        width = max(2, max(len(t) for t in tables))  # >= 2: a width of 1 would be specialised
        slots = slots + [self.scratch_slot] * pad
        slot_t = torch.tensor(slots, dtype=torch.long)
        rows = [t + [self.scratch_block] * (width - len(t)) for t in tables] + [[self.scratch_block] * width] * pad
        table_t = torch.tensor(rows, dtype=torch.int32)
        torch._dynamo.mark_dynamic(table_t, 1)
        return [torch.tensor(input_ids + [0] * pad), torch.tensor(positions + [0] * pad),
                slot_t // self.block_size, slot_t % self.block_size,
                torch.tensor(seq_lens + [1] * pad, dtype=torch.int32), table_t,
                torch.tensor(tree_start + [1] * pad, dtype=torch.int32), torch.tensor(tree_mask + [-1] * pad)]

    def padded(self, rows: int) -> int | None:
        """The graph batch size a step of `rows` decode rows runs at; None: past the largest."""
        return next((s for s in self.sizes if s >= rows), None)

    def record(self, rows: int, seconds: float) -> None:
        """A compiled step of `rows` decode rows took `seconds` (the speculation policy's cost model). A
        graph's first real step is left out: it ran at about twice its usual time (7.7 and 10.8 ms for the
        first 2-row steps against 4.5 ms for one row), and a rarely run graph would keep that for long."""
        bs = self.padded(rows)
        if bs is None:
            return
        if bs not in self._warmed:
            self._warmed.add(bs)
            return
        self._num_timed += 1
        self._timed_at[bs] = self._num_timed
        timings = self._timings.setdefault(bs, deque(maxlen=_TIMINGS_KEPT))
        timings.append(seconds)
        self.seconds[bs] = sorted(timings)[(len(timings) - 1) // 4]

    def wants_one_row_step(self, every: int = 64) -> bool:
        """Whether the one-row graph's time rests on fewer than 4 timings (one alone sits at the median, not
        the lower quartile), or was last measured more than `every` timed steps ago:
        a lone request that verifies drafts at every step never runs it otherwise, and every cost the
        policy weighs is counted in it."""
        if 1 not in self.ready or self.failed:
            return False
        return len(self._timings.get(1, ())) < _ONE_ROW_TIMINGS or self._num_timed - self._timed_at[1] > every

    def one_row_seconds(self) -> float | None:
        """A one-row compiled step's time: measured, or, while no one-row step has run (a lone request
        that verifies drafts at every step), the smallest measured graph's time over its prior cost;
        None before any compiled step ran."""
        if 1 in self.seconds:
            return self.seconds[1]
        if not self.seconds:
            return None
        smallest = min(self.seconds)
        return self.seconds[smallest] / (1.0 + _PRIOR_ROW_COST * (smallest - 1))

    def step_cost(self, rows: int) -> float:
        """A decode-only step of `rows` rows (speculative drafts count as rows), in one-row compiled
        steps: the measured time of its graph, a prior of 1 + 0.25 per padded row until measured,
        and EAGER_RATIO times that where no graph takes it (too large, not compiled yet, failed)."""
        bs = self.padded(rows)
        one = self.one_row_seconds()
        if bs is not None and bs in self.ready and not self.failed:
            if one is not None and bs in self.seconds:
                return self.seconds[bs] / one
            return 1.0 + _PRIOR_ROW_COST * (bs - 1)
        return EAGER_RATIO * (1.0 + _PRIOR_ROW_COST * (rows - 1))

    def run(self, input_ids: list[int], positions: list[int], slots: list[int], seq_lens: list[int],
            tables: list[list[int]], tree: tuple[list[int], list[int]] | None = None) -> torch.Tensor | None:
        """Final hidden states [n, D] of a decode-only step, or None (run it eagerly) while its batch
        size has no graph yet; the first such miss starts that graph's compile. `tree`: each row's
        token-tree span start and ancestor bits (AttentionMetadata.tree_start / tree_mask)."""
        n = len(input_ids)
        if self.failed or n > self.sizes[-1]:
            return None
        bs = next(s for s in self.sizes if s >= n)
        if bs not in self.ready:
            self._queue(bs)
            return None
        return self._compiled(*self._inputs(input_ids, positions, slots, seq_lens, tables, bs, tree))[:n]

    def _queue(self, bs: int) -> None:
        with self._lock:
            if bs in self._queued:
                return
            self._queued.add(bs)
        # Not a daemon: a process must not exit mid-compile (the compiler's native state then aborts
        # it); one that ends meanwhile waits for the graph in flight and skips those queued.
        threading.Thread(target=self._compile, args=(bs,), name=f"quadrant-compile-{bs}").start()

    def start(self) -> None:
        """Begin with batch size 1 (what a single conversation needs), in the background."""
        self._queue(self.sizes[0])

    def compile_all(self) -> None:
        """Every batch size's graph on this thread, before the engine serves: about a minute each
        the first time on 2 cores, ~7 s each from inductor's cache. A server does this. A graph
        compiled beside running steps holds the GIL for most of its minute, and each of a step's
        ~1,800 small ops waits for it in turn: 4 concurrent streams fell from 116 to 18 tokens/s.
        Compiling in a child process instead starves both on 2 cores (OpenMP threads oversubscribed:
        eager steps 4x slower, the graph not done in 3 minutes)."""
        for bs in tqdm(self.sizes, desc="compile CPU decode graphs", unit=" graphs"):
            with self._lock:
                self._queued.add(bs)
            self._compile(bs, compile_threads=self._threads)  # nothing else runs yet: all cores

    def compile_now(self, num_seqs: int) -> bool:
        """Compile the graph for num_seqs rows on this thread, waiting for a background compile if one
        runs (benchmarks measure compiled steps; tests); whether it is ready."""
        if self.failed or num_seqs > self.sizes[-1]:
            return False
        bs = next(s for s in self.sizes if s >= num_seqs)
        with self._lock:
            self._queued.add(bs)
        self._compile(bs)
        return bs in self.ready

    def _compile(self, bs: int, compile_threads: int | None = None) -> None:
        with self._compile_lock:
            if self.failed or bs in self.ready or not threading.main_thread().is_alive():
                return
            import torch._inductor.config

            # One compiler process, so the engine's own steps keep a core. The graph is traced with
            # the engine thread's thread count (dynamo guards on it).
            torch._inductor.config.compile_threads = compile_threads or max(1, self._threads - 1)
            torch.set_num_threads(self._threads)
            try:
                with torch.inference_mode():  # padding rows only: they touch the scratch block alone
                    self._compiled(*self._inputs([0], [0], [self.scratch_slot], [1], [[self.scratch_block]], bs))
            except Exception as e:  # noqa: BLE001 - any compiler failure means: stay eager
                self.failed = True
                if not threading.main_thread().is_alive():
                    return  # the process is exiting: the compiler refuses to start new work, as it should
                log.warning("compiled CPU decode unavailable, staying eager: %s", str(e).strip().splitlines()[-1][:300])
                return
            self.ready.add(bs)
