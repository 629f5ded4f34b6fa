#!/usr/bin/env python
"""Checkpoint save/load benchmark: checkpoint.format fully_parallel vs gathered, side by side.

    python benchmarks/bench_checkpoint.py [--recipe recipes/peri_ln/400m.yaml] [--nproc 2]
        [--set model.num_layers=4 ...] [--formats fully_parallel gathered] [--workdir DIR] [--keep]

For each format, two torchrun launches of the real trainer (periln_megatron.train, CPU, gloo),
with checkpoint.save / checkpoint.load wrapped by a meter:
  1. train two steps with a checkpoint after each; the second save is the one reported (the first
     in a process also starts megatron-core's writer-results manager, a spawned interpreter: its
     wall time is listed separately);
  2. a fresh launch resumes from the second checkpoint: the load is measured (and the optimizer
     state it loaded is compared with what was saved: per-rank float64 sums of every tensor).
Per rank the meter samples, every 5 ms, the rank's RSS plus the private memory (USS) of the writer
processes megatron-core forks during a save (their shared, copy-on-write pages are the rank's own).
"extra" is the peak minus the value just before the call. "share" is what the rank holds of model
and optimizer state: its model parameters plus its distributed-optimizer shard (fp32 params and
both Adam moments). The workers run with MALLOC_MMAP_THRESHOLD_=131072 so that freed tensors go
back to the OS and RSS measures what is live.

Before each launch the benchmark estimates the memory the launch needs from the parameter count and
skips it (saying so) when /proc/meminfo's MemAvailable is short: at the 400M shape the gathered
format needs more than a 24 GiB machine has; `--set model.num_layers=N` keeps the 400M layer and
vocabulary shapes with fewer layers.
Results (a Markdown table) go to stdout; benchmarks/RESULTS_checkpoint.md records a run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASE_OVERRIDES = [
    "model.backend=local", "data.synthetic=true", "data.prefixes=[]", "tokenizer.type=null", "tokenizer.model=null",
    "tokenizer.vocab_size=null", "model.vocab_size=100277", "model.seq_length=64", "train.steps=2",
    "train.micro_batch_size=1", "train.eval_interval=0", "diagnostics.interval=0", "logging.tensorboard=false",
    "checkpoint.interval=1", "checkpoint.keep=1", "optim.warmup_steps=0",
]
GIB = 2**30


# ------------------------------------------------------------------------------ the meter (in each rank)

def _private_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return sum(int(line.split()[1]) for line in f if line.startswith(("Private_Clean:", "Private_Dirty:")))
    except OSError:
        return 0


def _children(pid: int) -> list[int]:
    out = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out + [g for c in out for g in _children(c)]


def _cmd(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        return f"{pid}: {cmdline[:120]}"
    except OSError:
        return f"{pid}: ?"


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Meter:
    """Peak of (own RSS + writer children's USS) while running, sampled from a thread."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak, self.peak_rss, self.peak_children = interval, 0, 0, 0
        self.at_peak: dict = {}
        self._stop = threading.Event()

    def sample(self) -> int:
        rss = _rss_kib()
        per_child = {c: _private_kib(c) for c in _children(os.getpid())}
        children = sum(per_child.values())
        self.peak_rss, self.peak_children = max(self.peak_rss, rss), max(self.peak_children, children)
        if rss + children > self.peak:
            self.peak = rss + children
            self.at_peak = {"rss_kib": rss, "children_uss_kib": {_cmd(c): kib for c, kib in per_child.items()}}
        return rss + children

    def __enter__(self):
        self.before = self.sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(self.interval):
            self.sample()

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.sample()


def _state_bytes(chunks, optimizer) -> dict:
    """What this rank holds: model parameters, and the optimizer's shard (fp32 params that are not
    views of the model's, Adam moments)."""
    import torch

    from periln_megatron.checkpoint.optimizer_state import _torch_adams

    params = {id(p): p for chunk in chunks for p in chunk.parameters()}
    model_storages = {p.untyped_storage().data_ptr() for p in params.values()}
    ddp_storages = set()
    for chunk in chunks:
        for buffer in getattr(chunk, "buffers", []):
            if buffer.param_data is not None:
                ddp_storages.add(buffer.param_data.untyped_storage().data_ptr())
    model = sum(p.numel() * p.element_size() for p in params.values())
    optim = 0
    for adam in _torch_adams(optimizer):
        for group in adam.param_groups:
            for p in group["params"]:
                if p.untyped_storage().data_ptr() not in model_storages | ddp_storages:
                    optim += p.numel() * p.element_size()
                for key, value in adam.state[p].items():
                    if key != "step" and isinstance(value, torch.Tensor):
                        optim += value.numel() * value.element_size()
    return {"model_bytes": model, "optimizer_bytes": optim}


def _optimizer_sums(optimizer) -> list[float]:
    import torch

    from periln_megatron.checkpoint.optimizer_state import _torch_adams

    sums = []
    for adam in _torch_adams(optimizer):
        for group in adam.param_groups:
            for p in group["params"]:
                sums.append(p.detach().double().sum().item())
                for key in ("exp_avg", "exp_avg_sq"):
                    sums.append(adam.state[p][key].double().sum().item())
    return sums


def worker(out: Path, train_args: list[str]) -> int:
    """One rank: the trainer, with checkpoint.save/load measured."""
    import torch

    from periln_megatron import checkpoint
    from periln_megatron.cli import train_main

    calls = {"save": 0, "load": 0}

    def measured(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            import gc

            gc.collect()
            chunks, optimizer = args[2:4] if name == "save" else args[1:3]
            held_before = _state_bytes(chunks, optimizer)
            torch.distributed.barrier()
            with Meter() as meter:
                started = time.perf_counter()
                result = fn(*args, **kwargs)
                torch.distributed.barrier()
                wall = time.perf_counter() - started
            record = {"op": name, "call": calls[name], "rank": torch.distributed.get_rank(), "wall_s": wall,
                      "before_kib": meter.before, "peak_kib": meter.peak, "peak_rss_kib": meter.peak_rss,
                      "peak_children_uss_kib": meter.peak_children, "at_peak": meter.at_peak,
                      **_state_bytes(chunks, optimizer),
                      "optimizer_bytes_before": held_before["optimizer_bytes"],
                      "optimizer_sums": _optimizer_sums(optimizer)}
            (out / f"{name}{calls[name]}_rank{record['rank']}.json").write_text(json.dumps(record))
            return result
        return wrapper

    checkpoint.save = measured("save", checkpoint.save)
    checkpoint.load = measured("load", checkpoint.load)
    return train_main(train_args)


# ------------------------------------------------------------------------------ the driver

def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _params(recipe_path: str, override_groups: list[list[str]], nproc: int) -> tuple[int, object]:
    from periln_megatron.config import combine_overrides, load_recipe
    from periln_megatron.model.param_count import count_parameters

    recipe = load_recipe(recipe_path, combine_overrides(*override_groups), world_size=nproc, check_environment=False)
    return count_parameters(recipe, recipe.padded_vocab_size())["total"], recipe


def _estimate(fmt: str, op: str, n: int, dp: int, largest: int) -> int:
    """Bytes a launch needs on this machine, all ranks together (bf16 weights, fp32 grads and
    optimizer), from bytes per parameter measured by this benchmark (91M parameters, DP=2, both
    formats), rounded up. Per rank at rest: 2N weights + 4N grads + 12N/DP optimizer + 1 GiB
    (interpreter, libraries, one training step). During a save, fully_parallel adds the copies of
    what it writes that are views: its 1/DP of the bf16 model tensors (2N/DP) and the parameters
    split between two ranks (at most 12 bytes x the two embeddings' elements); gathered adds about
    26N on DP rank 0 and 20N on each other rank (the gathered fp32 params and moments, and rank 0's
    copies of them). During a load, fully_parallel adds 12N/DP per rank (its Adam state), gathered
    20N per rank (the whole tensors). `largest`: the largest parameter's elements."""
    rest = dp * (6 * n + 12 * n // dp + GIB)
    if fmt == "gathered":
        return rest + (26 * n + 20 * n * (dp - 1) if op == "save" else 20 * n * dp)
    return rest + (2 * n + 24 * largest if op == "save" else 12 * n)


def _launch(nproc: int, args: list[str], log: Path, timeout: float) -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "MALLOC_MMAP_THRESHOLD_": "131072"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={port}", __file__, "--worker", *args]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            return 124


def _records(out: Path, op: str, nproc: int) -> list[dict] | None:
    files = [out / f"{op}_rank{r}.json" for r in range(nproc)]  # op: save1, save2, load1
    return [json.loads(f.read_text()) for f in files] if all(f.is_file() for f in files) else None


def _written_by_rank(directory: Path) -> dict[int, int]:
    from torch.distributed.checkpoint import FileSystemReader

    written: dict[int, int] = {}
    for info in FileSystemReader(str(directory)).read_metadata().storage_data.values():
        rank = int(info.relative_path.split("_")[2])  # __<rank>_<n>.distcp
        written[rank] = written.get(rank, 0) + info.length
    return written


def run_format(fmt: str, args, n: int, dp: int, largest: int, work: Path) -> dict:
    out = work / fmt
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    ckpt = out / "ckpt"
    from periln_megatron.config import combine_overrides

    train = ["--recipe", args.recipe, "--set", *combine_overrides(BASE_OVERRIDES, args.set, [
        f"checkpoint.dir={ckpt}", f"checkpoint.format={fmt}", f"train.global_batch_size={dp}"])]
    result = {"format": fmt}
    for op in ("save", "load"):
        launch_ops = ["save1", "save2"] if op == "save" else ["load1"]
        need, have = _estimate(fmt, op, n, dp, largest), _mem_available()
        if need > have - int(args.headroom_gib * GIB):
            result["skipped"] = (f"{op}: needs about {need / GIB:.1f} GiB, MemAvailable {have / GIB:.1f} GiB "
                                 f"(headroom {args.headroom_gib} GiB)")
            print(f"[{fmt}] skipped: {result['skipped']}", flush=True)
            return result
        started = time.monotonic()
        code = _launch(args.nproc, ["--out", str(out), "--", *train], out / f"{op}.log", args.timeout)
        print(f"[{fmt}] {op} launch: exit {code} in {time.monotonic() - started:.0f}s ({out / f'{op}.log'})",
              flush=True)
        records = {name: _records(out, name, args.nproc) for name in launch_ops}
        if code != 0 or None in records.values():
            tail = (out / f"{op}.log").read_text()[-3000:]
            raise SystemExit(f"[{fmt}] {op} failed (exit {code}):\n{tail}")
        result[op] = records[launch_ops[-1]]  # the steady state: a save after the first one
        if op == "save":
            result["first_save"] = records["save1"]
            iteration = ckpt / "iter_0000002"
            result["written"] = _written_by_rank(iteration)
            result["disk_bytes"] = sum(f.stat().st_size for f in iteration.iterdir())
    result["state_identical"] = all(s["optimizer_sums"] == l["optimizer_sums"]
                                    for s, l in zip(result["save"], result["load"]))
    if not args.keep:
        shutil.rmtree(ckpt, ignore_errors=True)
    return result


def _gib(kib: float) -> str:
    return f"{kib / 2**20:.2f}"


def report(results: list[dict], n: int, args, dp: int) -> str:
    lines = [f"recipe {args.recipe} + {' '.join(args.set) or '(no extra overrides)'}; "
             f"{n / 1e6:.0f}M parameters; DP={dp} on CPU (gloo), bf16", ""]
    head = ("| format | rank | share GiB | save: extra GiB | extra/share | wall s | written GiB | "
            "load: extra GiB | of which new Adam state | wall s |")
    lines += [head, "|---" * 10 + "|"]
    done = [r for r in results if "skipped" not in r]
    for r in results:
        if "skipped" in r:
            lines.append(f"| {r['format']} | - | skipped: {r['skipped']} | | | | | | | |")
            continue
        for s, l in zip(r["save"], r["load"]):
            share = (s["model_bytes"] + s["optimizer_bytes"]) / 1024
            extra_s, extra_l = s["peak_kib"] - s["before_kib"], l["peak_kib"] - l["before_kib"]
            lines.append(f"| {r['format']} | {s['rank']} | {_gib(share)} | {_gib(extra_s)} | {extra_s / share:.2f} | "
                         f"{s['wall_s']:.1f} | {r['written'].get(s['rank'], 0) / GIB:.2f} | {_gib(extra_l)} | "
                         f"{(l['optimizer_bytes'] - l['optimizer_bytes_before']) / GIB:.2f} | {l['wall_s']:.1f} |")
    lines.append("")
    for r in done:
        lines.append(f"- {r['format']}: checkpoint {r['disk_bytes'] / GIB:.2f} GiB on disk; optimizer state after "
                     f"the load {'identical to' if r['state_identical'] else 'DIFFERENT from'} the saved one "
                     f"(per-rank float64 sums)")
    by = {r["format"]: r for r in done}
    if "fully_parallel" in by and "gathered" in by:
        new, old = by["fully_parallel"], by["gathered"]

        def worst(r, op, key):
            return max(x[key] - x["before_kib"] if key == "peak_kib" else x[key] for x in r[op])

        lines += ["", "fully_parallel / gathered, same run (max over ranks):", ""]
        for op in ("save", "load"):
            lines.append(f"- {op}: peak extra memory {_gib(worst(new, op, 'peak_kib'))} / "
                         f"{_gib(worst(old, op, 'peak_kib'))} GiB = "
                         f"**{worst(new, op, 'peak_kib') / worst(old, op, 'peak_kib'):.2f}x**; wall time "
                         f"{worst(new, op, 'wall_s'):.1f} / {worst(old, op, 'wall_s'):.1f} s = "
                         f"**{worst(new, op, 'wall_s') / worst(old, op, 'wall_s'):.2f}x**")
        lines.append(f"- first save in a process (wall, includes starting megatron-core's writer manager): "
                     f"{worst(new, 'first_save', 'wall_s'):.1f} / {worst(old, 'first_save', 'wall_s'):.1f} s")
        lines.append(f"- save, largest bytes written by one rank: {max(new['written'].values()) / GIB:.2f} / "
                     f"{max(old['written'].values()) / GIB:.2f} GiB = "
                     f"**{max(new['written'].values()) / max(old['written'].values()):.2f}x**")
    return "\n".join(lines)


def main() -> int:
    if "--worker" in sys.argv:
        i = sys.argv.index("--")
        out = Path(sys.argv[sys.argv.index("--out") + 1])
        return worker(out, sys.argv[i + 1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="recipes/peri_ln/400m.yaml")
    parser.add_argument("--nproc", type=int, default=2, help="ranks (data parallel; the recipe's tp/pp apply)")
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="extra recipe overrides, e.g. model.num_layers=4")
    parser.add_argument("--formats", nargs="+", default=["fully_parallel", "gathered"],
                        choices=["fully_parallel", "gathered"])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench_checkpoint"))
    parser.add_argument("--headroom-gib", type=float, default=2.0,
                        help="memory left to the machine's other users when deciding to skip a launch")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    args = parser.parse_args()

    n, recipe = _params(args.recipe, [BASE_OVERRIDES, args.set], args.nproc)
    p = recipe.parallel
    dp = args.nproc // (p.tp * p.pp * p.cp)
    print(f"{args.recipe}: {n / 1e6:.0f}M parameters, {args.nproc} ranks, DP={dp}", flush=True)
    largest = recipe.padded_vocab_size() * recipe.model.hidden_size // p.tp
    results = [run_format(fmt, args, n, dp, largest, args.workdir) for fmt in args.formats]
    print()
    print(report(results, n, args, dp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
