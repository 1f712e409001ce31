"""Model FLOPs of one training step, TFLOP/s per GPU and MFU.

Counted as Megatron-LM's ``num_floating_point_operations`` counts them: matrix multiplies only
(2 FLOPs per multiply-add; norms, softmax, activations and RoPE are left out), and every
multiply done three times per step (forward, backward for activations, backward for weights),
so a step is ``3 x forward``. For this GPT MoE, per token and layer:

* attention, dense: the Q, K, V projections (K and V sized by the query groups: GQA) and the
  output projection, plus QK^T and attention x V over half the sequence (causal mask);
* experts, active only: ``top-k`` SwiGLU experts (gate, up: hidden -> ffn; down: ffn ->
  hidden); the other experts do no work for this token, so MFU reflects active parameters;
* the router of the routing variant (a hidden x experts linear for Indep/Path/Rand, plus a
  low-rank correction for LowRank, a projection and expert embeddings for X-MoE, the input
  and output projections and a GRU cell for Recurrent; MonoB{B} computes it once per block);

and once per token the output layer (hidden x vocabulary; the embedding lookup multiplies
nothing). Megatron-LM leaves the router out; it is 2 x hidden x experts per token and layer.
MFU is this count per second per GPU over the GPU's dense bf16 peak.
"""

from __future__ import annotations

from megatron_pathmoe.config import PathMoEConfig

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from NVIDIA's data sheets; matched
# against torch.cuda.get_device_name() in order (the first substring that matches).
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),  # SXM
    ("A100", 312.0),
)


def router_macs_per_token(cfg: PathMoEConfig) -> float:
    """Multiply-adds of one layer's router for one token (mean over the layers)."""
    h, e = cfg.hidden_size, cfg.num_experts
    if cfg.routing == "xmoe":
        return cfg.xmoe_dim * (h + e)
    if cfg.routing == "recurrent":
        r = cfg.recurrent_router_dim
        return r * h + 2 * 3 * r * r + e * r  # in-projection, GRU (input, hidden), out
    if cfg.routing == "lowrank":
        return h * e + cfg.lowrank_rank * (h + e)
    if cfg.routing == "mono":
        return h * e / cfg.block_size  # the block's first layer routes, the rest reuse it
    return h * e  # independent, path, random: one hidden x experts linear


def forward_flops_per_token(cfg: PathMoEConfig, vocab_size: int | None = None
                            ) -> dict[str, float]:
    """Forward FLOPs per token by part: attention, experts, router (all layers) and
    logits; ``vocab_size`` defaults to the config's (pass megatron's padded size to match
    the output layer that actually runs)."""
    h, s, layers = cfg.hidden_size, cfg.seq_length, cfg.num_layers
    heads = cfg.num_attention_heads
    q = heads * (cfg.kv_channels or h // heads)  # --kv-channels: the heads' total width
    kv = (cfg.num_query_groups or heads) * (q // heads)
    projections = 2 * h * (q + 2 * kv) + 2 * q * h
    core = 2 * 2 * s * q / 2  # QK^T and attention x V, half of them masked
    experts = cfg.moe_router_topk * 3 * 2 * h * cfg.moe_ffn_hidden_size
    return {"attention": layers * (projections + core),
            "experts": layers * experts,
            "router": layers * 2 * router_macs_per_token(cfg),
            "logits": 2 * h * (vocab_size or cfg.vocab_size)}


def flops_per_step(cfg: PathMoEConfig, global_batch_size: int,
                   vocab_size: int | None = None) -> float:
    """Model FLOPs of one training step (forward + backward = 3 x forward) over the global
    batch of ``global_batch_size`` sequences."""
    per_token = sum(forward_flops_per_token(cfg, vocab_size).values())
    return 3 * per_token * global_batch_size * cfg.seq_length


def peak_bf16_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU named ``device_name`` (as CUDA names it); None if the
    table does not know it (no MFU is reported then)."""
    for key, peak in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return peak
    return None


def throughput_scalars(step_flops: float, step_seconds: float, world_size: int,
                       peak_tflops: float | None) -> dict[str, float]:
    """``throughput`` (model TFLOP/s per GPU, Megatron-LM's tag) and, when the peak is
    known, ``mfu`` (a fraction of it)."""
    tflops = step_flops / step_seconds / world_size / 1e12
    scalars = {"throughput": tflops}
    if peak_tflops:
        scalars["mfu"] = tflops / peak_tflops
    return scalars
