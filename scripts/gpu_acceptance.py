"""The GPU path's acceptance run: one command, under 8 minutes on one H100, a table for
benchmarks/RESULTS.md. Started by scripts/gpu_acceptance.sh (which installs the carried wheels
first); ``--dry-run`` runs every stage on CPU at tiny sizes (CI) and checks the table.

Stages (each logged, timed and bounded; a failed stage is a FAIL row, the next ones still run):
  environment    torch, CUDA, GPU, megatron-core (its version guard), transformer-engine
  kernels        build csrc/ (CUDA for TORCH_CUDA_ARCH_LIST), a kernel image for this GPU, the
                 self-check on the device for every dtype and mode (and its cost)
  tests          tests/ops: CPU vs CUDA and reference vs CUDA (bitwise / stated tolerances)
  permute_bench  benchmarks/permute_bench.py at the paper's shapes: custom vs megatron-core vs
                 the reference (and TE's fused permute when it imports), % of a D2D copy
  checkpoint     a world-1 NCCL run that saves, and a run resumed from its middle checkpoint:
                 resumed losses equal the uninterrupted ones
  training       benchmarks/paper_gpu.py: the 0.9B width (d=1280, 16 experts top-4, seq 4096,
                 bf16, --layers layers) PathB4 vs Indep-MoE interleaved; tokens/s/GPU, ratio,
                 peak memory, every run's losses finite and falling

    bash scripts/gpu_acceptance.sh            # on the GPU machine; table in $OUT (or runs/)
    bash scripts/gpu_acceptance.sh --dry-run  # on CPU (CI): same stages, tiny sizes
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TABLE = "gpu_acceptance.md"
LOG = "gpu_acceptance.log"
STAGES = ("environment", "kernels", "tests", "permute_bench", "checkpoint", "training")
# Seconds each stage may take on the GPU (the total is bounded by --budget as well).
STAGE_LIMITS = {"environment": 60, "kernels": 180, "tests": 150, "permute_bench": 120,
                "checkpoint": 150, "training": 300}
# What each carried wheel (scripts/gpu_wheelhouse.sh) provides; installed only where missing.
WHEEL_MODULES = {"megatron-core": "megatron.core", "packaging": "packaging", "psutil": "psutil",
                 "pybind11": "pybind11", "tqdm": "tqdm", "tokenizers": "tokenizers"}
CARRY_LIMIT = 64 * 2**20
# tests/ops without the CPU-only ones (test_dispatcher_integration's megatron_world1 fixture
# enables the CPU platform, which refuses on a machine with CUDA) and the build/install ones.
OPS_TESTS = ["tests/ops/test_permute_cuda.py", "tests/ops/test_permute_ops.py",
             "tests/ops/test_selfcheck.py"]


@dataclass
class Result:
    stage: str
    ok: bool | None  # None: skipped
    seconds: float
    detail: str
    sections: list[str] = field(default_factory=list)  # markdown printed after the table


class StageFailed(RuntimeError):
    """A stage's command failed or its output is wrong; the message is the table's detail."""


def _show(cmd: list[str]) -> str:
    """A command on one short line (for the table)."""
    return " ".join(shlex.join(cmd[:5]).split())[:80] + "..."


class Runner:
    """Runs stage commands with the remaining time budget, appending their output to the log."""

    def __init__(self, out: Path, budget: float, dry_run: bool):
        self.out, self.dry_run = out, dry_run
        self.deadline = time.monotonic() + budget
        self.log = out / LOG
        self.env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
        self.limit = STAGE_LIMITS["environment"]
        self.info: dict = {"te": False}
        self.wheelhouse = REPO / "wheelhouse"

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, cmd: list[str], env: dict | None = None) -> str:
        """Run ``cmd`` in the repository, return its stdout; StageFailed on error or timeout."""
        timeout = max(1.0, min(self.limit, self.remaining()))
        with open(self.log, "a", encoding="utf-8") as log:
            log.write(f"\n$ {shlex.join(cmd)}\n")
            log.flush()
            try:
                result = subprocess.run(cmd, cwd=REPO, env={**self.env, **(env or {})},
                                        stdout=subprocess.PIPE, stderr=log, text=True,
                                        timeout=timeout)
            except subprocess.TimeoutExpired as error:
                partial = error.stdout or ""  # bytes on some Python versions despite text=True
                log.write(partial.decode(errors="replace") if isinstance(partial, bytes) else partial)
                raise StageFailed(f"timed out after {timeout:.0f} s: {_show(cmd)}")
            log.write(result.stdout)
        if result.returncode != 0:
            raise StageFailed(f"exit {result.returncode} of {_show(cmd)}: "
                              f"{self.last_log_line()[:300]} (see {LOG})")
        return result.stdout

    def last_log_line(self) -> str:
        """The last non-blank line of the log (a one-line error usually ends there)."""
        lines = [line for line in self.log.read_text(errors="replace").splitlines() if line.strip()]
        return lines[-1].strip() if lines else ""

    def python(self, code: str) -> dict:
        """Run a Python snippet that prints one JSON object as its last line."""
        return json.loads(self.run([sys.executable, "-c", code]).strip().splitlines()[-1])


ENV_CODE = """
import json, platform, torch
from megatron_pathmoe.platform import gpu
gpu.check_megatron_core()
import megatron.core
cuda = torch.cuda.is_available()
print(json.dumps(dict(
    python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
    device=torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
    capability=list(torch.cuda.get_device_capability()) if cuda else None,
    megatron_core=megatron.core.__version__, te=gpu.transformer_engine_importable(),
    transformer_impl=gpu.default_transformer_impl())))
