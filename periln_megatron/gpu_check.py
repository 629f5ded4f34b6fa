"""`make gpu-check` (tools/gpu_smoke.py): what the CPU tests cannot run, a few steps each, launched
as users launch (periln-launch, the paper recipes' flags with a small shape).

On a GPU node (inside the image, from the mounted checkout; see docs/gpu_check.md):
- the te backend per placement in bf16, and FP8 (delayed, tensorwise) where TE and the GPU allow;
- agreement: te vs local (bf16) and FP8 vs bf16 losses within TE_VS_LOCAL and FP8_VS_BF16;
- periln-params --memory against torch.cuda.max_memory_allocated;
- `pytest -m gpu` (the GPU-only tests);
- te <-> local resume; checkpoint (te, bf16) -> Hugging Face -> transformers parity;
- on 2 GPUs: DP=2 with the paper flags (bf16, distributed optimizer, both overlaps, several DDP
  buckets, fully_parallel save, checkpoint.async_save), stopped after its first step and resumed
  (losses equal the uninterrupted run's within RESUME), exported to HF; PP=2 against PP=1 and
  TP=2+SP against TP=1 (within PARALLEL).
With `device="cpu"` the checks that need neither CUDA nor TE run on the local backend under gloo:
the same DP=2, PP=2 and TP=2 runs and comparisons, so the tool itself is tested in CI
(tests/test_gpu_check.py). Every check prints PASS, FAIL or SKIP with its reason. Each invocation
writes into a fresh directory (`<out>/<timestamp>`): a rerun never resumes an earlier one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from periln_megatron.config import combine_overrides
from periln_megatron.config.choices import BACKENDS
from periln_megatron.training.metrics import MetricsError, read_metrics, series

REPO = Path(__file__).resolve().parents[1]
RECIPES = {"peri": "recipes/peri_ln/400m.yaml", "pre": "recipes/pre_ln/400m.yaml", "post": "recipes/post_ln/400m.yaml"}
# The paper recipe's flags (bf16, distributed optimizer, both overlaps); a small shape.
BASE = ["model.num_layers=4", "model.hidden_size=256", "model.num_attention_heads=8", "model.ffn_hidden_size=704",
        "model.seq_length=256", "train.steps=6", "train.global_batch_size=8", "train.micro_batch_size=2",
        "train.eval_interval=0", "optim.warmup_steps=1", "data.prefixes=[]", "data.synthetic=true",
        "tokenizer.type=null", "tokenizer.model=null", "tokenizer.vocab_size=null", "model.vocab_size=4096",
        "checkpoint.interval=3", "diagnostics.interval=3", "logging.tensorboard=false", "logging.interval=1",
        "parallel.tp=1",
        "parallel.pp=1", "parallel.sequence_parallel=false"]
# The 400M recipe's width at 4 layers: big enough (~4 GiB) that the estimate's terms dominate.
MEMORY_SHAPE = ["model.num_layers=4", "model.hidden_size=1024", "model.num_attention_heads=16",
                "model.ffn_hidden_size=2816", "model.seq_length=2048", "train.micro_batch_size=4",
                "train.global_batch_size=8", "model.vocab_size=32768", "train.steps=3", "diagnostics.interval=0"]
# Tolerances, in nats of training loss at any of the 6 steps (the loss starts near ln 4096 = 8.3).
MEMORY_TOLERANCE = 0.15  # |estimate / measured - 1|; CPU runs agree to 3% (tests/test_efficiency.py)
TE_VS_LOCAL = 0.05  # bf16: flash vs unfused attention, fused norm+linear: rounding differs
FP8_VS_BF16 = 0.15  # FP8 GEMMs with per-tensor scales against bf16
PARALLEL = 2e-3  # TP=2+SP, PP=2 against one rank: the same math in another reduction order
RESUME = 2e-3  # a resumed run against the uninterrupted one (bitwise on CPU; GPU kernels may not be)
MULTI_BUCKET = "parallel.ddp_bucket_size=1000000"  # ~5 buckets of the 5.2M-parameter BASE model
STOP_AFTER_FIRST_STEP = ("--exit-after-minutes", "1e-4")  # saves after step 1 and exits 75


# How a check starts a process: (argv after `python`, nproc or None, environment) -> (exit status, output).
Launcher = Callable[[list[str], "int | None", dict], tuple[int, str]]


def launch_process(argv: list[str], nproc: int | None, env: dict) -> tuple[int, str]:
    """`python ARGV` from the checkout; with `nproc`, ARGV (`-m MODULE ...`) on nproc ranks through
    periln-launch (torchrun), as users launch, with periln-launch's exit status."""
    launcher = [sys.executable] if nproc is None else [sys.executable, "-m", "periln_megatron.launch", "--standalone",
                                                       f"--nproc_per_node={nproc}"]
    proc = subprocess.run([*launcher, *argv], cwd=REPO, capture_output=True, text=True, env=env)
    return proc.returncode, proc.stdout + proc.stderr


