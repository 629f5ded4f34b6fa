"""Data loading in the trainer: prefetched batches equal the sampler's, middle pipeline stages load
nothing, and a 4-stage pipeline (two middle stages) trains exactly like one stage."""

import pytest
import torch

from launch import run_torchrun, step_losses

from periln_megatron.data.datasets import BatchPrefetcher, MicroBatches


class _Samples:
    """Deterministic samples shaped like GPTDataset's; counts reads."""

    def __init__(self):
        self.reads = 0

    def __len__(self):
        return 1000

    def __getitem__(self, i):
        self.reads += 1
        g = torch.Generator().manual_seed(i)
        tokens = torch.randint(0, 100, (9,), generator=g)
        return {"tokens": tokens[:-1], "labels": tokens[1:], "loss_mask": torch.ones(8),
                "position_ids": torch.arange(8)}


def test_prefetched_batches_equal_the_samplers_in_any_order():
    samples = _Samples()
    batches = MicroBatches(samples, global_batch_size=8, micro_batch_size=2, dp_rank=1, dp_size=2)
    prefetcher = BatchPrefetcher(batches, needs_data=True, pin_memory=False)
    try:
        for iteration in [0, 1, 2, 5, 6, 3]:  # in order (prefetched) and out of order (rebuilt)
            got = prefetcher.get(iteration)
            want = list(batches.for_iteration(iteration))
            assert len(got) == len(want) == 2
            for g, w in zip(got, want):
                assert g.keys() == w.keys() and all(torch.equal(g[k], w[k]) for k in g)
    finally:
        prefetcher.close()


def test_a_rank_without_first_or_last_stage_loads_no_samples():
    samples = _Samples()
    prefetcher = BatchPrefetcher(MicroBatches(samples, 8, 2, 0, 1), needs_data=False, pin_memory=False)
    assert prefetcher.get(0) == [None] * 4 and prefetcher.get(1) == [None] * 4
    assert samples.reads == 0


def test_four_stage_pipeline_with_middle_stages_matches_one_stage(tmp_path):
    """From the same weights (a one-step checkpoint; a fresh init differs per layout), PP=4 with two
    middle stages that read no data trains exactly like PP=1."""
    import shutil

    common = ["-m", "periln_megatron.train", "--recipe", "recipes/tiny/peri_ln.yaml", "--set",
              "logging.tensorboard=false", "checkpoint.interval=0", "optim.warmup_steps=0"]
    run_torchrun(1, [*common, f"checkpoint.dir={tmp_path / 'start'}", "train.steps=1"], timeout=240)
    for name in ("pp1", "pp4"):
        shutil.copytree(tmp_path / "start", tmp_path / name)
    more = ["train.steps=3", "checkpoint.on_schedule_change=checkpoint"]  # on from the 1-step run's schedule
    run_torchrun(1, [*common, f"checkpoint.dir={tmp_path / 'pp1'}", *more], timeout=240)
    run_torchrun(4, [*common, f"checkpoint.dir={tmp_path / 'pp4'}", *more, "parallel.pp=4"], timeout=300)
    pp1, pp4 = step_losses(tmp_path / "pp1"), step_losses(tmp_path / "pp4")
    assert sorted(pp4) == [1, 2, 3] and [pp4[2], pp4[3]] == pytest.approx([pp1[2], pp1[3]], abs=1e-5)
