"""Are a collapsed run's idle experts untrained? Expert weights against their initialisation.

Without a load-balancing loss most tokens go to a few experts per layer (the medium study's
no-LBL runs) and others receive almost none of the held-out tokens. Dead experts (no token, so
no gradient since early training) would still hold their initial weights, shrunk only by weight
decay (a scale, which cosine similarity ignores); permuting tokens onto them would then measure
untrained weights. This tool tells the two apart: it rebuilds a run's model at initialisation
from its seed (the seeding and build training uses), loads each checkpoint and reports, per
layer and expert, the cosine similarity of its weights (fc1 and fc2 together) to the initial
ones, next to its held-out load from the study's analysis when that is there.

    python -m megatron_pathmoe.study.expert_drift RUN_DIR [RUN_DIR ...] --output drift.json

RUN_DIR is a study run's scratch folder (``checkpoints/iter_*`` and ``iter_*/analysis``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING

import numpy as np
import torch

from megatron_pathmoe.study.runner import iteration_folder, split_run_name

if TYPE_CHECKING:
    from megatron_pathmoe.checkpoint.record import RunConfig

UNTRAINED_COSINE = 0.99  # above this an expert is counted as still at its initial weights
IDLE_SHARE = 0.1  # an expert with less than this fraction of the uniform load is idle
_EXPERT_KEY = "decoder.layers.{layer}.mlp.experts.local_experts.{expert}.linear_{fc}.weight"


def expert_vectors(state: dict[str, torch.Tensor], layers: int, experts: int) -> torch.Tensor:
    """float64 [L, E, P]: each expert's fc1 and fc2 weights flattened, from a canonical
    (world-1) state dict."""
    rows = [[torch.cat([state[_EXPERT_KEY.format(layer=i, expert=e, fc=fc)].double().flatten()
                        for fc in ("fc1", "fc2")]) for e in range(experts)]
            for i in range(layers)]
    return torch.stack([torch.stack(r) for r in rows])


def cosine_to_init(trained: torch.Tensor, init: torch.Tensor) -> np.ndarray:
    """[L, E] cosine similarity between matching expert vectors."""
    return torch.nn.functional.cosine_similarity(trained, init, dim=-1).numpy()


def initial_state(checkpoint: str, seed: int) -> dict[str, torch.Tensor]:
    """The canonical state the run started from: its model config, seeded and built as
    ``training/trainer.py`` does (CPU initialisation). Needs a world-1 megatron state."""
    from megatron_pathmoe.checkpoint.record import read_run_config
    from megatron_pathmoe.convert.shards import canonical_state
    from megatron_pathmoe.model import build_model_chunks
    from megatron_pathmoe.runtime.distributed import seed_rngs

    cfg = read_run_config(checkpoint).model
    seed_rngs(seed)
    (model,) = build_model_chunks(cfg, use_cpu_initialization=True)
    return canonical_state(model, cfg)


def trained_state(checkpoint: str) -> tuple[dict[str, torch.Tensor], "RunConfig"]:
    """The checkpoint's canonical state and its run record."""
    from megatron_pathmoe.checkpoint.load import load_model_for_inference
    from megatron_pathmoe.convert.shards import canonical_state

    model, run = load_model_for_inference(checkpoint)
    return canonical_state(model, run.model), run


def _held_out_load(run_dir: str, iteration: int) -> np.ndarray | None:
    path = os.path.join(run_dir, iteration_folder(iteration), "analysis", "report.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        (model,) = json.load(f)["models"].values()
    return np.asarray(model["expert_load"]["load"], dtype=np.float64)


def _checkpoints(run_dir: str) -> dict[int, str]:
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{run_dir}: no checkpoints/ folder (is it a study run folder?)")
    out = {}
    for name in sorted(os.listdir(root)):
        if name.startswith("iter_") and name[5:].isdigit():
            out[int(name[5:])] = os.path.join(root, name)
    if not out:
        raise FileNotFoundError(f"{root}: no iter_* checkpoints")
    return out


def summarize(cosine: np.ndarray, load: np.ndarray | None) -> dict:
    """Counts over all (layer, expert) pairs: experts still at their initial weights, and with
    the held-out load, idle ones (under IDLE_SHARE of the uniform load), unused ones (no
    token) and the mean cosine to init of idle and busy experts."""
    untrained = cosine > UNTRAINED_COSINE
    out: dict = {"experts": int(cosine.size), "untrained": int(untrained.sum()),
                 "cosine_max": float(cosine.max()), "cosine_mean": float(cosine.mean())}
    if load is not None:
        idle = load * load.shape[1] < IDLE_SHARE
        out.update(idle=int(idle.sum()), unused=int((load == 0).sum()),
                   idle_and_untrained=int((idle & untrained).sum()),
                   cosine_mean_idle=float(cosine[idle].mean()) if idle.any() else None,
                   cosine_mean_busy=float(cosine[~idle].mean()) if (~idle).any() else None)
    return out


def diagnose_run(run_dir: str, seed: int, iterations: list[int] | None = None) -> dict:
    """Per evaluated checkpoint: the [L, E] cosine to init, the held-out load and a summary."""
    checkpoints = _checkpoints(run_dir)
    chosen = sorted(checkpoints) if iterations is None else iterations
    missing = [it for it in chosen if it not in checkpoints]
    if missing:
        raise FileNotFoundError(f"{run_dir}: no checkpoint for iteration(s) {missing}")
    init_state = initial_state(checkpoints[chosen[0]], seed)
    result: dict = {"run_dir": os.path.abspath(run_dir), "seed": seed, "checkpoints": {}}
    for it in chosen:
        state, run = trained_state(checkpoints[it])
        layers, experts = run.model.num_layers, run.model.num_experts
        cosine = cosine_to_init(expert_vectors(state, layers, experts),
                                expert_vectors(init_state, layers, experts))
        load = _held_out_load(run_dir, it)
        result["checkpoints"][str(it)] = {
            "cosine_to_init": np.round(cosine, 4).tolist(),
            "held_out_load": None if load is None else np.round(load, 6).tolist(),
            "summary": summarize(cosine, load)}
    return result


def _seed_of(run_dir: str) -> int:
    parsed = split_run_name(os.path.basename(os.path.normpath(run_dir)))
    if parsed is None:
        raise ValueError(f"{run_dir}: cannot read the seed from the folder name; pass --seed")
    return parsed[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--seed", type=int, default=None,
                   help="the runs' training seed (default: from the folder name, NAME_seedN)")
    p.add_argument("--iterations", type=int, nargs="+", default=None,
                   help="checkpoints to read (default: every one in RUN_DIR/checkpoints)")
    p.add_argument("--output", required=True, help="JSON file to write")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from megatron_pathmoe.convert.checkpoint import megatron_process_group

    args = parse_args(argv)
    try:
        seeds = {d: args.seed if args.seed is not None else _seed_of(d) for d in args.run_dirs}
        with megatron_process_group():
            runs = {os.path.basename(os.path.normpath(d)): diagnose_run(d, seeds[d],
                                                                        args.iterations)
                    for d in args.run_dirs}
    except (ValueError, FileNotFoundError) as err:
        print(f"expert_drift: error: {err}", file=sys.stderr)
        return 2
    with open(args.output, "w") as f:
        json.dump({"untrained_cosine": UNTRAINED_COSINE, "idle_share": IDLE_SHARE,
                   "runs": runs}, f, indent=1)
        f.write("\n")
    for name, run in runs.items():
        for it, ck in run["checkpoints"].items():
            print(f"{name} step {it}: {json.dumps(ck['summary'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
