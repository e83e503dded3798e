"""What a prefill engine and a decode engine agree on before KV blocks move between them.

`KVLayout` describes one engine's KV cache: the model it belongs to, block size, layer and head
shape, element dtype and the 8-bit cache's scale group. The decode side sends its layout in a
hello; the prefill side refuses any difference, naming each field, because blocks of another
layout would be read as garbage without any error. `RemoteKV` is what a prefill engine hands back
for one finished prompt (the response's `kv_transfer_params`), and the decode request carries it.

Overlapped transfers (layer by layer while the prompt is computed): the router names the transfer
itself and sends the prompt to both engines at once, the prefill one with `{"do_remote_decode":
true, "transfer_id": T}`, the decode one with only T and the prefill engine's KV address
(`RemoteKV.overlapped`): no block ids (pulls name positions in the prompt), no first token (it comes
with the final `done`), and the prompt's length and digest from the decode engine's own tokens.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from quadrant.config import CacheConfig, ModelConfig
from quadrant.errors import QuadrantError
from quadrant.layers.sampler import TokenLogprob

PROTOCOL_VERSION = 2  # 2: positional pulls, parked requests and their wait pings, the first token on done


class KVHandshakeError(QuadrantError, ValueError):
    """The two engines' KV caches do not match: blocks cannot move between them."""


class KVTransferError(QuadrantError, RuntimeError):
    """A KV pull failed: the remote is gone, timed out, or no longer holds the blocks."""


def model_fingerprint(model: ModelConfig) -> str:
    """Equal for two engines of the same architecture and shapes (the weights' precision may differ:
    each quadrant picks its own)."""
    blob = json.dumps(asdict(model), sort_keys=True, default=str).encode()
    return hashlib.blake2b(blob, digest_size=8).hexdigest()


def prompt_digest(token_ids: list[int]) -> str:
    """Names a prompt's tokens: a decode engine checks that the blocks it pulls were made for its prompt."""
    return hashlib.blake2b(array("q", token_ids).tobytes(), digest_size=16).hexdigest()


@dataclass(frozen=True)
class KVLayout:
    protocol_version: int
    model: str  # model_fingerprint
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    cache_dtype: str  # element dtype of K and V, e.g. "torch.bfloat16", "torch.int8"
    quant_group: int  # tokens per scale of an 8-bit cache; 0: no scales

    @classmethod
    def of(cls, model: ModelConfig, cache: CacheConfig, activation_dtype: torch.dtype) -> "KVLayout":
        return cls(PROTOCOL_VERSION, model_fingerprint(model), cache.block_size, model.num_hidden_layers,
                   model.num_key_value_heads, model.head_dim, str(cache.torch_dtype(activation_dtype)),
                   cache.quant_group if cache.quantized else 0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "KVLayout":
        names = {f.name for f in fields(cls)}
        if not isinstance(d, dict) or set(d) != names:
            raise KVHandshakeError(f"malformed KV layout: expected the fields {sorted(names)}")
        return cls(**d)

    def check_compatible(self, remote: "KVLayout") -> None:
        """Raise KVHandshakeError naming every field where `remote` differs from this layout."""
        diffs = [f"{f.name}: here {getattr(self, f.name)!r}, remote {getattr(remote, f.name)!r}"
                 for f in fields(self) if getattr(self, f.name) != getattr(remote, f.name)]
        if diffs:
            raise KVHandshakeError("KV caches do not match (" + "; ".join(diffs) + ")")


@dataclass(frozen=True)
class RemoteKV:
    """A finished prompt's KV blocks, held on a prefill engine for one decode engine to pull."""

    transfer_id: str  # unguessable: it is the only key to the leased blocks
    host: str
    port: int
    block_ids: tuple[int, ...] | None  # the prefill engine's blocks of the prompt, in order (None: overlapped)
    num_tokens: int  # prompt tokens whose K/V they hold
    prompt_digest: str  # prompt_digest() of those tokens
    # The first token, sampled by the prefill engine from the prompt's last position, as a colocated
    # engine would (with its logprob record if one was asked for); the decode engine goes on from it.
    first_token: int | None = None
    first_logprob: TokenLogprob | None = None

    @property
    def overlapped(self) -> bool:
        """Named before the prompt was computed: pulled by position, waiting for each layer."""
        return self.block_ids is None

    def to_dict(self) -> dict[str, Any]:
        lp = self.first_logprob
        return {"transfer_id": self.transfer_id, "remote_host": self.host, "remote_port": self.port,
                "remote_block_ids": None if self.block_ids is None else list(self.block_ids),
                "num_tokens": self.num_tokens, "prompt_digest": self.prompt_digest, "first_token_id": self.first_token,
                "first_token_logprob": None if lp is None else {"logprob": lp.logprob, "top": lp.top}}

    @classmethod
    def from_dict(cls, d: Any) -> "RemoteKV":
        """From a request's kv_transfer_params; ValueError naming what is wrong."""
        if not isinstance(d, dict):
            raise ValueError("kv_transfer_params must be an object")
        if "transfer_id" not in d:
            raise ValueError("kv_transfer_params lacks 'transfer_id'")
        tid = check_transfer_id(d["transfer_id"])
        ids = d.get("remote_block_ids")
        if ids is None and d.get("first_token_id") is not None:
            raise ValueError("kv_transfer_params: an overlapped transfer (no remote_block_ids) takes no first_token_id")
        try:
            first = d.get("first_token_id")
            lp = d.get("first_token_logprob")
            record = None if first is None else logprob_record(int(first), lp)
            if ids is None:  # overlapped: the decode engine fills in its own prompt's length and digest
                num, digest = int(d.get("num_tokens") or 0), str(d.get("prompt_digest") or "")
            else:
                num, digest = int(d["num_tokens"]), str(d["prompt_digest"])
            remote = cls(tid, str(d["remote_host"]), int(d["remote_port"]),
                         None if ids is None else tuple(int(b) for b in ids), num, digest,
                         None if first is None else int(first), record)
        except KeyError as e:
            raise ValueError(f"kv_transfer_params lacks {e.args[0]!r}") from None
        except (TypeError, ValueError, IndexError):
            raise ValueError("kv_transfer_params: remote_port, num_tokens, remote_block_ids and first_token_id "
                             "must be integers (first_token_logprob: {logprob, top})") from None
        if not 0 < remote.port < 65536 or (ids is not None and remote.num_tokens < 1) \
                or any(b < 0 for b in remote.block_ids or ()):
            raise ValueError("kv_transfer_params: port, num_tokens or block ids out of range")
        return remote


def logprob_record(token: int, d: Any) -> TokenLogprob | None:
    """A first token's logprob record from its wire form ({logprob, top}; None: none was asked for)."""
    if d is None:
        return None
    return TokenLogprob(token, float(d["logprob"]), [(int(t), float(x)) for t, x in d["top"]])


def check_transfer_id(value: Any) -> str:
    """A transfer id a client may choose (the router does, for overlapped transfers): 16 to 128 letters,
    digits, '-' or '_'. It is the only key to the blocks: a short or guessable one is refused."""
    tid = str(value)
    if not 16 <= len(tid) <= 128 or not all(c.isascii() and (c.isalnum() or c in "-_") for c in tid):
        raise ValueError("kv_transfer_params: transfer_id must be 16 to 128 letters, digits, '-' or '_'")
    return tid
