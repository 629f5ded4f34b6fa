"""tools/gpu_smoke.py (make gpu-check) rehearsed on CPU: the checks that need no GPU run through the
real trainer, checkpoints and export, so the script a GPU node runs first is itself tested.

Its processes are forked from the test fork server (tests/zygote.py) instead of started through
periln-launch: the ranks, their exit statuses (combined by periln-launch's own `decide`), checkpoints
and logs are real; periln-launch itself is run for real by test_faults.py and the Slurm tests."""

import re
import sys

from launch import load_tool, run, run_torchrun

TINY_SHAPE = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.ffn_hidden_size=128",
              "model.seq_length=64", "model.vocab_size=512", "parallel.ddp_bucket_size=4000"]


def forked(argv: list[str], nproc: int | None, env: dict) -> tuple[int, str]:
    """gpu_check's launcher: `python ARGV`, or ARGV on nproc ranks with periln-launch's exit status."""
    from periln_megatron.distributed.launch import decide

    if nproc is None:
        result = run([sys.executable, *argv], env=env, check=False, timeout=600)
        return result.returncode, result.stdout
    result = run_torchrun(nproc, argv, env=env, check=False, timeout=600)
    return decide(result.returncode, list(enumerate(result.codes)))[0], result.stdout


def test_gpu_check_rehearsal_on_cpu_passes_and_writes_fresh_directories(tmp_path, capsys):
    code = load_tool("gpu_smoke").main(["--device", "cpu", "--out", str(tmp_path), "--record",
                                        str(tmp_path / "results.md"), "--set", *TINY_SHAPE], launch=forked)
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    status = {name: s for s, name in re.findall(r"^(PASS|FAIL|SKIP)\s+(\S+):", out, re.M)}
    for check in ("dp2-paper-flags", "dp2-paper-flags-resume", "dp2-paper-flags-to-hf", "pp2-vs-pp1", "tp2-sp-vs-tp1"):
        assert status.get(check) == "PASS", (check, out[-3000:])
    assert "0 failed" in out
    differences = [float(x) for x in re.findall(r"max \|loss [^|]+\| = (\S+) over 6 steps", out)]
    assert len(differences) == 3 and max(differences) < 1e-5, out[-3000:]
    first = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert len(first) == 1 and (first[0] / "dp2-paper-flags" / "metrics.jsonl").is_file()
    assert "| pp2-vs-pp1 | PASS |" in (tmp_path / "results.md").read_text()
