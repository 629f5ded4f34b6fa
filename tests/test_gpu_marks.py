"""`pytest -m gpu` (what tools/gpu_smoke.py runs on a GPU node) selects exactly the tests that need a
GPU: a CPU reference test run there would build its model on the GPU and its inputs on the CPU."""

import json
import os
import sys

from launch import REPO, run


def collect(tmp_path, *args) -> dict:
    out = tmp_path / f"marks{len(list(tmp_path.iterdir()))}.json"
    env = {"GPU_MARKS_OUT": str(out), "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)])}
    proc = run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "gpu_marks", "-p", "no:cacheprovider",
                *args, "tests"], env=env, timeout=600, check=False)
    assert proc.returncode in (0, 5), proc.stdout[-4000:]
    return json.loads(out.read_text())


def test_gpu_mark_selects_exactly_the_tests_that_need_a_gpu(tmp_path):
    everything = collect(tmp_path)
    needs_gpu = {n for n, m in everything.items() if any("GPU" in r for r in m["skip_reasons"])}
    marked = {n for n, m in everything.items() if m["gpu"]}
    assert needs_gpu == marked, {"skipped without a GPU but unmarked": sorted(needs_gpu - marked),
                                 "marked but runnable without a GPU": sorted(marked - needs_gpu)}
    assert any("test_te_model_modules" in n for n in marked) and any("test_fp8_step" in n for n in marked)
    assert set(collect(tmp_path, "-m", "gpu")) == marked
