"""pytest plugin for tests/test_gpu_marks.py: writes each collected test's `gpu` mark and skip reasons
as JSON to $GPU_MARKS_OUT after collection (and after `-m` deselection)."""

import json
import os


def pytest_collection_finish(session):
    out = {}
    for item in session.items:
        reasons = [m.kwargs.get("reason", "") for m in item.iter_markers("skipif")]
        out[item.nodeid] = {"gpu": item.get_closest_marker("gpu") is not None, "skip_reasons": reasons}
    with open(os.environ["GPU_MARKS_OUT"], "w") as f:
        json.dump(out, f)
