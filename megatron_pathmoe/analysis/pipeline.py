"""One checkpoint through the whole analysis: record paths, measure robustness, report.

Runs on every rank of any TP/PP/EP/DP layout (megatron parallel state initialised by the
caller); the report comes back on global rank 0 only.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_pathmoe.analysis.forward import (
    TokenWindows,
    evaluate_loss,
    microbatch_plan,
    read_token_stream,
)
from megatron_pathmoe.analysis.path_arrays import PathWriter, load_paths
from megatron_pathmoe.analysis.recorder import PathRecorder, positions_of
from megatron_pathmoe.analysis.report import DEFAULT_TOP_PATHS, path_report
from megatron_pathmoe.analysis.robustness import DEFAULT_P, robustness_sweep
from megatron_pathmoe.runtime import is_rank0


@dataclass
class AnalysisOptions:
    data: str
    num_tokens: int
    output_dir: str
    seq_length: int | None = None
    micro_batch_size: int = 4
    top_paths: int = DEFAULT_TOP_PATHS
    robustness_p: tuple[float, ...] = DEFAULT_P
    robustness_seeds: int = 3
    robustness_tokens: int = 16384
    workers: int = 2
    device: str = "cpu"
    permute_impl: str = "auto"  # --permute-impl


def _bar(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="mb", disable=not is_rank0(), leave=False)


def recording_dir(output_dir: str, label: str) -> str:
    return os.path.join(output_dir, "paths", label)


def _open_writer(directory: str, windows: TokenWindows, model_cfg) -> PathWriter | None:
    """Rank 0 allocates the recording; TP rank 0 of every stage and DP rank writes into it."""
    writer = None
    if is_rank0():
        writer = PathWriter.create(directory, windows.num_tokens,
                                   list(range(1, model_cfg.num_layers + 1)),
                                   model_cfg.num_experts, model_cfg.moe_router_topk)
        writer.write_tokens(0, windows.inputs(), positions_of(windows.num_samples,
                                                              windows.seq_length))
        writer.flush()
    dist.barrier()
    if writer is None and ps.get_tensor_model_parallel_rank() == 0:
        writer = PathWriter.open(directory)
    return writer


def _plan(windows: TokenWindows, micro_batch_size: int):
    return microbatch_plan(windows.num_samples, windows.seq_length, micro_batch_size,
                           ps.get_data_parallel_world_size(), ps.get_data_parallel_rank())


def record(model: torch.nn.Module, model_cfg, windows: TokenWindows, directory: str,
           micro_batch_size: int, info: dict) -> float:
    """Record the paths of every token of ``windows`` into ``directory``; returns the mean
    loss of those forwards (nats/token)."""
    writer = _open_writer(directory, windows, model_cfg)
    plan = _plan(windows, micro_batch_size)
    with PathRecorder([model], writer, model_cfg.moe_router_topk) as recorder, \
            _bar(len(plan), f"recording {info.get('label', '')}") as bar:
        recorder.expect(plan)
        loss = evaluate_loss([model], windows, plan, micro_batch_size, progress=bar)
        recorder.check_complete()
    if writer is not None:
        writer.flush()
    dist.barrier()
    if is_rank0():
        writer.finalize({**info, "loss": loss})
    return loss


def robustness(model: torch.nn.Module, windows: TokenWindows, options: AnalysisOptions) -> dict:
    plan = _plan(windows, options.micro_batch_size)
    runs = 1 + options.robustness_seeds * sum(1 for p in set(options.robustness_p) if p > 0)
    with _bar(runs * len(plan), "robustness") as bar:
        result = robustness_sweep(
            lambda: evaluate_loss([model], windows, plan, options.micro_batch_size, progress=bar),
            [model], list(options.robustness_p), options.robustness_seeds)
    return {**result, "tokens": windows.num_tokens}


def token_texts(tokenizer) -> list[str]:
    return [tokenizer.detokenize([i]) for i in range(tokenizer.vocab_size)]


def _token_windows(options: AnalysisOptions, tokenizer, seq_length: int,
                   label: str) -> TokenWindows:
    stream = read_token_stream(options.data, options.num_tokens + 1, tokenizer)
    windows = TokenWindows.from_stream(stream, seq_length, options.data)
    if windows.num_tokens < options.num_tokens and is_rank0():
        why = f"--data ends after {stream.size:,} tokens" if stream.size <= options.num_tokens \
            else "whole sequences only"
        print(f"{label}: analysing {windows.num_tokens:,} of the {options.num_tokens:,} "
              f"requested tokens ({windows.num_samples} sequences of {seq_length}; {why})",
              flush=True)
    return windows


def analyze_checkpoint(label: str, checkpoint: str, options: AnalysisOptions) -> dict | None:
    """Record, measure and report one checkpoint (collective); the report on rank 0."""
    from megatron_pathmoe.data import load_tokenizer
    from megatron_pathmoe.checkpoint import load_model_for_inference

    model, run = load_model_for_inference(checkpoint, options.device, options.permute_impl)
    cfg = run.model
    seq_length = options.seq_length or cfg.seq_length
    if seq_length > cfg.seq_length:
        raise ValueError(f"--seq-length {seq_length} exceeds the {cfg.seq_length} tokens "
                         f"checkpoint {checkpoint} was trained with")
    tokenizer = load_tokenizer(run.tokenizer)
    windows = _token_windows(options, tokenizer, seq_length, label)
    directory = recording_dir(options.output_dir, label)
    info = {"label": label, "checkpoint": os.path.abspath(checkpoint),
            "iteration": run.iteration, "routing": cfg.routing,
            "path_block_size": cfg.path_block_size, "data": options.data,
            "seq_length": seq_length}
    loss = record(model, cfg, windows, directory, options.micro_batch_size, info)
    robust = None
    if options.robustness_tokens > 0:
        count = min(options.robustness_tokens, windows.num_tokens)
        robust = robustness(model, TokenWindows.from_stream(windows.stream[:count + 1],
                                                            seq_length, options.data), options)
    del model
    if not is_rank0():
        return None
    report = path_report(load_paths(directory), token_texts(tokenizer), options.top_paths,
                         workers=options.workers)
    return {**info, "recording": directory, "loss": loss, "perplexity": math.exp(loss),
            **({"robustness": robust} if robust else {}), **report}
