"""A cost model of decode at scale: Llama-3-70B at tp=8 and DeepSeek-V3 at ep=32, on H100s.

    python benchmarks/parallel_cost_model.py [--context 2048]

Per decode step each GPU reads its weights and its sequences' KV cache from HBM and moves
activations over NVLink (tensor-parallel all-reduces) or InfiniBand (expert-parallel all-to-all).
Each term is bytes over a bandwidth, scaled by an efficiency quadrant measured on one GPU where it
has one (BENCHMARKS.md, "GPU: decode" and "GPU: fused MoE": weight streaming at 0.74 of the HBM
roofline at batch 1, split-KV decode attention at 0.92-1.0 of copy bandwidth, fp8 expert GEMMs at
0.23 MFU); link bandwidths and collective latencies are the vendors' published figures (marked
"assumed" in the table). The peer figures are SGLang's published large-scale EP deployment
(96 H100s, PD + EP, 2k-token inputs: 52.3k input and 22.3k output tok/s per 8-GPU node) and
vLLM's wide-EP DeepSeek figure (2.2k output tok/s per H200). Nothing here runs on a GPU: it says
what the parts cost, so a measured deployment can be held against it.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

# H100 SXM, published.
HBM_BYTES_PER_S = 3.35e12
FP8_FLOPS = 1979e12
NVLINK_BYTES_PER_S = 450e9  # per GPU, one direction
IB_BYTES_PER_S = 46e9  # per GPU (one 400 Gb/s NIC), what DeepEP's low-latency kernels reach (published)
ALLREDUCE_LATENCY_S = 10e-6  # a small NCCL all-reduce across 8 NVLink GPUs (assumed, NCCL tests' order)
ALLTOALL_LATENCY_S = 20e-6  # a small cross-node all-to-all (assumed)
# Measured by quadrant on one GPU (BENCHMARKS.md).
WEIGHT_STREAM_EFF = 0.74  # batch-1 decode of the Llama-3-8B shape vs its roofline (H200)
ATTENTION_EFF = 0.92  # split-KV decode attention vs copy bandwidth, batch 32 at 8k (H200)
FP8_GEMM_MFU = 0.23  # fp8 expert GEMMs (quant_moe), prefill sizes (H200)


@dataclass
class Step:
    weights_s: float
    kv_s: float
    compute_s: float
    comm_s: float

    @property
    def serial_s(self) -> float:
        return self.weights_s + self.kv_s + self.compute_s + self.comm_s

    @property
    def overlapped_s(self) -> float:
        """Two-batch overlap: one micro-batch communicates while the other computes."""
        return max(self.weights_s + self.kv_s + self.compute_s, self.comm_s)


def llama70b_tp8(batch: int, context: int) -> Step:
    params, layers, hidden, kv_heads, head_dim, vocab, tp = 70.6e9, 80, 8192, 8, 128, 128256, 8
    weights = params * 2 / tp  # bf16, each rank its share
    kv = batch * context * layers * max(kv_heads // tp, 1) * head_dim * 2 * 2  # K and V, bf16
    message = batch * hidden * 2
    ring = 2 * (tp - 1) / tp * message / NVLINK_BYTES_PER_S + ALLREDUCE_LATENCY_S
    gather = (tp - 1) / tp * batch * vocab * 4 / NVLINK_BYTES_PER_S + ALLREDUCE_LATENCY_S
    return Step(weights / (HBM_BYTES_PER_S * WEIGHT_STREAM_EFF), kv / (HBM_BYTES_PER_S * ATTENTION_EFF), 0.0,
                (2 * layers + 1) * ring + gather)


def deepseek_v3_ep32(batch: int, context: int, redundant: int = 32) -> Step:
    """Decode with data-parallel attention (each GPU its own `batch` sequences) and the experts spread
    over 32 GPUs (4 nodes of 8): every GPU reads the non-expert weights, its share of the experts and
    its sequences' MLA cache, and sends each token's hidden state to its 8 experts and back."""
    layers, moe_layers, hidden, expert_inter, experts, top_k, ep, gpus_per_node = 61, 58, 7168, 2048, 256, 8, 32, 8
    attention = 187e6 * layers  # MLA projections per layer (q_a, q_b, kv_a, kv_b, o)
    dense = 3 * 3 * hidden * 18432 + moe_layers * 3 * hidden * expert_inter  # dense FFNs + shared experts
    head = 129280 * hidden
    expert_bytes = 3 * hidden * expert_inter  # fp8
    local_experts = (experts + redundant) // ep
    weights = attention + dense + head + local_experts * expert_bytes * moe_layers  # fp8: one byte each
    kv = batch * context * layers * (512 + 64 + 80)  # MLA latent + rope key, fp8, with scales
    pairs = batch * top_k  # (token, expert) pairs this GPU sends, and (balanced) receives
    compute = 2 * 3 * hidden * expert_inter * pairs * moe_layers / (FP8_FLOPS * FP8_GEMM_MFU)
    per_layer = pairs * hidden * (1 + 2)  # fp8 dispatch, bf16 combine
    remote = (ep - gpus_per_node) / ep  # the share of pairs that leave the node
    comm = moe_layers * (2 * ALLTOALL_LATENCY_S + per_layer * (remote / IB_BYTES_PER_S
                                                                + (1 - remote) / NVLINK_BYTES_PER_S))
    return Step(weights / (HBM_BYTES_PER_S * WEIGHT_STREAM_EFF), kv / (HBM_BYTES_PER_S * ATTENTION_EFF),
                compute, comm)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=2048, help="tokens of context per sequence")
    args = p.parse_args(argv)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"decode cost model, H100 SXM, {args.context}-token context (ms per step)")
    for col in ("deployment", "batch / GPU", "weights", "KV", "expert GEMMs", "comm", "TPOT serial",
                "tok/s/GPU serial", "tok/s/GPU overlapped"):
        table.add_column(col, justify="right")
    for batch in (1, 32, 128):
        s = llama70b_tp8(batch, args.context)
        table.add_row("Llama-3-70B tp=8", str(batch), f"{s.weights_s * 1e3:.2f}", f"{s.kv_s * 1e3:.2f}", "-",
                      f"{s.comm_s * 1e3:.2f}", f"{s.serial_s * 1e3:.2f}", f"{batch / s.serial_s / 8:,.0f}",
                      f"{batch / s.overlapped_s / 8:,.0f}")
    for batch in (32, 128, 256):
        s = deepseek_v3_ep32(batch, args.context)
        table.add_row("DeepSeek-V3 ep=32 (DP attn)", str(batch), f"{s.weights_s * 1e3:.2f}", f"{s.kv_s * 1e3:.2f}",
                      f"{s.compute_s * 1e3:.2f}", f"{s.comm_s * 1e3:.2f}", f"{s.serial_s * 1e3:.2f}",
                      f"{batch / s.serial_s:,.0f}", f"{batch / s.overlapped_s:,.0f}")
    table.add_row("SGLang, DeepSeek-V3, 96 H100 PD+EP (published)", "-", "-", "-", "-", "-", "-", "-",
                  f"{22.3e3 / 8:,.0f}")
    table.add_row("vLLM wide-EP DeepSeek, H200 (published)", "-", "-", "-", "-", "-", "-", "-", "2,200")
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