"""

KERNELS_CODE = """
import json, time, torch
from megatron_pathmoe.ops import _build, load_extension, selfcheck
start = time.perf_counter()
ext = load_extension()
built = time.perf_counter() - start
device = "cuda" if torch.cuda.is_available() else "cpu"
info = dict(build_seconds=built, reason=ext.reason, device=device,
            archs=getattr(ext.module, "cuda_archs", ""), checks={})
if ext.supports(device):
    if device == "cuda":
        info["arch_problem"] = ext.cuda_arch_problem(torch.cuda.get_device_capability())
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for mode in selfcheck.MODES:
            start = time.perf_counter()
            try:
                selfcheck.self_check(device, dtype, mode)
                result = "passed"
            except selfcheck.SelfCheckError as error:
                result = str(error)
            info["checks"][f"{dtype} {mode}"] = [result, 1e3 * (time.perf_counter() - start)]
print(json.dumps(info))
"""


def wheel_fits(filename: str) -> bool:
    """A wheel installable on the GPU machine: CPython 3.12 (or abi3/pure), x86_64 manylinux."""
    python, abi, platforms = filename[:-len(".whl")].split("-")[-3:]
    python_ok = any(t in ("cp312", "py3", "py312") or (abi == "abi3" and t.startswith("cp3"))
                    for t in python.split("."))
    platform_ok = any(t == "any" or re.fullmatch(r"manylinux[_0-9]*_x86_64", t)
                      for t in platforms.split("."))
    return python_ok and abi in ("cp312", "abi3", "none") and platform_ok


def wheelhouse_plan(wheelhouse: Path) -> list[tuple[str, Path]]:
    """(module, wheel file) for every pinned requirement of the wheelhouse; StageFailed when
    one is missing, does not fit the GPU machine, or the folder is too big to carry."""
    listing = wheelhouse / "REQUIREMENTS.txt"
    if not listing.is_file():
        raise StageFailed(f"no {listing}: run scripts/gpu_wheelhouse.sh on the dev machine")
    plan = []
    for spec in listing.read_text().split():
        dist, version = spec.split("==")
        wheels = [w for w in wheelhouse.glob(f"{dist.replace('-', '_')}-{version}-*.whl")
                  if wheel_fits(w.name)]
        if not wheels:
            raise StageFailed(f"{wheelhouse} has no cp312 manylinux wheel of {spec}: rerun "
                              "scripts/gpu_wheelhouse.sh")
        plan.append((WHEEL_MODULES[dist], wheels[0]))
    size = sum(w.stat().st_size for w in wheelhouse.iterdir())
    if size > CARRY_LIMIT:
        raise StageFailed(f"{wheelhouse} holds {size / 2**20:.0f} MiB, over the 64 MiB carry")
    return plan


def importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # its parent package is missing
        return False


def install_missing_wheels(runner: Runner, wheelhouse: Path,
                           site: Path = REPO / "build" / "gpu_site") -> str:
    """Dry run: check the wheelhouse. GPU: unpack the wheels of modules that do not import
    into build/gpu_site (no pip, no network, the machine's packages untouched) and put it on
    the stages' PYTHONPATH."""
    plan = wheelhouse_plan(wheelhouse)
    if runner.dry_run:
        return f"wheelhouse ok ({len(plan)} wheels for cp312 manylinux x86_64)"
    installed = []
    for module, wheel in plan:
        if not importable(module):
            with zipfile.ZipFile(wheel) as archive:
                archive.extractall(site)
            installed.append(wheel.name.split("-")[0])
    runner.env["PYTHONPATH"] = os.pathsep.join([str(site), runner.env["PYTHONPATH"]])
    return f"installed from {wheelhouse.name}/: {', '.join(installed) or 'nothing needed'}"


def stage_environment(runner: Runner) -> Result:
    wheels = install_missing_wheels(runner, runner.wheelhouse)
    info = runner.python(ENV_CODE)
    runner.info = info
    if not runner.dry_run and info["capability"] is None:
        raise StageFailed("no CUDA device visible to torch")
    cap = info["capability"]
    detail = (f"{info['device']}{f' (sm_{cap[0]}{cap[1]})' if cap else ''}; Python "
              f"{info['python']}, torch {info['torch']} (CUDA {info['cuda']}), megatron-core "
              f"{info['megatron_core']}, transformer-engine "
              f"{'importable' if info['te'] else 'absent'} (default --transformer-impl "
              f"{info['transformer_impl']}); {wheels}")
    return Result("environment", True, 0, detail)


def stage_kernels(runner: Runner) -> Result:
    info = runner.python(KERNELS_CODE)
    if info["reason"]:
        raise StageFailed(f"kernels unavailable: {info['reason']}")
    if info.get("arch_problem"):
        raise StageFailed(info["arch_problem"])
    failed = {k: v[0] for k, v in info["checks"].items() if v[0] != "passed"}
    if not info["checks"] or failed:
        raise StageFailed(f"self-check failed: {failed or 'not run'}")
    cost = max(v[1] for v in info["checks"].values())
    archs = f"built for {info['archs']}, " if info["archs"] else ""
    return Result("kernels", True, 0, f"{archs}load/build {info['build_seconds']:.0f} s; "
                  f"self-check passed on {info['device']} for {len(info['checks'])} "
                  f"dtype x mode pairs, at most {cost:.0f} ms each")


def stage_tests(runner: Runner) -> Result:
    missing = [path for path in OPS_TESTS if not (REPO / path).is_file()]
    if missing:
        raise StageFailed(f"missing {', '.join(missing)}")
    if runner.dry_run:  # the CI suite itself runs them (on CPU: the CUDA ones skip)
        return Result("tests", True, 0, f"{' '.join(OPS_TESTS)}: present (the suite runs them)")
    cmd = [sys.executable, "-m", "pytest", *OPS_TESTS, "-q", "-rs", "-p", "no:cacheprovider"]
    try:
        out = runner.run(cmd)
    except StageFailed as error:
        raise StageFailed(f"tests failed ({error})") from error
    summary = out.strip().splitlines()[-1]
    cuda_skips = [line for line in out.splitlines()
                  if line.startswith("SKIPPED") and "test_permute_cuda" in line]
    if cuda_skips:
        raise StageFailed(f"CUDA tests skipped: {cuda_skips[0]}")
    return Result("tests", True, 0, f"{' '.join(OPS_TESTS)}: {summary.strip('= ')}")


def stage_permute_bench(runner: Runner) -> Result:
    if runner.dry_run:
        args = ["--device", "cpu", "--tokens", "256", "--hidden", "16", "--experts", "4",
                "--topk", "2", "--dtypes", "fp32", "--rounds", "1", "--memory", "reuse"]
        impls = ["custom", "megatron", "reference"]
    else:
        args = ["--device", "cuda", "--dtypes", "bf16", "--rounds", "5"]
        impls = ["custom", "megatron", "reference"] + (["te-fused"] if runner.info["te"] else [])
    out = runner.run([sys.executable, "benchmarks/permute_bench.py", *args, "--impls", *impls])
    table = [line for line in out.splitlines() if line.startswith(("|", "#"))]
    rows = [line for line in table if line.startswith("| ") and line[2].isdigit()]
    if not rows:
        raise StageFailed("permute_bench printed no table")
    speedups = [cells(row)[-2] for row in rows]
    return Result("permute_bench", True, 0,
                  f"{len(rows)} shapes; custom speed-up vs megatron-core: {', '.join(speedups)}",
                  ["### Token permutation (benchmarks/permute_bench.py)", "", *table, ""])


def cells(row: str) -> list[str]:
    return [c.strip() for c in row.strip().strip("|").split("|")]


def small_model_args(device: str) -> list[str]:
    return ["--device", device, "--num-layers", "4", "--hidden-size", "128",
            "--num-attention-heads", "4", "--moe-ffn-hidden-size", "64", "--seq-length", "128",
            "--num-experts", "8", "--moe-router-topk", "2", "--routing", "path",
            "--path-block-size", "2", "--moe-token-dispatcher-type", "alltoall",
            "--micro-batch-size", "4", "--global-batch-size", "8", "--lr", "3e-3",
            "--lr-warmup-iters", "1", "--log-interval", "1", "--eval-iters", "1",
            "--eval-interval", "0"]


def stage_checkpoint(runner: Runner) -> Result:
    """World-1 torchrun (NCCL on GPU): 4 iterations saving at 2 and 4, then a run resumed
    from iteration 2, whose iterations 3 and 4 must repeat the first run's losses."""
    work = runner.out / "work" / "checkpoint"
    data = runner.python("import json; from megatron_pathmoe.data import prepare_demo_data; "
                         f"print(json.dumps(prepare_demo_data({str(work / 'data')!r})))")
    device = "cpu" if runner.dry_run else "cuda"
    base = ["torchrun", "--standalone", "--nproc-per-node", "1", "-m",
            "megatron_pathmoe.training.pretrain", *small_model_args(device),
            "--data-path", data["train_prefix"], "--valid-data-path", data["valid_prefix"],
            "--tokenizer-model", data["tokenizer"]]
    half = 1 if runner.dry_run else 2  # iterations before the checkpoint resumed from
    full, resumed = work / "full.json", work / "resumed.json"
    base += ["--train-iters", str(2 * half)]
    runner.run(base + ["--save", str(work / "ckpt"), "--save-interval", str(half),
                       "--summary-json", str(full)])
    runner.run(base + ["--load", str(work / "ckpt" / f"iter_{half:07d}"), "--summary-json",
                       str(resumed)])
    a, b = (json.loads(p.read_text()) for p in (full, resumed))
    if b["start_iteration"] != half:
        raise StageFailed(f"resumed at iteration {b['start_iteration']}, not {half}")
    pairs = list(zip(a["train_losses"][-half:], b["train_losses"][-half:]))
    diff = max(abs(x - y) / abs(x) for x, y in pairs)
    if len(pairs) != half or diff > 1e-5:
        raise StageFailed(f"resumed losses {b['train_losses']} != {a['train_losses'][-half:]}")
    return Result("checkpoint", True, 0,
                  f"world-1 torchrun ({'NCCL' if device == 'cuda' else 'gloo'}), {device}: "
                  f"{2 * half} iterations saving every {half}, resumed from {half}: losses of the "
                  f"last {half} {'bitwise equal' if diff == 0 else f'equal to {diff:.1e}'}")


def training_argv(runner: Runner, layers: int, iters: int, rounds: int) -> list[str]:
    argv = ["--train-iters", str(iters), "--repeats", str(rounds), "--variants", "path4",
            "--output-dir", str(runner.out / "work" / "training"), "--"]
    if runner.dry_run:  # the mechanics at toy width on CPU
        return argv + ["--device", "cpu", "--num-layers", "4", "--hidden-size", "64",
                       "--num-attention-heads", "4", "--num-query-groups", "2",
                       "--seq-length", "128", "--moe-ffn-hidden-size", "32", "--log-interval", "5"]
    return argv + ["--num-layers", str(layers), "--log-interval", "5"]


def losses_falling(losses: list[float]) -> bool:
    return bool(losses) and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


def stage_training(runner: Runner, layers: int, iters: int, rounds: int) -> Result:
    out_dir = runner.out / "work" / "training"
    runner.run([sys.executable, "benchmarks/paper_gpu.py",
                *training_argv(runner, layers, iters, rounds)])
    table = (out_dir / "results.md").read_text().strip().splitlines()
    runs = sorted(out_dir.glob("*_round*.json"))
    lines = ["| run | tokens/s/GPU | peak GiB | first loss | last loss | finite and falling |",
             "|---|---:|---:|---:|---:|---|"]
    bad = []
    for path in runs:
        s = json.loads(path.read_text())
        losses = s["train_losses"]
        ok = losses_falling(losses)
        bad += [] if ok else [path.stem]
        lines.append(f"| {path.stem} | {(s['tokens_per_second'] or 0) / s['world_size']:,.0f} | "
                     f"{s['peak_memory_gib']:.1f} | {losses[0]:.3f} | {losses[-1]:.3f} | "
                     f"{'yes' if ok else 'NO'} |")
    if bad:
        raise StageFailed(f"losses not finite and falling in {', '.join(bad)}")
    ratio = next((cells(row)[2] for row in table if row.startswith("| path4")), "?")
    return Result("training", True, 0,
                  f"{len(runs)} runs, {layers if not runner.dry_run else 4} layers x {iters} "
                  f"iterations; PathB4 / Indep-MoE tokens/s/GPU = {ratio}",
                  ["### 0.9B width, PathB4 vs Indep-MoE (benchmarks/paper_gpu.py)", "",
                   *table, "", *lines, ""])


def status(result: Result) -> str:
    return "skipped" if result.ok is None else "ok" if result.ok else "FAIL"


def render(results: list[Result], header: str) -> str:
    lines = [header, "", "| stage | result | seconds | detail |", "|---|---|---:|---|"]
    for r in results:
        lines.append(f"| {r.stage} | {status(r)} | {r.seconds:.0f} | {r.detail.replace('|', '/')} |")
    lines.append("")
    for r in results:
        lines += r.sections
    return "\n".join(lines) + "\n"


def table_problems(markdown: str) -> list[str]:
    """Format check of a rendered report: every stage once, and each table's rows with the
    header's number of cells."""
    problems, width = [], None
    stages = [cells(line)[0] for line in markdown.splitlines()
              if line.startswith("| ") and cells(line)[0] in STAGES]
    if sorted(stages) != sorted(STAGES):
        problems.append(f"stages {stages} != {list(STAGES)}")
    for number, line in enumerate(markdown.splitlines(), 1):
        if not line.startswith("|"):
            width = None
            continue
        n = len(cells(line))
        if width is None:
            width = n
        elif n != width:
            problems.append(f"line {number}: {n} cells, its table has {width}")
    return problems


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true",
                   help="CPU, tiny sizes: check the stages' commands and the table (CI)")
    p.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "runs" / "gpu_acceptance"),
                   help="where the table, the log and the runs go (default: $OUT, else "
                        "runs/gpu_acceptance)")
    p.add_argument("--wheelhouse", default=str(REPO / "wheelhouse"),
                   help="wheels from scripts/gpu_wheelhouse.sh (default: wheelhouse/)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for all stages together (default: 470, with --dry-run 900: "
                        "a loaded CPU machine is slow)")
    p.add_argument("--layers", type=int, default=8, help="0.9B-width layers (default: 8)")
    p.add_argument("--train-iters", type=int, default=30)
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds per variant")
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    args = p.parse_args(argv)
    if args.budget is None:
        args.budget = 900.0 if args.dry_run else 470.0
    if args.layers < 8 or args.layers % 4:
        p.error("--layers must be a multiple of 4 (PathB4 blocks), at least 8")
    return args


