"""LLMEngine.step(): schedule, run, update, emit; and LLM, the batch API on top of it.

The engine is the driver: it owns the tokenizer, the KV block manager, the scheduler and output
processing (engine/output.py), and reaches the model only through an executor (engine/executor.py:
in this process, or tp x ep worker processes) with one plain StepInput per step.
"""

from __future__ import annotations

import itertools
import time
import weakref
from dataclasses import replace
from collections import deque
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import torch
from tqdm import tqdm

from quadrant import envs
from quadrant.chat import render_chat
from quadrant.config import CacheConfig, EngineConfig, ParallelConfig, SchedulerConfig, SpeculativeConfig
from quadrant.engine.executor import (Executor, InProcessExecutor, completed, make_executor, open_source,
                                     resolve_weight_format)
from quadrant.engine.kv_cache import KVCacheManager
from quadrant.engine.output import OutputProcessor, RequestGroup, SampleState
from quadrant.engine.request import Request, RequestOutput
from quadrant.engine.runner import ModelRunner
from quadrant.engine.scheduler import ScheduledRequest, Scheduler, SchedulerOutput
from quadrant.engine.spec.ngram import NgramProposer
from quadrant.engine.spec.policy import SpeculationPolicy
from quadrant.engine.spec.proposer import Proposer, SpecStats, make_proposer
from quadrant.engine.spec.tree import best_line, depths
from quadrant.engine.step import Pooled, PromptLogprobs, StepEncoder, StepOutput
from quadrant.engine.structured import GrammarError, StructuredOutputs
from quadrant.engine.worker import Worker
from quadrant.errors import QuadrantError
from quadrant.loader import store
from quadrant.quant.formats import compact_rows, small_batch_tokens
from quadrant.sampling_params import SamplingParams
from quadrant.tokenizer import IncrementalDetokenizer, Tokenizer

if TYPE_CHECKING:
    from quadrant.disagg.connector import KVConnector
    from quadrant.disagg.protocol import RemoteKV
    from quadrant.engine.cpu_compiled import CompiledDecode

Prompt = str | list[int]


_SPECULATIVE_OPTIONS = {"speculative_method": "method", "num_speculative_tokens": "num_speculative_tokens",
                        "speculative_model": "model", "speculative_draft_layers": "draft_layers",
                        "speculative_tree_branches": "tree_branches", "speculative_draft_cost": "draft_cost"}


