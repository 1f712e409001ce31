"""The routing variants compared by the small-scale reproduction, as trainer flags.

Aux-loss policy follows the paper (Section 4.1): PathMoE variants train without the
load-balancing loss, every other model keeps it (0.01); Indep-MoE is run both ways so the
effect of dropping the loss is measured separately from the effect of sharing routers.
"""

from __future__ import annotations

from dataclasses import dataclass

PAPER_AUX_LOSS = 0.01


@dataclass(frozen=True)
class Variant:
    """One routed model of the study.

    Args:
        key: short name, used for folders and ``--variants``.
        paper_name: the paper's name for it.
        routing: the trainer's ``--routing`` value.
        aux_loss: ``--moe-aux-loss-coeff``.
        block_size: ``--path-block-size`` (None: the variant's default / not applicable).
    """

    key: str
    paper_name: str
    routing: str
    aux_loss: float
    block_size: int | None = None

    def trainer_flags(self) -> list[str]:
        flags = ["--routing", self.routing, "--moe-aux-loss-coeff", repr(self.aux_loss)]
        if self.block_size is not None:
            flags += ["--path-block-size", str(self.block_size)]
        return flags


VARIANTS: dict[str, Variant] = {v.key: v for v in (
    Variant("indep_aux", "Indep-MoE (LBL 0.01)", "independent", PAPER_AUX_LOSS),
    Variant("indep", "Indep-MoE (no LBL)", "independent", 0.0),
    Variant("path2", "PathB2-MoE", "path", 0.0, 2),
    Variant("path4", "PathB4-MoE", "path", 0.0, 4),
    Variant("path8", "PathB8-MoE (= PathMoE at L=8)", "path", 0.0, 8),
    Variant("mono4", "MonoB4-MoE", "mono", PAPER_AUX_LOSS, 4),
    Variant("lowrank", "LowRank-MoE", "lowrank", PAPER_AUX_LOSS),
    Variant("xmoe", "X-MoE", "xmoe", PAPER_AUX_LOSS, 1),
    Variant("xmoe4", "PathB4X-MoE", "xmoe", PAPER_AUX_LOSS, 4),
    Variant("recurrent", "Recurrent-MoE", "recurrent", PAPER_AUX_LOSS),
    Variant("random", "Rand-MoE", "random", PAPER_AUX_LOSS),
)}
# Off the paper's policy on purpose, so kept out of VARIANTS: PathB4 with the aux loss separates
# the effect of sharing routers from that of dropping the loss (the medium study).
ABLATIONS: dict[str, Variant] = {v.key: v for v in (
    Variant("path4_aux", "PathB4-MoE (LBL 0.01)", "path", PAPER_AUX_LOSS, 4),
)}
DEFAULT_VARIANTS = ("indep_aux", "indep", "path4", "mono4", "lowrank", "xmoe", "recurrent",
                    "random")
BASELINE = "indep_aux"


def select_variants(keys: list[str] | tuple[str, ...],
                    pool: dict[str, Variant] = VARIANTS) -> list[Variant]:
    """The variants of ``pool`` named by ``keys`` (baseline first, each once); ValueError names
    unknowns."""
    unknown = [k for k in keys if k not in pool]
    if unknown:
        raise ValueError(f"--variants: unknown {unknown}; choose from {sorted(pool)}")
    ordered = [BASELINE] + [k for k in dict.fromkeys(keys) if k != BASELINE]
    return [pool[k] for k in ordered]
