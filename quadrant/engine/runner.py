"""ModelRunner: turns a StepInput into one flattened forward pass and sampled tokens.

It owns the KV tensors and binds them, with the attention backend, into every Attention
layer; keeps the worker's mirror of the live requests (engine/step.py); builds input ids,
positions, slot mapping, block tables and AttentionMetadata; runs the model (decode-only steps
from CUDA graphs when it has them); computes logits only at the rows that sample, and (on the
driver worker) calls the sampler.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from quadrant.config import CacheConfig, ModelConfig
from quadrant.engine.cpu_compiled import CompiledDecode
from quadrant.engine.cuda_graphs import DecodeGraphs
from quadrant.engine.kv_cache import allocate_kv_tensors, move_kv_slots
from quadrant.engine.spec.tree import ancestor_masks, depths
from quadrant.engine.spec.verify import verify, verify_tree
from quadrant.engine.step import (Sampled, ScheduledRow, StepInput, StepOutput, WorkerRequest,
                                  WorkerRequests)
from quadrant.engine.structured import allowed_tokens
from quadrant.layers.attention import Attention, AttentionMetadata
from quadrant.layers.attn_backends import TORCH_BACKEND, TRITON_BACKEND
from quadrant.layers.sampler import TokenLogprob, logprob_records, sample


Batch = list[tuple[WorkerRequest, ScheduledRow]]  # one step's requests and their rows, in batch order

# Verification through the CUDA-graph decode buffers reads a row's context once per token (1 + k times, where
# the varlen kernel reads it once): past this many tokens of context the eager step is likely the faster.
# A first guess, not measured yet (benchmarks/gpu_decode.py --only verify times 512-token contexts).
GRAPH_VERIFY_MAX_CONTEXT = 2048


class ModelRunner:
    def __init__(self, model: nn.Module, model_config: ModelConfig, cache_config: CacheConfig,
                 num_blocks: int, dtype: torch.dtype, device: torch.device | str = "cpu",
                 backend: str = "torch", graph_batch_sizes: list[int] | None = None,
                 max_model_len: int | None = None, samples: bool = True, compile_decode: int = 0,
                 compile_at_start: bool = False, keep_hidden: bool = False, graph_trees: bool = False) -> None:
        """`compile_decode`: on CPU, the largest batch size to run decode steps through compiled graphs
        (engine/cpu_compiled.py); 0 keeps every step eager. `compile_at_start`: all those graphs now,
        before the first step, instead of in the background. `keep_hidden`: every step returns its
        rows' final hidden states (an EAGLE head drafts from them), CUDA graph replays included.
        `graph_trees`: the decode graphs take token-tree masks (speculative
        token trees verify through them)."""
        self.keep_hidden = keep_hidden
        self.on_layer_stored: Callable[[], None] | None = None  # see AttentionMetadata.on_layer_stored
        self._hidden: torch.Tensor | None = None  # the last forward's final hidden states [T, D], batch order
        self.model: Any = model  # a models/ causal LM: forward + compute_logits
        self.block_size = cache_config.block_size
        self.device = torch.device(device)
        self.num_kv_heads = model_config.num_key_value_heads
        self.max_model_len = max_model_len or model_config.max_position_embeddings
        self.generator = torch.Generator(device=self.device)  # for unseeded requests
        self.generator.seed()
        self.requests = WorkerRequests(self.device)
        self.samples = samples  # False on workers other than rank 0: they run the model, rank 0 samples
        # Compiled decode pads its batches with rows that write into one scratch block past the pool's.
        scratch = 1 if compile_decode else 0
        self.kv_caches = allocate_kv_tensors(model_config, cache_config, num_blocks + scratch, dtype, device)
        self.backend = TRITON_BACKEND if backend == "triton" else TORCH_BACKEND
        layers = [m for m in model.modules() if isinstance(m, Attention)]
        assert len(layers) == len(self.kv_caches)
        for layer, kv in zip(layers, self.kv_caches):
            layer.kv_cache = kv
            layer.backend = self.backend
        self.graphs: DecodeGraphs | None = None
        self.compiled: CompiledDecode | None = None
        if compile_decode:
            self.compiled = CompiledDecode(self.model, self.block_size, num_blocks, compile_decode)
            self.compiled.compile_all() if compile_at_start else self.compiled.start()
        if graph_batch_sizes:
            assert backend == "triton", "decode graphs need the triton backend (no host-side metadata)"
            max_blocks = -(-self.max_model_len // self.block_size)
            self.graphs = DecodeGraphs(self.model, graph_batch_sizes, self.block_size, max_blocks, self.num_kv_heads,
                                       self.device, trees=graph_trees)

    def prepare(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        input_ids, positions, slots, starts, seq_lens = self._flatten(batch)
        trees = any(row.draft_parents is not None for _, row in batch)
        if trees:
            tree_spans, tree_bits = self._tree_layout(batch, positions, starts, seq_lens)
        width = max(len(req.block_table) for req, _ in batch)
        tables = [req.block_table + [0] * (width - len(req.block_table)) for req, _ in batch]
        dev = self.device
        slot_mapping = torch.tensor(slots, dtype=torch.int64, device=dev)
        meta = AttentionMetadata(
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            max_query_len=max(row.num_new_tokens for _, row in batch),
            max_seq_len=max(seq_lens),
            query_start_loc_cpu=starts,
            seq_lens_cpu=seq_lens,
            slot_mapping=slot_mapping,
            slot_block=slot_mapping // self.block_size,
            slot_offset=slot_mapping % self.block_size,
            block_tables=torch.tensor(tables, dtype=torch.int32, device=dev),
        )
        if trees:
            meta.tree_start_cpu = tree_spans
            meta.tree_start = torch.tensor(meta.tree_start_cpu, dtype=torch.int32, device=dev)
            meta.tree_mask = torch.tensor(tree_bits, dtype=torch.int64, device=dev)
        if self.backend is TRITON_BACKEND and meta.max_query_len == 1:
            from quadrant.kernels.paged_decode import num_sms, plan_splits

            meta.decode_num_splits, chunk = plan_splits(seq_lens, self.num_kv_heads, num_sms(dev))
            meta.decode_chunk = torch.tensor([chunk], dtype=torch.int32, device=dev)
        ids = torch.tensor(input_ids, dtype=torch.long, device=dev)  # [T]
        positions_t = torch.tensor(positions, dtype=torch.long, device=dev)  # [T]
        return ids, positions_t, meta

    def _flatten(self, batch: Batch) -> tuple[list[int], list[int], list[int], list[int], list[int]]:
        """Host lists: input ids, positions and slots [T]; query starts [B + 1]; context lengths [B]."""
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        starts, seq_lens = [0], []
        bs = self.block_size
        for req, row in batch:
            start = row.num_computed_tokens
            end = start + row.num_new_tokens
            drafts = row.draft_token_ids  # speculative: they follow the request's last token
            input_ids.extend(req.token_slice(start, end - len(drafts)))
            input_ids.extend(drafts)
            table = req.block_table
            for pos in range(start, end):
                positions.append(pos)
                slots.append(table[pos // bs] * bs + pos % bs)
            starts.append(starts[-1] + row.num_new_tokens)
            seq_lens.append(end)
        return input_ids, positions, slots, starts, seq_lens

    @staticmethod
    def _tree_layout(batch: Batch, positions: list[int], starts: list[int],
                     seq_lens: list[int]) -> tuple[list[int], list[int]]:
        """Token trees: each node's position becomes its depth past its root (the row's last token), not
        its index; returns AttentionMetadata.tree_start [B] and tree_mask [T]: tree rows attend within
        their span by ancestry, every other token's bits are all set and its row's span starts past its
        context. A row holds its root and every node (verification), or only the newest nodes (an EAGLE
        head expanding one depth of its tree: the others' K/V are already in its cache)."""
        span_starts = list(seq_lens)
        bits = [-1] * starts[-1]
        for b, (_, row) in enumerate(batch):
            if row.draft_parents is not None:
                n = len(row.draft_parents)
                root = seq_lens[b] - n - 1  # the root's index, and so its position
                held = min(row.num_new_tokens, n + 1)
                line = [root] + [root + d for d in depths(row.draft_parents)]
                positions[starts[b + 1] - held : starts[b + 1]] = line[n + 1 - held :]
                span_starts[b] = root
                bits[starts[b + 1] - held : starts[b + 1]] = ancestor_masks(row.draft_parents)[n + 1 - held :]
        return span_starts, bits

    @torch.inference_mode()
    def execute(self, step: StepInput) -> StepOutput:
        """Run one step; the output has (sampled token, logprob record) for the rows that sample."""
        if step.kv_moves:
            move_kv_slots(self.kv_caches, step.kv_moves, self.block_size)
        batch = self.requests.apply(step)
        if not batch:
            return StepOutput()
        # A row samples when this step reaches its request's last token (and its drafts, if any).
        rows = [i for i, (req, row) in enumerate(batch)
                if row.num_computed_tokens + row.num_new_tokens == req.num_tokens + len(row.draft_token_ids)]
        # Rows whose prompt is scored (prompt_logprobs) or embedded (pooling) read every token of their chunk.
        whole = [i for i, (req, row) in enumerate(batch) if (req.params.prompt_logprobs is not None or
                 req.params.pooling) and row.num_computed_tokens < len(req.prompt_ids)]
        prompt_out = StepOutput()
        logits = None if whole else self._graph_logits(batch)
        if logits is None:
            # Logits at each sampling row's last token and at each of its drafts.
            sampling = set(rows)
            tails = [1 + len(row.draft_token_ids) if i in sampling else 0 for i, (_, row) in enumerate(batch)]
            logits = self.forward_logits(batch, tails, whole, prompt_out)
        elif len(rows) < len(batch):
            logits = logits[torch.tensor(rows, device=self.device)]
        hidden, self._hidden = self._hidden, None  # what this step's forward kept (keep_hidden)
        if not self.samples:
            return StepOutput()
        if hidden is not None:
            prompt_out.hidden = self._rows_hidden(batch, hidden)
        if logits is None or not rows:
            return prompt_out
        paths: dict[str, list[int]] = {}
        prompt_out.sampled = self._sample(logits, [batch[i] for i in rows], step.token_masks, paths)
        self.requests.record(prompt_out.sampled)
        for rid, used in paths.items():  # a verified tree's states along its accepted path, like a chain's
            if rid not in prompt_out.hidden:
                continue
            first, states = prompt_out.hidden[rid]
            prompt_out.hidden[rid] = (first, states[torch.tensor(used or [0], device=states.device)])
        return prompt_out

    def forward_logits(self, batch: Batch, tails: list[int], whole: list[int] = (),  # type: ignore[assignment]
                       prompt_out: StepOutput | None = None) -> torch.Tensor | None:
        """Run the batch through the model; the logits [sum(tails), V] fp32 at the last tails[i] tokens
        of each row, in batch order (None, and no LM head, when no row asks for any). The rows in
        `whole` also put their chunk's prompt-token logprobs and pooled hidden states into `prompt_out`."""
        ids, pos, meta = self.prepare(batch)
        meta.on_layer_stored = self.on_layer_stored
        hidden = self.model(ids, pos, meta)  # [T, D]
        if self.keep_hidden:
            self._hidden = hidden
        ends = meta.query_start_loc_cpu[1:]
        if whole and prompt_out is not None and self.samples:
            for i in whole:
                req, row = batch[i]
                start = int(ends[i]) - row.num_new_tokens
                chunk = hidden[start : int(ends[i])]
                if req.params.prompt_logprobs is not None:
                    prompt_out.prompt_logprobs[req.request_id] = self._score_prompt(chunk, req, row)
                if req.params.pooling:
                    prompt_out.pooled[req.request_id] = self._pool(chunk, req, row)
        picks = [t for end, n in zip(ends, tails) for t in range(end - n, end)]
        if not picks:
            return None
        return self.model.compute_logits(hidden[torch.tensor(picks, device=self.device)])

    def _score_prompt(self, hidden: torch.Tensor, req: WorkerRequest, row: ScheduledRow,
                      slice_rows: int = 256) -> tuple[int, list[TokenLogprob]]:
        """Records for the prompt tokens this chunk predicts: the one after each of its positions,
        up to the prompt's end; the LM head runs on slices so a long chunk stays small in memory."""
        first = row.num_computed_tokens + 1  # position p's logits score token p + 1
        last = min(row.num_computed_tokens + row.num_new_tokens, len(req.prompt_ids) - 1)  # inclusive
        records: list[TokenLogprob] = []
        want = req.params.prompt_logprobs or 0
        for at in range(first, last + 1, slice_rows):
            end = min(at + slice_rows, last + 1)
            logits = self.model.compute_logits(hidden[at - 1 - row.num_computed_tokens : end - 1 - row.num_computed_tokens])
            records += logprob_records(logits.float(), req.prompt_ids[at:end], [want] * (end - at))
        return first, records

    @staticmethod
    def _pool(hidden: torch.Tensor, req: WorkerRequest, row: ScheduledRow) -> tuple[int, int, torch.Tensor]:
        """The chunk's share of the prompt's pooled hidden state (prompt positions only)."""
        count = min(row.num_new_tokens, len(req.prompt_ids) - row.num_computed_tokens)
        rows = hidden[:count].float()
        pooled = rows.sum(0) if req.params.pooling == "mean" else rows[-1]
        return row.num_computed_tokens, count, pooled.cpu()

    def _sample(self, logits: torch.Tensor, rows: Batch, token_masks: dict[str, torch.Tensor],
                paths: dict[str, list[int]] | None = None) -> Sampled:
        """Rows that verify drafts take their tokens from verification, the others one sampled token
        each; logits hold one row per plain request and k + 1 per verifying one, in batch order.
        Structured-output rows see only the tokens their grammar allows. `paths` gets each verified
        token tree's row indices (0: its root) of the accepted path, when hidden states are kept."""
        sampled: Sampled = {}
        offsets, at = [], 0
        for _, row in rows:
            offsets.append(at)
            at += 1 + len(row.draft_token_ids)
        plain = [i for i, (_, row) in enumerate(rows) if not row.draft_token_ids]
        if plain:
            requests = [rows[i][0] for i in plain]
            plain_logits = logits if len(plain) == len(rows) else \
                logits[torch.tensor([offsets[i] for i in plain], device=self.device)]
            allowed = None
            if any(req.request_id in token_masks for req in requests):
                masks = torch.stack([token_masks[req.request_id][0] if req.request_id in token_masks
                                     else torch.full_like(next(iter(token_masks.values()))[0], -1)
                                     for req in requests])
                allowed = allowed_tokens(masks.to(self.device), plain_logits.shape[-1])
            tokens, records = sample(plain_logits, requests, self.generator, allowed)
            for req, t, lp in zip(requests, tokens, records):
                sampled[req.request_id] = ([t] if t is not None else [], [lp] if lp is not None else [])
        for i, (req, row) in enumerate(rows):
            if not row.draft_token_ids:
                continue
            k = len(row.draft_token_ids)
            span = logits[offsets[i] : offsets[i] + k + 1]
            raw = span
            if req.request_id in token_masks:
                span = span.masked_fill(~allowed_tokens(token_masks[req.request_id].to(self.device), span.shape[-1]),
                                        float("-inf"))
            if row.draft_parents is None:
                accepted = verify(span, row.draft_token_ids, row.draft_probs, req, self.generator)
                used = list(range(len(accepted)))
            else:
                accepted, used = verify_tree(span, row.draft_token_ids, row.draft_parents, req, self.generator)
                if paths is not None and self.keep_hidden:
                    paths[req.request_id] = used
            want = req.params.logprobs
            kept_records = logprob_records(raw[torch.tensor(used, device=raw.device)], accepted,
                                           [want] * len(accepted)) if want is not None and accepted else []
            sampled[req.request_id] = (accepted, kept_records)
        return sampled

    def _graph_logits(self, batch: Batch) -> torch.Tensor | None:
        """Logits of every row of a decode-only step replayed from a captured graph (or a compiled
        one on CPU); None if none fits. A step that verifies drafts is decode-only too: each of a row's
        1 + k tokens runs as a decode row of its own, over the same block table with a context one
        longer than the token before it. Every layer writes all the step's K/V before attending, so a
        draft sees the tokens ahead of it, and the graph needs no shape of its own (a token tree's
        nodes also carry their ancestor masks: the compiled CPU graphs take them, and so do CUDA graphs
        captured with `trees`)."""
        if any(row.draft_token_ids for _, row in batch):
            trees = any(row.draft_parents is not None for _, row in batch)
            if self.compiled is None and (self.graphs is None or (trees and not self.graphs.trees)
                                          or max(req.num_tokens for req, _ in batch) > GRAPH_VERIFY_MAX_CONTEXT):
                return None
            rows = self._verification_rows(batch)
            if rows is None:
                return None
            if self.compiled is not None:
                return self._compiled_logits(*rows)
            assert self.graphs is not None
            input_ids, positions, slots, lengths, tables, tree = rows
            if not self.graphs.fits(len(input_ids), max(len(t) for t in tables)):
                return None
            return self._replayed_logits(self.graphs.run(input_ids, positions, slots, lengths, tables, tree))
        if any(row.num_new_tokens != 1 for _, row in batch):
            return None  # (token trees included: the varlen kernel's tree masks)
        if self.compiled is not None:
            input_ids, positions, slots, _, seq_lens = self._flatten(batch)
            return self._compiled_logits(input_ids, positions, slots, seq_lens, [req.block_table for req, _ in batch])
        if self.graphs is None:
            return None
        if not self.graphs.fits(len(batch), max(len(req.block_table) for req, _ in batch)):
            return None
        input_ids, positions, slots, _, seq_lens = self._flatten(batch)
        tables = [req.block_table for req, _ in batch]
        return self._replayed_logits(self.graphs.run(input_ids, positions, slots, seq_lens, tables))

    def _replayed_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head over a CUDA graph's output states; kept (copied: the next replay overwrites them)
        where an EAGLE head reads them."""
        if self.keep_hidden:
            self._hidden = hidden.clone()
        return self.model.compute_logits(hidden)

    def _verification_rows(self, batch: Batch) -> tuple[list[int], list[int], list[int], list[int], list[list[int]],
                                                        tuple[list[int], list[int]] | None] | None:
        """A step whose rows are all decodes, some with drafts, as one decode row per token (each row's last
        token and its drafts, in batch order): input ids, positions, slots, context lengths, block tables
        and, with token trees, each row's span start and ancestor bits; None if a row is a prefill chunk."""
        if any(row.num_new_tokens != 1 + len(row.draft_token_ids)
               or row.num_computed_tokens + 1 != req.num_tokens for req, row in batch):
            return None
        input_ids, positions, slots, starts, seq_lens = self._flatten(batch)
        tables = [req.block_table for req, row in batch for _ in range(row.num_new_tokens)]
        # Each token attends to the sequence up to its own index (its slot); a tree node also only to its
        # ancestors (the mask), and runs at its depth's position.
        lengths = [end - row.num_new_tokens + 1 + j for end, (_, row) in zip(seq_lens, batch)
                   for j in range(row.num_new_tokens)]
        tree = None
        if any(row.draft_parents is not None for _, row in batch):
            spans, bits = self._tree_layout(batch, positions, starts, seq_lens)
            tree = ([s for s, (_, row) in zip(spans, batch) for _ in range(row.num_new_tokens)], bits)
        return input_ids, positions, slots, lengths, tables, tree

    def _compiled_logits(self, input_ids: list[int], positions: list[int], slots: list[int], seq_lens: list[int],
                         tables: list[list[int]], tree: tuple[list[int], list[int]] | None = None) -> torch.Tensor | None:
        """Logits of decode rows run through a compiled CPU graph, timed for the speculation policy;
        None while their batch size has no graph."""
        assert self.compiled is not None
        start = time.perf_counter()
        hidden = self.compiled.run(input_ids, positions, slots, seq_lens, tables, tree)
        if hidden is None:
            return None
        logits = self.model.compute_logits(hidden)
        self.compiled.record(len(input_ids), time.perf_counter() - start)
        if self.keep_hidden:
            self._hidden = hidden
        return logits

    @staticmethod
    def _rows_hidden(batch: Batch, hidden: torch.Tensor) -> dict[str, tuple[int, torch.Tensor]]:
        """Each row's slice of the step's hidden states [T, D] (rows in batch order), with its first position."""
        out, at = {}, 0
        for req, row in batch:
            out[req.request_id] = (row.num_computed_tokens, hidden[at : at + row.num_new_tokens])
            at += row.num_new_tokens
        return out

    def capture_graphs(self) -> None:
        if self.graphs is not None:
            self.graphs.capture()