class PromptTooLongError(QuadrantError, ValueError):
    """The prompt does not fit the model's context."""


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        start = time.perf_counter()
        self.config = config
        self.source = open_source(config)
        self.model_config = self.source.config
        # A weights-only folder (tests, dummy loads) has no tokenizer; token ids still work.
        self.tokenizer: Tokenizer | None = self.source.tokenizer() if self.source.has_tokenizer() else None
        self.eos_token_ids = frozenset(self.tokenizer.eos_token_ids if self.tokenizer else self.model_config.eos_token_ids)
        self.weight_format = resolve_weight_format(config, self.source)
        self.executor: Executor = make_executor(config, self.source, self.weight_format)
        # Worker processes stop with the engine: when it is collected, or at exit at the latest.
        self._finalizer = weakref.finalize(self, self.executor.shutdown)
        num_blocks = self.executor.available_kv_blocks()
        self.kv = KVCacheManager(num_blocks, config.cache.block_size, config.scheduler.enable_prefix_caching)
        self.max_model_len = min(self.model_config.max_position_embeddings, num_blocks * config.cache.block_size)
        self.executor.init_cache(num_blocks, self.max_model_len)
        self.connector = self._make_connector()
        self.scheduler = Scheduler(config.scheduler, self.kv, self.connector,
                                   config.kv_transfer.load_failure_policy == "recompute")
        self.steps = StepEncoder()
        spec = config.speculative
        if spec.tree_branches > 1 and any(self.model_config.layer_sliding_window(i) is not None
                                          for i in range(self.model_config.num_hidden_layers)):
            raise QuadrantError("token trees need full attention in every layer, and this model has sliding-window "
                                "layers: use --speculative-tree-branches 1")
        self.proposer: Proposer | None = make_proposer(spec, self) if spec.enabled else None
        # CPU auto weights: past small_batch_tokens() tokens a step runs dense GEMMs instead of compact
        # kernels: without measured step costs, the policy keeps verifying steps within them.
        cpu_auto = self.weight_format == "auto" and config.device.startswith("cpu")
        compact = None
        if cpu_auto:  # the model's own limit (4-bit and int8 weights switch at different sizes; None: none do)
            in_process = isinstance(self.executor, InProcessExecutor)
            compact = compact_rows(self.runner.model) if in_process else small_batch_tokens()
        self.spec_policy = SpeculationPolicy(spec, self.max_model_len, spec.resolved_draft_cost(config.device), compact)
        if self._compiled is not None and spec.draft_cost is None:
            self.spec_policy.step_cost = self._compiled.step_cost  # measured compiled step times
            self.spec_policy.max_step_tokens = None  # those times include the switch to dense GEMMs
        if self._compiled is not None and spec.tree_branches > 1:
            # A graph of 8 rows costs the same for 5 tokens as for 8: a tree's other branches fill the rows
            # its best continuation (n-gram) or a lone request's planned chain (EAGLE) leaves padded (exact
            # for a lone request), never more.
            from quadrant.engine.spec.eagle import EagleProposer

            graphs = self._compiled
            assert isinstance(self.proposer, (NgramProposer, EagleProposer))
            self.proposer.room = lambda best: (graphs.padded(1 + best) or 1 + best) - 1
        self.spec_stats = SpecStats()
        self.output = OutputProcessor(self.max_model_len, self.scheduler.finish)
        # Structured outputs need the tokenizer's byte strings; a tokenizer-less model has none.
        self.structured = StructuredOutputs(self.tokenizer, self.model_config.vocab_size) if self.tokenizer else None
        self._ids = itertools.count()
        self.num_computed_tokens = 0  # tokens run through the model so far (prefix-cache hits excluded)
        self.num_steps = 0
        self.num_overlapped_steps = 0  # steps launched while the one before still ran (overlapped scheduling)
        self.expert_placement: dict[str, list[int]] = {}  # MoE layer -> expert of each slot, as of the last rebalance
        self.overlap = self._resolve_overlap()
        # Steps handed to the executor whose results are not processed yet, oldest first (at most two
        # with overlap: one running, the next queued behind it).
        self._in_flight: deque[tuple[SchedulerOutput, Future[StepOutput]]] = deque()
        self.load_seconds = time.perf_counter() - start

    def _resolve_overlap(self) -> bool:
        """Overlapped scheduling: step N+1 is scheduled, and step N-1's outputs processed, while step N runs
        on the executor's compute thread. It needs the worker that samples in this process (placeholders
        stand for the tokens in flight) and steps whose inputs never wait on their predecessor's tokens:
        not with speculation (drafts extend the last token), a KV connector or expert rebalancing."""
        wanted = self.config.async_scheduling
        blockers = [why for why, present in (
            ("--tp/--ep worker processes", not isinstance(self.executor, InProcessExecutor)),
            ("speculative decoding", self.proposer is not None),
            ("--role prefill/decode", self.connector is not None),
            ("--eplb-interval", bool(self.config.parallel.eplb_interval))) if present]
        if wanted and blockers:
            raise QuadrantError(f"--async-scheduling does not combine with {blockers[0]} yet")
        # Off unless asked for: on 2 CPU cores it gained nothing (BENCHMARKS.md, "Overlapped scheduling").
        return not blockers and (wanted if wanted is not None else envs.async_scheduling())

    def _make_connector(self) -> KVConnector | None:
        """Prefill/decode disaggregation: the KV server (prefill) or puller (decode) beside the KV tensors."""
        transfer = self.config.kv_transfer
        if transfer.role == "both":
            return None
        from quadrant.disagg.connector import KVConnector
        from quadrant.disagg.protocol import KVLayout

        layout = KVLayout.of(self.model_config, self.config.cache, getattr(torch, self.config.dtype))
        # Worker processes (--tp/--ep) keep their KV tensors: the connector stages blocks through the executor.
        in_process = isinstance(self.executor, InProcessExecutor)
        connector = KVConnector(transfer, layout, self.runner.kv_caches if in_process else None, self.executor)
        if in_process and transfer.role == "prefill":
            self.runner.on_layer_stored = connector.layer_done  # overlapped pulls follow the prefill layer by layer
        self._connector_finalizer = weakref.finalize(self, connector.shutdown)
        return connector

    def set_wakeup(self, wakeup: Callable[[], None]) -> None:
        """`wakeup()` is called from transfer threads when an idle engine has work (a lease released,
        a pull finished); AsyncLLM uses it to leave its wait."""
        if self.connector is not None:
            self.connector.wakeup = wakeup

    def idle_timeout(self) -> float | None:
        """Seconds an idle engine may sleep before housekeeping is due (the next lease expiry)."""
        return self.connector.next_deadline() if self.connector is not None else None

    def housekeeping(self) -> None:
        """Free released and expired leases' blocks; cheap, and safe to call between any two steps."""
        self.scheduler.drain_connector()

    @property
    def _local_worker(self) -> Worker:
        if not isinstance(self.executor, InProcessExecutor):
            raise QuadrantError("the model lives in worker processes (--tp/--ep); this needs a one-process engine")
        return self.executor.worker

    @property
    def model(self) -> Any:
        """The model, for inspection and scoring (one-process engines only)."""
        return self._local_worker.model

    @property
    def runner(self) -> ModelRunner:
        runner = self._local_worker.runner
        assert runner is not None
        return runner

    def compile_decode(self, batch_sizes: list[int]) -> bool:
        """Compile the CPU decode graphs for these batch sizes now, on this thread (benchmarks time
        compiled steps, not the background compile); whether all are ready. False where decode steps
        are not compiled (GPU, --enforce-eager, --tp/--ep, no compiler)."""
        compiled = self._compiled
        return compiled is not None and all([compiled.compile_now(n) for n in batch_sizes])

    @property
    def _compiled(self) -> CompiledDecode | None:
        """The compiled CPU decode graphs, where this process runs the model and has them."""
        return self.runner.compiled if isinstance(self.executor, InProcessExecutor) else None

    @property
    def groups(self) -> dict[str, RequestGroup]:
        """Caller requests not yet finished, by id."""
        return self.output.groups

    def shutdown(self) -> None:
        """Stop the worker processes, if any, and the KV transfer threads (idempotent)."""
        if self.connector is not None:
            self._connector_finalizer()
        self._finalizer()

    @classmethod
    def from_model(cls, model: str, *, dtype: str = "float32", device: str = "cpu", weight_format: str = "auto",
                   cache: CacheConfig | None = None, scheduler: SchedulerConfig | None = None,
                   tensor_parallel_size: int = 1, expert_parallel_size: int = 1,
                   parallel: ParallelConfig | None = None, **options: Any) -> "LLMEngine":
        """`options`: the other EngineConfig fields (attention_backend, load_format, cuda_graphs,
        speculative), or speculation as vLLM names it: speculative_method (ngram, draft, eagle),
        num_speculative_tokens, speculative_model, speculative_draft_layers, speculative_tree_branches,
        speculative_draft_cost (a verifying token's cost in one-token steps: the policy's whole cost model).
        `parallel` (nodes, rendezvous) wins over the two sizes."""
        if parallel is not None and (tensor_parallel_size, expert_parallel_size) != (1, 1):
            raise ValueError("give the parallel sizes once: in `parallel` or as tensor/expert_parallel_size")
        spec = {field: options.pop(name) for name, field in _SPECULATIVE_OPTIONS.items() if name in options}
        if spec:
            if "speculative" in options:
                raise ValueError("give speculation once: as `speculative` or as speculative_* options")
            options["speculative"] = SpeculativeConfig(**spec)
        parallel = parallel or ParallelConfig(tensor_parallel_size, expert_parallel_size)
        return cls(EngineConfig(model, dtype, device, weight_format,  # type: ignore[arg-type]
                                cache or CacheConfig(), scheduler or SchedulerConfig(), parallel=parallel, **options))

    # -- prompts -------------------------------------------------------------------------------
    def require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise QuadrantError(f"{self.config.model}: the model has no tokenizer; pass token ids")
        return self.tokenizer

    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.require_tokenizer().encode(prompt)
        ids = list(prompt)
        if any(not isinstance(t, int) or not 0 <= t < self.model_config.vocab_size for t in ids):
            raise ValueError(f"prompt token ids must be integers in [0, {self.model_config.vocab_size})")
        return ids

    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True, **template_kwargs) -> list[int]:
        tok = self.require_tokenizer()
        if not tok.chat_template:
            raise QuadrantError(f"{self.config.model}: the model has no chat template")
        text = render_chat(tok.chat_template, messages, add_generation_prompt, tok.special_tokens, **template_kwargs)
        return tok.encode(text, add_special_tokens=False)

    # -- requests ------------------------------------------------------------------------------
    def add_request(self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None,
                    kv_transfer: dict[str, Any] | None = None) -> str:
        """`kv_transfer` (disaggregation): on a prefill engine `{"do_remote_decode": true}` keeps the prompt's
        KV for a decode engine (the finished output says where); on a decode engine, that output's
        `kv_transfer_params` pulls the prompt's KV instead of computing it. A colocated engine ignores it."""
        params = params or SamplingParams()
        prompt_ids = self.encode(prompt)
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_ids) >= self.max_model_len:
            where = "the model's context" if self.max_model_len == self.model_config.max_position_embeddings else "the KV cache"
            raise PromptTooLongError(f"the prompt has {len(prompt_ids)} tokens; {where} holds {self.max_model_len}")
        remote_kv, do_remote_decode, transfer_id = self.parse_kv_transfer(kv_transfer, prompt_ids, params)
        if (params.prompt_logprobs is not None or params.pooling) and remote_kv is not None:
            raise ValueError("prompt_logprobs and pooling need the prompt computed here, not pulled (kv_transfer_params)")
        if params.structured is not None and self.structured is None:
            raise QuadrantError(f"{self.config.model}: structured outputs need the model's tokenizer")
        request_id = request_id if request_id is not None else str(next(self._ids))
        if "#" in request_id:
            raise ValueError("request ids may not contain '#' (it marks the samples of n > 1)")
        if request_id in self.groups:
            raise ValueError(f"request id {request_id!r} is already in use")
        now = time.perf_counter()
        samples = []
        for i in range(params.n):
            req = Request(
                request_id=f"{request_id}#{i}" if params.n > 1 else request_id,
                prompt_ids=prompt_ids,
                params=params,
                eos_token_ids=self.eos_token_ids,
                group_id=request_id if params.n > 1 else None,
                arrival=now,
            )
            if params.seed is not None:
                req.seed = params.seed + i
            if params.structured is not None:
                assert self.structured is not None
                req.grammar = self.structured.compile(params.structured)  # cached: a copy of a ready matcher
            if params.prompt_logprobs is not None:
                req.prompt_logprobs = [None] * len(prompt_ids)
            if i == 0:  # siblings reuse the first sample's pulled blocks through the prefix cache
                req.remote_kv, req.do_remote_decode = remote_kv, do_remote_decode
                if transfer_id is not None and self.connector is not None:
                    req.kv_transfer_id = transfer_id
                    self.connector.expect(req)  # ValueError if the id is taken: before anything is queued
            detok = IncrementalDetokenizer(self.tokenizer, prompt_ids) if self.tokenizer else None
            samples.append(SampleState(req, detok))
            self.scheduler.add(req)
        self.groups[request_id] = RequestGroup(request_id, prompt_ids, samples, params.stop, now)
        return request_id

    def parse_kv_transfer(self, kv_transfer: dict[str, Any] | None, prompt_ids: list[int],
                          params: SamplingParams) -> tuple[RemoteKV | None, bool, str | None]:
        """(where to pull the prompt's KV from, whether to keep it for a decode engine, the transfer id it
        is pulled by while computed: overlapped); ValueError if malformed. Reads only the configuration:
        callable from any thread."""
        role = self.config.kv_transfer.role
        if not kv_transfer or role == "both":
            return None, False, None  # computed here, as a colocated engine does
        if not isinstance(kv_transfer, dict):
            raise ValueError("kv_transfer_params must be an object")
        from quadrant.disagg.protocol import RemoteKV, check_transfer_id, prompt_digest

        if role == "prefill":
            if not kv_transfer.get("do_remote_decode"):
                return None, False, None
            if params.n != 1:
                raise ValueError("kv_transfer_params: a prefill for remote decode takes n = 1")
            if kv_transfer.get("transfer_id") is None:
                return None, True, None
            if params.max_tokens != 1:  # it must end with the step that finishes its prompt, where pulls read it
                raise ValueError("kv_transfer_params: an overlapped prefill (with a transfer_id) takes max_tokens = 1")
            return None, True, check_transfer_id(kv_transfer["transfer_id"])
        if "transfer_id" not in kv_transfer:
            return None, False, None
        remote = RemoteKV.from_dict(kv_transfer)
        if remote.overlapped:  # named before the prompt was computed: it is this request's own
            given = remote.num_tokens, remote.prompt_digest
            remote = replace(remote, num_tokens=len(prompt_ids), prompt_digest=prompt_digest(prompt_ids))
            if given[0] and given[0] != remote.num_tokens or given[1] and given[1] != remote.prompt_digest:
                raise ValueError("kv_transfer_params were made for another prompt (its tokens differ from this request's)")
            return remote, False, None
        vocab = self.model_config.vocab_size
        record = remote.first_logprob
        if remote.first_token is not None and (not 0 <= remote.first_token < vocab or (record is not None and any(
                not 0 <= t < vocab for t, _ in record.top))):
            raise ValueError(f"kv_transfer_params: token ids must be in [0, {vocab})")
        if remote.num_tokens != len(prompt_ids) or remote.prompt_digest != prompt_digest(prompt_ids):
            raise ValueError("kv_transfer_params were made for another prompt (its tokens differ from this request's)")
        assert remote.block_ids is not None
        if len(remote.block_ids) != -(-len(prompt_ids) // self.kv.block_size):
            raise ValueError(f"kv_transfer_params: {len(remote.block_ids)} blocks cannot hold a prompt of "
                             f"{len(prompt_ids)} tokens in blocks of {self.kv.block_size}")
        return remote, False, None

    def expert_load(self) -> dict[str, list[int]]:
        """Router statistics: MoE layer name -> tokens routed to each of its experts so far."""
        return self.executor.expert_load()

    def abort_request(self, request_id: str) -> bool:
        """Cancel a request and free its KV blocks now; False if it is unknown or already done."""
        aborted = self.output.abort(request_id)
        if not self.groups:
            self._finish_steps(keep=0)  # an idle engine has nothing in flight (what ran is all dropped)
        return aborted

    def has_unfinished_requests(self) -> bool:
        return bool(self.groups)

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Generator[RequestOutput, None, None]:
        """Run one request to its end (alongside anything else queued), yielding its outputs.
        Leaving early (closing the generator, Ctrl-C) aborts it and frees its blocks."""
        request_id = self.add_request(prompt, params)
        done = False
        try:
            while not done and self.has_unfinished_requests():
                for out in self.step():
                    if out.request_id == request_id:
                        done = out.finished
                        yield out
        finally:
            if not done:
                self.abort_request(request_id)

    # -- the loop ------------------------------------------------------------------------------
    def _remote_news(self) -> list[RequestOutput]:
        """Disaggregation: emit the first tokens that came with pulled prompts; fail the failed pulls
        (what the last schedule(), which drains the connector, learned)."""
        arrived, failed = self.scheduler.take_remote_news()
        outputs = [o for req, error in failed
                   if (o := self.output.fail(req.group_id or req.request_id, f"KVTransferError: {error}")) is not None]
        if arrived:
            first = SchedulerOutput([ScheduledRequest(req, 0) for req, _ in arrived])
            outputs += self._advance_grammars(first, {req.request_id: req.output_ids[:1] for req, _ in arrived})
            outputs += self.output.process(first, {req.request_id: ([req.output_ids[0]], [lp] if lp else [])
                                                   for req, lp in arrived})
        return outputs

    def _propose(self) -> None:
        """Speculative decoding: drafts for the decoding requests that the policy lets speculate."""
        assert self.proposer is not None
        running = self.scheduler.running
        live = {r.request_id for r in running}
        self.proposer.retain(live)
        self.spec_policy.retain(live)
        decoding = [r for r in running if r.num_tokens - r.num_computed_tokens == 1]
        if len(decoding) > self.config.speculative.max_batch_size:
            self.spec_stats.num_large_batch_steps += 1
            return
        compiled = self._compiled
        if compiled is not None and len(decoding) == 1 and compiled.wants_one_row_step():
            return  # a plain step: the one-row time every cost is counted in, measured rather than inferred
        plan = self.spec_policy.plan(decoding)
        if self.proposer.free:
            self._shadow_drafts([r for r in decoding if r.request_id not in plan])
        if not plan:
            return
        by_id = {r.request_id: r for r in decoding}
        asks = [(by_id[rid], k) for rid, k in plan.items()]
        drafts = self.proposer.propose(asks)
        step_seconds = self._one_token_step_seconds()
        timed = self.proposer.last_forwards
        if timed is not None and step_seconds is not None and self.config.speculative.draft_cost is None:
            self.spec_policy.observe_drafting(*timed, step_seconds)  # a set draft_cost is the whole cost model
        for rid, draft in drafts.items():
            req = by_id[rid]
            tokens, probs, parents = draft.tokens, draft.probs, draft.parents
            if req.grammar is not None:  # drafts the grammar refuses are never verified
                if parents is not None:  # its masks follow one line of tokens: a tree keeps its best line
                    tokens, parents = [tokens[i] for i in best_line(parents)], None
                keep = StructuredOutputs.valid_prefix(req.grammar, tokens)
                tokens, probs = tokens[:keep], (probs[:keep] if probs is not None and keep else None)
            req.draft_token_ids, req.draft_probs, req.draft_parents = tokens, probs, parents

    def _shadow_drafts(self, requests: list[Request]) -> None:
        """Requests that do not speculate this step: a free proposer's first draft token, checked against
        the token the step samples (_count_verifications), so the policy learns acceptance from steps
        that verify nothing: a copy-heavy request starts drafting once its guesses land, without probes."""
        assert self.proposer is not None
        guesses = self.proposer.propose([(r, 1) for r in requests])
        for r in requests:
            guess = guesses.get(r.request_id)
            r.shadow_draft = guess.tokens[0] if guess is not None and guess.tokens else None

    def _one_token_step_seconds(self) -> float | None:
        """A one-token decode step's time, where it is measured: the compiled CPU graph's (None elsewhere,
        so the policy prices drafts by their verification alone)."""
        return None if self._compiled is None else self._compiled.one_row_seconds()

    def _grammar_masks(self, out: SchedulerOutput, masks: dict[str, torch.Tensor]) -> None:
        """Structured outputs: the allowed-token bitmasks of the constrained rows that sample this step."""
        if self.structured is None:
            return
        for s in out.scheduled:
            req = s.request
            if req.grammar is None or req.num_computed_tokens + s.num_new_tokens < req.num_tokens + len(s.draft_token_ids):
                continue
            try:
                masks[req.request_id] = self.structured.masks(req.grammar, s.draft_token_ids)
            except GrammarError:  # fails closed: no token allowed, so the row's sampling fails the request
                masks[req.request_id] = torch.zeros(len(s.draft_token_ids) + 1, self.structured.mask_words,
                                                    dtype=torch.int32)

    def _advance_grammars(self, out: SchedulerOutput, new_tokens: dict[str, list[int]]) -> list[RequestOutput]:
        """Feed each constrained request's accepted tokens to its grammar; a refusal fails the request."""
        failed = []
        for s in out.scheduled:
            req = s.request
            tokens = new_tokens.get(req.request_id)
            if req.grammar is None or not tokens or req.is_finished:
                continue
            error = StructuredOutputs.accept(req.grammar, tokens)
            if error is not None and (o := self.output.fail(req.group_id or req.request_id, error)) is not None:
                failed.append(o)
        return failed

    def _keep_prompt_logprobs(self, out: SchedulerOutput, scored: PromptLogprobs) -> None:
        """Prompt logprobs by position (a recomputed chunk after a preemption overwrites its own)."""
        by_id = {s.request.request_id: s.request for s in out.scheduled}
        for rid, (first, records) in scored.items():
            req = by_id.get(rid)
            if req is not None and req.prompt_logprobs is not None:
                req.prompt_logprobs[first : first + len(records)] = records

    def _keep_pooled(self, out: SchedulerOutput, pooled: Pooled) -> None:
        """Embeddings: add each chunk's pooled hidden state; a prompt recomputed after a preemption starts over."""
        by_id = {s.request.request_id: s.request for s in out.scheduled}
        for rid, (first, count, value) in pooled.items():
            req = by_id.get(rid)
            if req is None:
                continue
            if first == 0 or req.pooled is None:
                req.pooled, req.num_pooled = None, 0
            if req.params.pooling == "mean":
                req.pooled = value if req.pooled is None else req.pooled + value
            else:
                req.pooled = value
            req.num_pooled = first + count

    def _count_verifications(self, out: SchedulerOutput, sampled: dict[str, list[int]]) -> None:
        stats = self.spec_stats
        for s in out.scheduled:
            tokens = sampled.get(s.request.request_id)
            guess, s.request.shadow_draft = s.request.shadow_draft, None
            if guess is not None and tokens and not s.draft_token_ids:
                self.spec_policy.record_shadow(s.request.request_id, guess == tokens[0])
            if not s.draft_token_ids or not tokens:
                continue
            drafted, accepted = len(s.draft_token_ids), len(tokens) - 1
            stats.num_verifications += 1
            stats.num_tree_verifications += s.draft_parents is not None
            stats.num_draft_tokens += drafted
            stats.num_accepted_tokens += accepted
            # A tree's acceptance, for the policy, is along its deepest line: a rejection is a path cut short.
            longest = max(depths(s.draft_parents)) if s.draft_parents is not None else drafted
            stats.num_backoffs += self.spec_policy.record(s.request.request_id, longest, accepted)

    def step(self) -> list[RequestOutput]:
        """Schedule and launch a step; return the outputs of the steps finished since the last call.
        In order, without overlap that is the step just launched; with it, the one before (the new
        one runs while the caller streams those out)."""
        overlap = self.overlap and not self._needs_every_token()
        outputs = [] if overlap else self._finish_steps(keep=0)
        if self.proposer is not None:
            self._propose()
        out = self.scheduler.schedule()
        if self.connector is not None:
            outputs = self._remote_news() + outputs
            if any(s.request.is_finished for s in out.scheduled):  # a first token that came with its KV ended it
                out.scheduled = [s for s in out.scheduled if not s.request.is_finished]
                out.num_batched_tokens = sum(s.num_new_tokens for s in out.scheduled)
            if out.is_empty and self.scheduler.loading and not self._in_flight:
                self.connector.wait(0.01)  # nothing to run until a pull ends
        if not out.is_empty:
            self._launch(out, overlap)
        outputs += self._finish_steps(keep=1 if overlap and not out.is_empty else 0)
        if not self.groups:
            self._finish_steps(keep=0)  # idle engines have nothing in flight (it ran finished requests only)
        interval = self.config.parallel.eplb_interval
        if interval and not out.is_empty and self.num_steps % interval == 0:
            self.expert_placement = self.executor.rebalance_experts()  # between steps: nothing waits on it
        return outputs

    def _needs_every_token(self) -> bool:
        """A constrained request's next grammar mask depends on its last token: no step may be in flight."""
        return self.structured is not None and any(
            r.grammar is not None for r in itertools.chain(self.scheduler.running, self.scheduler.waiting))

    def _launch(self, out: SchedulerOutput, overlap: bool) -> None:
        step = self.steps.encode(out)
        self._grammar_masks(out, step.token_masks)
        if overlap:
            self.num_overlapped_steps += bool(self._in_flight)  # launched while another step runs
            future = self.executor.submit(step)
        elif self.connector is not None:  # (never overlapped) prompts pulled while computed follow the step
            self.connector.start_step([(s.request, s.num_new_tokens) for s in out.scheduled])
            try:
                future = completed(self.executor.execute(step))
            finally:
                self.connector.end_step()
        else:
            future = completed(self.executor.execute(step))
        self.scheduler.commit(out)
        self._in_flight.append((out, future))
        self.num_steps += 1
        self.num_computed_tokens += out.num_batched_tokens

    def _finish_steps(self, keep: int) -> list[RequestOutput]:
        """Process the results of the oldest steps in flight until `keep` remain."""
        outputs = []
        while len(self._in_flight) > keep:
            out, future = self._in_flight.popleft()
            try:
                result = future.result()
            except BaseException:
                self._abandon_in_flight()
                raise
            outputs += self._process(out, result)
        return outputs

    def _abandon_in_flight(self) -> None:
        """A step failed: the ones queued behind it ran on state it never finished; wait them out and drop them
        (the caller fails the requests in flight). The blocks they were writing were already put in the
        prefix cache: it is emptied."""
        self.kv.reset_prefix_cache()
        while self._in_flight:
            _, future = self._in_flight.popleft()
            try:
                future.result()
            except BaseException:  # noqa: BLE001 - the first failure is the one raised
                pass

    def _process(self, out: SchedulerOutput, result: StepOutput) -> list[RequestOutput]:
        # A request that finished or was aborted while its step ran takes nothing from it.
        finished = {s.request.request_id for s in out.scheduled if s.request.is_finished}
        sampled = {rid: v for rid, v in result.sampled.items() if rid not in finished}
        new_tokens = {rid: tokens for rid, (tokens, _) in sampled.items()}
        self.scheduler.update(out, new_tokens)
        if self.proposer is not None:
            self._count_verifications(out, new_tokens)
            if result.hidden:
                self.proposer.observe(result.hidden)
        self._keep_prompt_logprobs(out, result.prompt_logprobs)
        self._keep_pooled(out, result.pooled)
        failed = self._advance_grammars(out, new_tokens)
        return failed + self.output.process(out, sampled)


class LLM:
    """Offline batch generation: `LLM(model).generate(prompts, params)`."""

    def __init__(self, model: str = store.DEFAULT_MODEL, **engine_kwargs) -> None:
        self.engine = LLMEngine.from_model(model, **engine_kwargs)

    @property
    def tokenizer(self) -> Tokenizer | None:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        return self._run([self.engine.encode(p) for p in prompts], sampling_params, use_tqdm)  # type: ignore[arg-type]

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        prompts = [self.engine.chat_prompt(c, add_generation_prompt) for c in conversations]  # type: ignore[arg-type]
        return self._run(prompts, sampling_params, use_tqdm)

    def _run(self, prompts: list[list[int]], sampling_params, use_tqdm: bool) -> list[RequestOutput]:
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError("sampling_params must be one SamplingParams or one per prompt")
        ids = []
        try:
            for p, sp in zip(prompts, params_list):
                ids.append(self.engine.add_request(p, sp))
            results: dict[str, RequestOutput] = {}
            with tqdm(total=len(ids), desc="generating", unit="req", disable=not use_tqdm) as bar:
                while self.engine.has_unfinished_requests():
                    for o in self.engine.step():
                        if o.finished:
                            results[o.request_id] = o
                            bar.update(1)
        except BaseException:
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        return [results[i] for i in ids]
