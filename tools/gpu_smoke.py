#!/usr/bin/env python3
"""GPU check of the paths CPU tests cannot run (periln_megatron/gpu_check.py): the Transformer
Engine backend, bf16 and FP8 and their agreement with the local backend and bf16, DP=2 with the
paper flags and async save (stopped, resumed, exported), PP=2 and TP=2+SP against one rank,
`pytest -m gpu`, te <-> local checkpoints, checkpoint -> Hugging Face.

    make gpu-check                      # inside the image, from the mounted checkout (docs/gpu_check.md)
    python tools/gpu_smoke.py [--out runs/gpu_smoke] [--record benchmarks/RESULTS_gpu_smoke.md]
    python tools/gpu_smoke.py --device cpu   # the checks that need no GPU, on the local backend

Every check prints PASS, FAIL or SKIP with the reason. Each invocation writes a fresh directory
under --out. Exit status 1 if any check failed, else 0.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from periln_megatron.gpu_check import REPO, GpuCheck, Launcher, check_checkout, fresh_dir, launch_process


def main(argv: list[str] | None = None, launch: Launcher = launch_process) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "gpu_smoke",
                        help="each invocation writes its runs and logs to a new <out>/<timestamp>/")
    parser.add_argument("--record", type=Path, help="also write the results as a Markdown table to this file")
    parser.add_argument("--device", choices=("gpu", "cpu"), default="gpu",
                        help="cpu: rehearse the checks that need no GPU (local backend, gloo)")
    parser.add_argument("--set", dest="extra", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="extra recipe overrides for every run (after the check's own)")
    args = parser.parse_args(argv)
    problem = check_checkout()
    if problem:
        print(f"gpu-check: error: {problem}", file=sys.stderr)
        return 2
    out = fresh_dir(args.out)
    print(f"gpu-check: runs and logs in {out}", flush=True)
    check = GpuCheck(out, device=args.device, extra_sets=args.extra,
                     echo=lambda line: print(line, flush=True), launch=launch)
    check.run_all()
    failed = check.failed
    print(f"{len(check.results) - len(failed)} checks passed or skipped, {len(failed)} failed", flush=True)
    if args.record:
        args.record.write_text(check.markdown())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
