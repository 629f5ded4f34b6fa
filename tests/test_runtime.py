import subprocess
import sys

import pytest

from periln_megatron.distributed.dist_env import first_host, read_dist_env
from periln_megatron.distributed.layout import LayoutError, ParallelLayout, check_layout


def test_torchrun_env_wins_over_slurm():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "1234",
           "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    e = read_dist_env(env)
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.master_port, e.launcher) == (3, 8, 1, "n1", 1234, "torchrun")


def test_slurm_env():
    env = {"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
           "SLURM_JOB_NODELIST": "gpu[007-008]", "SLURM_JOB_ID": "123456"}
    e = read_dist_env(env)
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.launcher) == (9, 16, 1, "gpu007", "slurm")
    assert e.master_port == 20000 + 123456 % 20000
    assert read_dist_env({**env, "MASTER_PORT": "4000"}).master_port == 4000


@pytest.mark.parametrize("nodelist,host", [
    ("node1", "node1"), ("gpu[003-005,9]", "gpu003"), ("a[1,2],b3", "a1"), ("h-[10-11]", "h-10"),
])
def test_first_host(nodelist, host):
    assert first_host(nodelist) == host


def test_single_process_default():
    assert read_dist_env({}).launcher == "single"


@pytest.mark.parametrize("layout,world,kw,msg", [
    (ParallelLayout(tp=2, pp=2), 6, {}, "world size 6 is not divisible by tp*pp*cp"),
    (ParallelLayout(tp=8), 8, {"num_attention_heads": 4}, "parallel.tp=8 is larger than model.num_attention_heads=4"),
    (ParallelLayout(tp=4), 4, {"num_attention_heads": 6}, "num_attention_heads=6 is not divisible by parallel.tp=4"),
    (ParallelLayout(tp=2), 2, {"num_query_groups": 1}, "num_query_groups=1 is not divisible by parallel.tp=2"),
    (ParallelLayout(pp=2, vpp=2), 2, {"num_layers": 6}, "num_layers=6 is not divisible by parallel.pp*vpp = 4"),
    (ParallelLayout(sequence_parallel=True), 1, {}, "sequence_parallel needs parallel.tp > 1"),
    (ParallelLayout(vpp=2), 1, {}, "needs parallel.pp >= 2"),
])
def test_layout_errors(layout, world, kw, msg):
    with pytest.raises(LayoutError, match=msg.replace("*", r"\*").replace(".", r"\.")):
        check_layout(layout, world, **kw)


def test_valid_layout_passes():
    check_layout(ParallelLayout(tp=2, pp=2, vpp=2), 8, num_attention_heads=16, num_query_groups=4, num_layers=8)


SHIM_PROBE = """
import torch
{setup}
from periln_megatron.distributed import cpu_shims
cpu_shims.install()
print(cpu_shims.INSTALLED, torch.zeros(1, device="cuda:0").device if cpu_shims.INSTALLED else "-",
      torch.randn(2).type(), torch.cuda.current_device() if cpu_shims.INSTALLED else "-")
"""


def test_cpu_shims_map_cuda_to_cpu():
    out = subprocess.run([sys.executable, "-c", SHIM_PROBE.format(setup="")], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "cpu", "torch.cuda.FloatTensor", "0"]


def test_cpu_shims_inactive_when_cuda_available():
    # On a GPU machine this is simply true; here we make torch report a GPU before the call.
    setup = "torch.cuda.is_available = lambda: True"
    out = subprocess.run([sys.executable, "-c", SHIM_PROBE.format(setup=setup)], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "-", "torch.FloatTensor", "-"]


BACKWARD_PROBE = """
import torch
from periln_megatron.distributed import cpu_shims
cpu_shims.install()

class AllocatesOnCuda(torch.autograd.Function):  # what sequence parallelism's backward all-gather does
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        out = torch.empty(grad.shape, device=torch.cuda.current_device())
        return out.copy_(grad * 2)

x = torch.ones(3, requires_grad=True)
AllocatesOnCuda.apply(x).sum().backward()
print(x.grad.tolist())
"""


def test_cpu_shims_stay_active_inside_autograd_backward():
    out = subprocess.run([sys.executable, "-c", BACKWARD_PROBE], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[-2] == "[2.0, 2.0, 2.0]"


def test_tp_or_cp_runs_get_one_cuda_connection_unless_the_user_chose(monkeypatch):
    """Megatron-LM asserts CUDA_DEVICE_MAX_CONNECTIONS=1 for TP or CP > 1 on Hopper; periln-launch
    (and the trainer itself, for bare torchrun/srun) sets it, and never overrides the user's value."""
    from periln_megatron.distributed.launch import trainer_environment
    from periln_megatron.distributed.dist_env import launch_environment

    assert launch_environment(2, 1, {}) == launch_environment(1, 2, {}) == {"CUDA_DEVICE_MAX_CONNECTIONS": "1"}
    assert launch_environment(1, 1, {}) == {}
    assert launch_environment(2, 1, {"CUDA_DEVICE_MAX_CONNECTIONS": "8"}) == {}
    monkeypatch.delenv("CUDA_DEVICE_MAX_CONNECTIONS", raising=False)
    torchrun = ["--nproc_per_node=2", "--master_addr=127.0.0.1", "-m", "periln_megatron.train", "--exit-after-minutes",
                "5", "--recipe", "recipes/tiny/peri_ln.yaml", "--set", "train.steps=4"]
    assert trainer_environment([*torchrun, "parallel.tp=2"]) == {"CUDA_DEVICE_MAX_CONNECTIONS": "1"}
    assert trainer_environment([*torchrun, "parallel.tp=1"]) == {}
    assert trainer_environment(["--nproc_per_node=2", "-m", "periln_megatron.train", "--recipe",
                                "recipes/peri_ln/3.2b.yaml"]) == {}  # the paper layouts are DP-only
    assert trainer_environment([*torchrun, "parallel.tp=banana"]) == {}  # the trainer reports it
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "32")
    assert trainer_environment([*torchrun, "parallel.tp=2"]) == {}
