"""Peri-LN gives the same loss and the same norm-gain gradients under TP, TP+SP and PP (CPU, gloo)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from launch import REPO, run_torchrun

WORKER = str(REPO / "tests" / "workers" / "spec_parallel_worker.py")
LAYOUTS = {"tp1": (1, 1, 1, False), "tp2": (2, 2, 1, False), "tp2_sp": (2, 2, 1, True), "pp2": (2, 1, 2, False)}


def run_layout(tmp_path: Path, key: str):
    nproc, tp, pp, sp = LAYOUTS[key]
    out = tmp_path / key
    out.mkdir()
    run_torchrun(nproc, [WORKER, str(tp), str(pp), "1" if sp else "0", str(out)], timeout=180)
    records = [torch.load(out / f"rank{r}.pt") for r in range(nproc)]
    losses = [r["loss"] for r in records if "loss" in r]
    grads: dict[str, list[torch.Tensor]] = {}
    for r in records:  # every rank's copy of a replicated norm parameter must match
        for name, g in r["grads"].items():
            grads.setdefault(name, []).append(g)
    return losses, grads


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return run_layout(tmp_path_factory.mktemp("ref"), "tp1")


@pytest.mark.parametrize("layout", ["tp2", "tp2_sp", "pp2"])
def test_same_loss_and_norm_grads(layout, reference, tmp_path):
    (ref_loss,), ref_grads = reference
    losses, grads = run_layout(tmp_path, layout)
    assert losses and all(abs(loss - ref_loss) < 1e-5 for loss in losses), (losses, ref_loss)
    assert set(grads) == set(ref_grads)
    assert any(n.endswith("out_norm.weight") for n in grads) and "embedding.norm.weight" in grads
    for name, copies in grads.items():
        want = ref_grads[name][0]
        assert want.abs().max() > 1e-4, name  # gradient reaches every norm
        for got in copies:
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4, msg=f"{layout}: {name}")
