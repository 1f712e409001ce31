"""A small GPT of torch modules + ``deepspeed.moe.layer.MoE`` layers (every layer MoE).

Same shape family as the Megatron tiny config: pre-norm RMSNorm, causal self-attention with
RoPE, SwiGLU experts, untied output head. Expert weights are initialised from a generator
seeded by (seed, layer, global expert id), so a model built with ``ep_size`` 1 or 2 holds the
same experts (DeepSpeed itself deep-copies one expert into every slot).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megatron_pathmoe.integrations.deepspeed._require import require_deepspeed
from megatron_pathmoe.integrations.deepspeed.gating import share_block_gates


@dataclass
class DSModelConfig:
    vocab_size: int
    num_layers: int = 8
    hidden_size: int = 128
    num_attention_heads: int = 4
    ffn_hidden_size: int = 256
    seq_length: int = 256
    num_experts: int = 8
    topk: int = 2
    ep_size: int = 1
    path_block_size: int = 4  # 1 = DeepSpeed's independent gates
    capacity_factor: float | None = None  # None: drop-free (DeepSpeed drop_tokens=False)
    min_capacity: int = 4
    top2_sampling: bool = False  # DeepSpeed's Gumbel-sampled 2nd expert (its default is on)
    rope_base: float = 10000.0
    init_std: float = 0.02
    seed: int = 1234

    def check(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"--hidden-size {self.hidden_size} must be divisible by "
                             f"--num-attention-heads {self.num_attention_heads}")
        if not 1 <= self.topk <= self.num_experts:
            raise ValueError(f"--moe-router-topk {self.topk} must be between 1 and --num-experts "
                             f"{self.num_experts}")
        if self.num_experts % self.ep_size:
            raise ValueError(f"--expert-model-parallel-size {self.ep_size} must divide --num-experts "
                             f"{self.num_experts}")


def rope_tables(seq_length: int, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_length, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [b, heads, s, d] by position (pairs are the two halves of d)."""
    first, second = x.chunk(2, dim=-1)
    cos, sin = cos[: x.shape[-2]].to(x.dtype), sin[: x.shape[-2]].to(x.dtype)
    return torch.cat((first * cos - second * sin, first * sin + second * cos), dim=-1)


class CausalSelfAttention(torch.nn.Module):
    def __init__(self, config: DSModelConfig) -> None:
        super().__init__()
        self.heads = config.num_attention_heads
        self.qkv = torch.nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
        self.proj = torch.nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v,
                                             is_causal=True)
        return self.proj(out.transpose(1, 2).reshape(b, s, h))


class SwiGLUExpert(torch.nn.Module):
    def __init__(self, hidden_size: int, ffn_hidden_size: int) -> None:
        super().__init__()
        self.gate_up = torch.nn.Linear(hidden_size, 2 * ffn_hidden_size, bias=False)
        self.down = torch.nn.Linear(ffn_hidden_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class MoEBlock(torch.nn.Module):
    def __init__(self, config: DSModelConfig) -> None:
        super().__init__()
        moe_cls = require_deepspeed("deepspeed.moe.layer").MoE
        self.attn_norm = torch.nn.RMSNorm(config.hidden_size)
        self.attn = CausalSelfAttention(config)
        self.mlp_norm = torch.nn.RMSNorm(config.hidden_size)
        drop = config.capacity_factor is not None
        self.moe = moe_cls(config.hidden_size, SwiGLUExpert(config.hidden_size, config.ffn_hidden_size),
                           num_experts=config.num_experts, ep_size=config.ep_size, k=config.topk,
                           capacity_factor=config.capacity_factor or 1.0,
                           eval_capacity_factor=config.capacity_factor or 1.0,
                           min_capacity=config.min_capacity, drop_tokens=drop, use_rts=False,
                           top2_2nd_expert_sampling=config.top2_sampling)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        out, aux, counts = self.moe(self.mlp_norm(x))
        return x + out, aux, counts


def expert_parallel_rank(ep_size: int) -> int:
    """This rank's place in its expert-parallel group, creating DeepSpeed's expert groups now
    (the MoE layers reuse them) so experts can be initialised by their global id."""
    import torch.distributed as dist

    if ep_size == 1 or not dist.is_initialized():
        return 0
    groups = require_deepspeed("deepspeed.utils.groups")
    name = f"ep_size_{ep_size}"  # the group name deepspeed.moe.layer.MoE uses
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    return groups._get_expert_parallel_rank(name)


class DeepSpeedMoEGPT(torch.nn.Module):
    """forward(tokens, labels, loss_mask) -> (lm loss, summed aux loss, per-layer expert counts)."""

    def __init__(self, config: DSModelConfig, ep_rank: int | None = None) -> None:
        super().__init__()
        config.check()
        ep_rank = expert_parallel_rank(config.ep_size) if ep_rank is None else ep_rank
        self.config = config
        torch.manual_seed(config.seed)  # same non-expert weights on every rank and EP size
        self.embedding = torch.nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = torch.nn.ModuleList(MoEBlock(config) for _ in range(config.num_layers))
        self.final_norm = torch.nn.RMSNorm(config.hidden_size)
        self.output = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        for name, p in self.named_parameters():
            # gates keep DeepSpeed's init; experts (a per-rank count) must not consume this RNG
            if p.dim() == 2 and ".gate." not in name and ".deepspeed_experts." not in name:
                torch.nn.init.normal_(p, std=config.init_std)
        self._init_experts(ep_rank)
        cos, sin = rope_tables(config.seq_length, config.hidden_size // config.num_attention_heads,
                               config.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.shared_gates = share_block_gates(self, config.path_block_size)

    def _init_experts(self, ep_rank: int) -> None:
        local = self.config.num_experts // self.config.ep_size
        for layer, block in enumerate(self.layers):
            for i, expert in enumerate(block.moe.deepspeed_moe.experts.deepspeed_experts):
                expert_id = ep_rank * local + i
                gen = torch.Generator().manual_seed(
                    self.config.seed + 1000003 * (layer + 1) + expert_id)
                with torch.no_grad():
                    for p in expert.parameters():
                        p.copy_(torch.randn(p.shape, generator=gen) * self.config.init_std)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor):
        x = self.embedding(tokens)
        aux_losses, counts = [], []
        for block in self.layers:
            x, aux, count = block(x, self.rope_cos, self.rope_sin)
            aux_losses.append(aux)
            counts.append(count)
        logits = self.output(self.final_norm(x)).float()
        losses = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
        mask = loss_mask.reshape(-1).float()
        lm_loss = (losses * mask).sum() / mask.sum().clamp(min=1.0)
        return lm_loss, torch.stack(aux_losses).sum(), counts