def run_stage(runner: Runner, name: str, args: argparse.Namespace) -> Result:
    runner.limit = STAGE_LIMITS[name] * (2 if args.dry_run else 1)  # CPU CI machines vary
    start = time.monotonic()
    if runner.remaining() < 20:
        return Result(name, None, 0, "no time left in --budget")
    try:
        if name == "training":
            result = stage_training(runner, args.layers, 10 if args.dry_run else args.train_iters,
                                    1 if args.dry_run else args.rounds)
        else:
            result = globals()[f"stage_{name}"](runner)
    except Exception as error:  # noqa: BLE001 - a stage's bug is a FAIL row, not a lost report
        result = Result(name, False, 0, f"{type(error).__name__}: {error}"
                        if not isinstance(error, StageFailed) else str(error))
    result.seconds = time.monotonic() - start
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / LOG).write_text("")
    runner = Runner(out, args.budget, args.dry_run)
    runner.wheelhouse = Path(args.wheelhouse)
    header = (f"## GPU acceptance{' (dry run on CPU)' if args.dry_run else ''}, "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    results = []
    for name in STAGES:
        result = (run_stage(runner, name, args) if name in args.stages
                  else Result(name, None, 0, "not in --stages"))
        results.append(result)
        print(f"gpu_acceptance: {name}: {status(result)} "
              f"({result.seconds:.0f} s) {result.detail}", flush=True)
        (out / TABLE).write_text(render(results, header))  # partial results survive a kill
    report = render(results, header)
    print(report, end="")
    problems = table_problems(report)
    if problems:
        print(f"gpu_acceptance: table format: {'; '.join(problems)}", file=sys.stderr)
    failed = [r.stage for r in results if r.ok is False]
    if failed:
        print(f"gpu_acceptance: FAILED stages: {', '.join(failed)} (log: {out / LOG})",
              file=sys.stderr)
    return 1 if failed or problems else 0


if __name__ == "__main__":
    sys.exit(main())