@dataclass
class Run:
    name: str
    code: int
    log: str
    run_dir: Path
    losses: dict[int, float] = field(default_factory=dict)
    records: dict[int, dict] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.code == 0 and bool(self.losses) and all(map(math.isfinite, self.losses.values()))


class GpuCheck:
    def __init__(self, out: Path, device: str = "gpu", extra_sets: list[str] | None = None, echo=print,
                 launch: Launcher = launch_process):
        self.out = out
        self.launch = launch
        self.device = device
        self.extra = list(extra_sets or [])
        self.echo = echo
        self.results: list[tuple[str, str, str]] = []
        self.runs: dict[str, Run] = {}

    def record(self, name: str, status: str, detail: str) -> None:
        self.results.append((name, status, detail))
        self.echo(f"{status:4}  {name}: {detail}")

    @property
    def failed(self) -> list[str]:
        return [name for name, status, _ in self.results if status == "FAIL"]

    # ------------------------------------------------------------------ running the trainer

    def train(self, name: str, recipe: str, sets: list[str], nproc: int = 1, run_dir: Path | None = None,
              args: tuple[str, ...] = ()) -> Run:
        """One trainer run through periln-launch (which sets what the ranks need, e.g.
        CUDA_DEVICE_MAX_CONNECTIONS for TP), in its own directory unless `run_dir` continues one."""
        run_dir = run_dir or self.out / name
        cpu = ["model.backend=local"] if self.device == "cpu" else []
        argv = ["-m", "periln_megatron.train", *args, "--recipe", recipe, "--set",
                *combine_overrides(BASE, sets, cpu, self.extra, [f"checkpoint.dir={run_dir}"])]
        env = self.environment()
        if self.device == "cpu":
            env.setdefault("OMP_NUM_THREADS", "1")
        code, log = self.launch(argv, nproc, env)
        (self.out / f"{name}.log").write_text(log)
        try:
            records = read_metrics(run_dir)
        except MetricsError:
            records = {}
        run = Run(name, code, log, run_dir, series(records, "loss"), records)
        self.runs[name] = run
        return run

    @staticmethod
    def environment(**extra: str) -> dict:
        return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
                **extra}

    def check_training(self, name: str, recipe: str, sets: list[str], nproc: int = 1) -> Run | None:
        started = time.monotonic()
        run = self.train(name, recipe, sets, nproc)
        if not run.ok:
            self.record(name, "FAIL", f"exit {run.code}, losses {list(run.losses.values())}; log "
                                      f"{self.out / (name + '.log')}: {run.log[-400:]!r}")
            return None
        first, last = run.losses[min(run.losses)], run.losses[max(run.losses)]
        self.record(name, "PASS", f"{len(run.losses)} steps, loss {first:.4f} -> {last:.4f}, "
                                  f"{time.monotonic() - started:.0f} s")
        return run

    def common_start(self, name: str, sets: list[str], nproc: int = 1) -> Run | None:
        """A run stopped (and saved) after its first step: variants resumed from copies of it start
        from the same weights (megatron initialises each pipeline stage and, on a GPU, each TP rank
        from its own seed, so separately initialised layouts never train alike)."""
        run = self.train(name, RECIPES["peri"], sets, nproc, args=STOP_AFTER_FIRST_STEP)
        if run.code != 75 or 1 not in run.losses:
            self.record(name, "FAIL", f"expected a save after step 1 and exit 75, got exit {run.code}: {run.log[-400:]!r}")
            return None
        return run

    def resumed(self, start: Run | None, name: str, sets: list[str], nproc: int = 1) -> Run | None:
        """A copy of `start`'s directory trained on with `sets` (another layout, backend or precision)."""
        if start is None:
            self.record(name, "FAIL", "its common start failed")
            return None
        shutil.copytree(start.run_dir, self.out / name)
        started = time.monotonic()
        run = self.train(name, RECIPES["peri"], sets, nproc, run_dir=self.out / name)
        if not (run.ok and "resumed from iteration 1" in run.log):
            self.record(name, "FAIL", f"exit {run.code}, losses {list(run.losses.values())}; log "
                                      f"{self.out / (name + '.log')}: {run.log[-400:]!r}")
            return None
        self.record(name, "PASS", f"resumed at step 1, loss {run.losses[max(run.losses)]:.4f} at step "
                                  f"{max(run.losses)}, {time.monotonic() - started:.0f} s")
        return run

    def compare(self, name: str, a: Run | None, b: Run | None, tolerance: float, what: str) -> None:
        if a is None or b is None:
            self.record(name, "FAIL", f"a run it compares failed ({what})")
            return
        steps = sorted(set(a.losses) & set(b.losses))
        if not steps:
            self.record(name, "FAIL", f"no common steps ({what})")
            return
        worst = max(abs(a.losses[s] - b.losses[s]) for s in steps)
        self.record(name, "PASS" if worst <= tolerance else "FAIL",
                    f"max |loss {what}| = {worst:.2e} over {len(steps)} steps (tolerance {tolerance:g})")

    # ------------------------------------------------------------------ checks

    def te_backend(self) -> None:
        """Each placement on the te backend in bf16; then, from one local checkpoint, te against
        local (which also resumes a local checkpoint into te)."""
        for placement, recipe in RECIPES.items():
            self.check_training(f"{placement}-te-bf16", recipe, ["model.backend=te"])
        start = self.common_start("local-start", ["model.backend=local"])
        local = self.resumed(start, "local-to-local", ["model.backend=local"])
        te = self.resumed(start, "local-to-te", ["model.backend=te"])
        self.compare("te-vs-local", te, local, TE_VS_LOCAL, "te - local, bf16")

    def fp8(self) -> None:
        """Each placement in FP8 (delayed, tensorwise); from one bf16 te checkpoint, FP8 against bf16."""
        ok, reason = fp8_support()
        recipes = ("delayed", "tensorwise")
        if not ok:
            for name in [f"{p}-te-fp8-{r}" for p in RECIPES for r in recipes] + [f"fp8-{r}-vs-bf16" for r in recipes]:
                self.record(name, "SKIP", f"FP8 not supported here: {reason}")
            return
        for placement, recipe in RECIPES.items():
            for fp8_recipe in recipes:
                self.check_training(f"{placement}-te-fp8-{fp8_recipe}", recipe,
                                    ["model.backend=te", "precision.preset=fp8", f"precision.fp8_recipe={fp8_recipe}"])
        start = self.common_start("te-bf16-start", ["model.backend=te"])
        bf16 = self.resumed(start, "te-bf16-to-bf16", ["model.backend=te"])
        for fp8_recipe in recipes:
            fp8 = self.resumed(start, f"te-bf16-to-fp8-{fp8_recipe}", ["model.backend=te", "precision.preset=fp8",
                                                                      f"precision.fp8_recipe={fp8_recipe}"])
            self.compare(f"fp8-{fp8_recipe}-vs-bf16", fp8, bf16, FP8_VS_BF16, f"fp8 {fp8_recipe} - bf16")

    def memory_estimate(self) -> None:
        """periln-params --memory's estimate against the trainer's logged max_memory_allocated."""
        from periln_megatron.config import load_recipe
        from periln_megatron.model.memory import estimate
        from periln_megatron.model.specs import HAVE_TE
        from periln_megatron.model.build import fusion_kernels

        for backend in reversed(BACKENDS):  # te first
            name = f"memory-estimate-{backend}"
            sets = [f"model.backend={backend}", *MEMORY_SHAPE]
            run = self.train(name, RECIPES["peri"], sets)
            measured = max((r.get("max_memory_allocated_gib", 0.0) for r in run.records.values()), default=0.0)
            if run.code != 0 or not measured:
                self.record(name, "FAIL", f"exit {run.code}, no max_memory_allocated_gib logged: {run.log[-400:]!r}")
                continue
            recipe = load_recipe(REPO / RECIPES["peri"], combine_overrides(BASE, sets, [f"checkpoint.dir={run.run_dir}"]),
                                 check_environment=False)
            est = estimate(recipe, 1, device="gpu", have_te=HAVE_TE, have_apex=fusion_kernels()["have_apex"]).peak.total
            ratio = est / (measured * 2**30)
            self.record(name, "PASS" if abs(ratio - 1) <= MEMORY_TOLERANCE else "FAIL",
                        f"estimate {est / 2**30:.2f} GiB, max_memory_allocated {measured:.2f} GiB "
                        f"(ratio {ratio:.2f}, tolerance {MEMORY_TOLERANCE:.0%})")

    def gpu_tests(self) -> None:
        code, log = self.launch(["-m", "pytest", "-q", "-rs", "-m", "gpu", "tests"], None, self.environment())
        (self.out / "pytest-gpu.log").write_text(log)
        summary = (log.strip().splitlines() or ["no output"])[-1]
        self.record("pytest -m gpu", "PASS" if code == 0 else "FAIL", summary)

    def backend_resume(self) -> None:
        """A te checkpoint resumes on the local backend (local -> te: te_backend)."""
        self.resumed(self.common_start("te-start", ["model.backend=te"]), "te-to-local", ["model.backend=local"])

    def data_parallel_paper_flags(self) -> None:
        """DP=2 as the paper recipes run (plus several DDP buckets and async save): stopped after one
        step and resumed, compared with the uninterrupted run, then exported to Hugging Face."""
        sets = [MULTI_BUCKET, "checkpoint.async_save=true"]
        whole = self.check_training("dp2-paper-flags", RECIPES["peri"], sets, nproc=2)
        name = "dp2-paper-flags-resume"
        first = self.common_start(name, sets, nproc=2)
        resumed = self.resumed(first, name + "-2", sets, nproc=2)
        self.compare(name, resumed, whole, RESUME, "resumed - uninterrupted")
        if whole is not None:
            self.hf_parity("dp2-paper-flags-to-hf", whole.run_dir)

    def model_parallel(self) -> None:
        """From one checkpoint (resharded on load), PP=2 and TP=2+SP against one rank, in fp32
        without the distributed optimizer: what differs is only where the layout splits the math."""
        fp32 = ["precision.preset=fp32", "parallel.distributed_optimizer=false", "parallel.overlap_grad_reduce=false",
                "parallel.overlap_param_gather=false", "train.global_batch_size=4"]
        start = self.common_start("fp32-start", fp32)
        one = self.resumed(start, "fp32-one-rank", fp32)
        pp = self.resumed(start, "fp32-pp2", [*fp32, "parallel.pp=2"], nproc=2)
        tp = self.resumed(start, "fp32-tp2-sp", [*fp32, "parallel.tp=2", "parallel.sequence_parallel=true"], nproc=2)
        self.compare("pp2-vs-pp1", pp, one, PARALLEL, "PP=2 - PP=1")
        self.compare("tp2-sp-vs-tp1", tp, one, PARALLEL, "TP=2+SP - TP=1")

    def hf_parity(self, name: str, run_dir: Path) -> None:
        """Checkpoint -> convert_to_hf -> transformers, against megatron in fp32 on the CPU."""
        hf_dir = self.out / f"{name}-hf"
        code, log = self.launch(["tools/convert_to_hf.py", str(run_dir), str(hf_dir)], None, self.environment())
        if code != 0:
            self.record(name, "FAIL", log[-600:])
            return
        result_file = self.out / f"{name}.json"
        latest = int((run_dir / "latest_checkpointed_iteration.txt").read_text())
        code, log = self.launch(["tests/workers/hf_parity.py", str(run_dir / f"iter_{latest:07d}"), str(hf_dir),
                                 str(result_file)], None, self.environment(CUDA_VISIBLE_DEVICES=""))
        if code != 0:
            self.record(name, "FAIL", log[-400:])
            return
        r = json.loads(result_file.read_text())
        good = r["max_abs_diff"] <= 1e-4 and r["megatron_greedy"] == r["hf_greedy"]
        self.record(name, "PASS" if good else "FAIL", f"{r['arch']}: max |logit diff| {r['max_abs_diff']:.2e}, "
                                                      f"greedy equal: {r['megatron_greedy'] == r['hf_greedy']}")

    # ------------------------------------------------------------------ the plan

    def run_all(self) -> None:
        import torch

        from periln_megatron.model.specs import HAVE_TE

        if self.device == "cpu":
            gpus = 2
            self.record("device", "PASS", "CPU rehearsal: local backend under gloo; te, FP8, memory and -m gpu skipped")
        else:
            if not torch.cuda.is_available():
                self.record("all", "SKIP", "no CUDA GPU")
                return
            if not HAVE_TE:
                self.record("all", "SKIP", "Transformer Engine is not importable")
                return
            gpus = torch.cuda.device_count()
            self.record("device", "PASS", f"{gpus} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
            self.te_backend()
            self.fp8()
            self.memory_estimate()
            self.gpu_tests()
            self.backend_resume()
            if self.runs["peri-te-bf16"].ok:
                self.hf_parity("te-checkpoint-to-hf", self.runs["peri-te-bf16"].run_dir)
        if gpus < 2:
            for name in ("dp2-paper-flags", "pp2-vs-pp1", "tp2-sp-vs-tp1"):
                self.record(name, "SKIP", "needs 2 GPUs")
            return
        self.data_parallel_paper_flags()
        self.model_parallel()

    def markdown(self) -> str:
        rows = "\n".join(f"| {n} | {s} | {d.replace('|', '/')} |" for n, s, d in self.results)
        return (f"# GPU check ({time.strftime('%Y-%m-%d')}, `python tools/gpu_smoke.py`, device {self.device})\n\n"
                f"| check | status | detail |\n|---|---|---|\n{rows}\n")


def check_checkout() -> str | None:
    """The checks read recipes/ and tests/ of a checkout: None if this package is one's, else why not."""
    missing = [p for p in ("recipes/peri_ln/400m.yaml", "tests/workers/hf_parity.py") if not (REPO / p).is_file()]
    if missing:
        return (f"periln_megatron is imported from {REPO}, not a checkout (no {', '.join(missing)}): run from the "
                "checkout with PYTHONPATH=<checkout> (make gpu-check does)")
    return None


def fp8_support() -> tuple[bool, str]:
    try:
        from transformer_engine.pytorch.fp8 import check_fp8_support
    except ImportError as e:
        return False, f"Transformer Engine has no FP8 support check ({e})"
    ok, reason = check_fp8_support()
    return ok, reason or "supported"


def fresh_dir(root: Path) -> Path:
    """A new directory under `root` for this invocation's runs."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(100):
        path = root / (stamp if n == 0 else f"{stamp}-{n}")
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"{root}: no fresh directory for {stamp}")
