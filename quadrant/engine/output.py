"""Output processing: what each step's sampled tokens mean to the caller.

For every request that sampled, the OutputProcessor appends the token's logprob record, turns the
new tokens into text through the request's incremental detokenizer, matches stop strings across
token boundaries (holding text back until it can no longer start one, so a stop string is never
emitted), and decides whether and why the request finishes: this is the one place a finish reason
is decided (an abort is the caller's). The scheduler only learns the outcome, to free the blocks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from quadrant.engine.request import CompletionOutput, FinishReason, Request, RequestOutput, TokenLogprob
from quadrant.engine.scheduler import SchedulerOutput
from quadrant.engine.step import Sampled
from quadrant.tokenizer import IncrementalDetokenizer


@dataclass
class SampleState:
    """Output-side state of one of a request's n samples."""

    request: Request
    detok: IncrementalDetokenizer | None
    text: str = ""  # produced so far (stop strings cut off)
    num_emitted_chars: int = 0
    num_emitted_tokens: int = 0


@dataclass
class RequestGroup:
    """One caller request: its n samples and their timing."""

    request_id: str
    prompt_ids: list[int]
    samples: list[SampleState]
    stop: list[str]
    arrival: float
    first_token: float | None = None
    num_cached_tokens: int = 0


Finish = Callable[[Request, FinishReason], None]  # Scheduler.finish: frees the request's blocks


def _embedding(req: Request) -> list[float] | None:
    """The prompt's pooled hidden state, L2-normalised, once every prompt token is in it."""
    if req.pooled is None or req.num_pooled < req.num_prompt_tokens:
        return None
    pooled = req.pooled / req.num_prompt_tokens if req.params.pooling == "mean" else req.pooled
    return (pooled / pooled.norm().clamp_min(1e-12)).tolist()


