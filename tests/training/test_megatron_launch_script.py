"""A Megatron-LM-style MoE launch script (examples/megatron_lm/train_moe_cpu.sh: Megatron-LM's
Mixtral example's flag groups and flags, shrunk to CPU size) runs through torchrun over gloo
with only the entry point swapped and --routing path appended."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

from tests.conftest import REPO, free_port

SCRIPT = os.path.join(REPO, "examples", "megatron_lm", "train_moe_cpu.sh")
GROUPS = ("MODEL_ARGS", "MOE_ARGS", "DATA_ARGS", "TRAINING_ARGS", "MODEL_PARALLEL_ARGS",
          "LOGGING_ARGS")


def test_the_script_is_megatron_lms_with_the_entry_point_swapped():
    """The README's one-line conversion turns Megatron-LM's launch line into the script's."""
    text = open(SCRIPT).read()
    launch = re.search(r"^torchrun .*?(?=^\S|\Z)", text, re.M | re.S).group(0)
    assert [g for g in GROUPS if f"${{{g}[@]}}" in launch] == list(GROUPS)
    readme = open(os.path.join(REPO, "README.md")).read()
    sed = re.search(r"^sed '([^']+)' train_mixtral", readme, re.M).group(1)
    ours = launch.replace(' "$@"', "")  # extra flags (e.g. --summary-json): the script's own
    megatron_lm = ("torchrun ${DISTRIBUTED_ARGS[@]} ${MEGATRON_PATH}/pretrain_gpt.py \\\n"
                   + ours.split("\n", 1)[1])
    converted = subprocess.run(["sed", sed], input=megatron_lm, capture_output=True, text=True,
                               check=True).stdout
    assert converted == ours
    assert ours.startswith("torchrun ${DISTRIBUTED_ARGS[@]} $(command -v pathmoe-pretrain) "
                           "--routing path \\\n")


def test_megatron_lm_moe_script_trains_five_iterations_on_two_processes(demo_data, tmp_path):
    bin_dir = os.path.dirname(sys.executable)  # where pip put pathmoe-pretrain
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHONPATH=REPO,
               OMP_NUM_THREADS="1", MASTER_PORT=str(free_port()), GPUS_PER_NODE="2")
    summary = tmp_path / "summary.json"
    result = subprocess.run(
        ["bash", SCRIPT, str(tmp_path / "checkpoints"), demo_data["tokenizer"],
         demo_data["train_prefix"], "--summary-json", str(summary)],
        capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    s = json.loads(summary.read_text())
    assert s["iterations"] == 5 and len(s["train_losses"]) == 5 and s["world_size"] == 2
    assert s["routing"] == "path" and all(math.isfinite(x) for x in s["train_losses"])
    assert math.isfinite(s["valid_loss"])
    assert os.path.isdir(tmp_path / "checkpoints" / "iter_0000005")  # --save honoured