class OutputProcessor:
    def __init__(self, max_model_len: int, finish: Finish) -> None:
        self.max_model_len = max_model_len
        self.finish = finish
        self.groups: dict[str, RequestGroup] = {}

    def process(self, out: SchedulerOutput, sampled: Sampled) -> list[RequestOutput]:
        """The step's outputs, one per caller request that got a token (sampling failures included)."""
        touched: dict[str, RequestGroup] = {}
        failed: set[str] = set()
        for s in out.scheduled:
            req = s.request
            group_id = req.group_id or req.request_id
            if req.request_id not in sampled or group_id not in self.groups:
                continue
            tokens, records = sampled[req.request_id]
            if not tokens:
                failed.add(group_id)
            else:
                req.logprobs.extend(records)
            touched[group_id] = self.groups[group_id]
        now = time.perf_counter()
        outputs = []
        for group_id, group in touched.items():
            if group.first_token is None:
                group.first_token = now
                group.num_cached_tokens = group.samples[0].request.num_cached_prompt_tokens
            try:
                if group_id in failed:
                    raise RuntimeError("sampling failed (non-finite logits?)")
                outputs.append(self._emit(group, now))
            except Exception as e:  # one request's failure ends that request only
                self.abort(group_id)
                outputs.append(RequestOutput(group_id, group.prompt_ids, [], True, error=f"{type(e).__name__}: {e}"))
        return outputs

    def abort(self, request_id: str) -> bool:
        group = self.groups.pop(request_id, None)
        if group is None:
            return False
        for s in group.samples:
            self.finish(s.request, FinishReason.ABORT)
        return True

    def _emit(self, group: RequestGroup, now: float) -> RequestOutput:
        completions = [self._advance(index, sample, group.stop) for index, sample in enumerate(group.samples)]
        done = all(s.request.is_finished for s in group.samples)
        if done:
            del self.groups[group.request_id]
        metrics = {"arrival": group.arrival, "first_token": group.first_token or now}
        if done:
            metrics["finished"] = now
        first = group.samples[0].request
        return RequestOutput(group.request_id, group.prompt_ids, completions, done, group.num_cached_tokens, metrics,
                             kv_transfer_params=first.kv_transfer_params, prompt_logprobs=first.prompt_logprobs,
                             embedding=_embedding(first))

    def fail(self, request_id: str, error: str) -> RequestOutput | None:
        """End a caller request with an error (its other samples too); None if it is already gone."""
        group = self.groups.get(request_id)
        if group is None:
            return None
        self.abort(request_id)
        return RequestOutput(request_id, group.prompt_ids, [], True, error=error)

    def _advance(self, index: int, sample: SampleState, stop: list[str]) -> CompletionOutput:
        req = sample.request
        new_ids = req.output_ids[sample.num_emitted_tokens :]
        if new_ids and not req.is_finished:
            self._decide(sample, new_ids, stop)
            new_ids = req.output_ids[sample.num_emitted_tokens :]  # a finish may have cut accepted drafts off
        hold = 0 if req.is_finished or not stop else max(len(s) for s in stop) - 1
        end = max(sample.num_emitted_chars, len(sample.text) - hold)
        text_delta = sample.text[sample.num_emitted_chars : end]
        sample.num_emitted_chars = end
        sample.num_emitted_tokens = len(req.output_ids)
        return CompletionOutput(
            index=index,
            text=sample.text[:end],
            token_ids=list(req.output_ids),
            finish_reason=req.finish_reason.value if req.finish_reason else None,
            stop_reason=req.stop_reason,
            logprobs=list(req.logprobs) if req.params.logprobs is not None else None,
            text_delta=text_delta,
            token_ids_delta=new_ids,
            logprobs_delta=req.logprobs[len(req.logprobs) - len(new_ids):] if req.params.logprobs is not None else [],
        )

    def _decide(self, sample: SampleState, new_ids: list[int], stop: list[str]) -> None:
        """Text for the new tokens, one at a time, then the finish reason: a stop token, else a stop
        string, else length. Token by token, so several tokens of one step (accepted speculative
        drafts) end a request exactly where one-token steps would; the tokens after that are dropped."""
        req, p = sample.request, sample.request.params
        before = len(req.output_ids) - len(new_ids)
        if p.max_tokens == 0:  # the prompt was only scored: the token sampled after it is dropped
            del req.output_ids[before:]
            del req.logprobs[before:]
            self.finish(req, FinishReason.LENGTH)
            return
        for n, token in enumerate(new_ids, start=1):
            reason: FinishReason | None = None
            text_ids = [token]
            if token in p.stop_token_ids or (not p.ignore_eos and token in req.eos_token_ids):
                reason, req.stop_reason = FinishReason.STOP, token
                text_ids = []  # the stop token itself adds no text
            elif before + n >= p.max_tokens or req.num_prompt_tokens + before + n >= self.max_model_len:
                reason = FinishReason.LENGTH
            if sample.detok is not None:
                sample.text += sample.detok.step(text_ids) if text_ids else ""
                if reason is not None:
                    sample.text += sample.detok.flush()
                if stop and (matched := self._match_stop_string(sample, stop)) is not None:
                    reason, req.stop_reason = FinishReason.STOP, matched  # also when it had just reached its length
            if reason is not None:
                del req.output_ids[before + n :]
                del req.logprobs[before + n :]
                self.finish(req, reason)
                return

    @staticmethod
    def _match_stop_string(sample: SampleState, stop: list[str]) -> str | None:
        """Cut the text at the earliest stop string; returns it (None if there is none)."""
        # Only text after what was already emitted can hold a new match (held-back chars included).
        window_start = max(0, sample.num_emitted_chars - max(len(s) for s in stop) + 1)
        best: tuple[int, str] | None = None
        for s in stop:
            pos = sample.text.find(s, window_start)
            if pos != -1 and (best is None or pos < best[0]):
                best = (pos, s)
        if best is None:
            return None
        sample.text = sample.text[: best[0]]
        return best[1]
