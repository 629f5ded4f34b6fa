"""README.md's "Train on your own text" runs as written: JSONL -> tokenizer -> .bin/.idx -> the tiny
recipe -> HF export -> transformers generates. The commands are read from the README (between the
walkthrough markers) and run by bash in a scratch directory holding links to the checkout's tools/,
recipes/ and tests/data/; the only change is `train.steps=4` added to periln-train's --set."""

import os
import re
import sys
from pathlib import Path

from launch import REPO, run

STEPS = 4


def walkthrough_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    block = re.search(r"<!-- walkthrough:begin -->\n```bash\n(.*?)```\n<!-- walkthrough:end -->", text, re.S)
    assert block, "README.md: no walkthrough block between <!-- walkthrough:begin/end --> markers"
    return [c.strip() for c in block.group(1).replace("\\\n", " ").splitlines() if c.strip()]


def test_readme_walkthrough_runs_as_written(tmp_path):
    commands = walkthrough_commands()
    assert [c.split()[:2] for c in commands] == [
        ["python", "-c"], ["python", "tools/train_tokenizer.py"], ["python", "tools/preprocess_data.py"],
        ["periln-train", "--recipe"], ["python", "tools/convert_to_hf.py"], ["python", "-c"]]
    train = commands[3]
    assert "--set" in train and re.search(r" [\w.]+=\S+$", train), train  # ends in --set's KEY=VALUE list
    commands[3] = f"{train} train.steps={STEPS}"
    # The last command samples (do_sample=True): seeded here, so that every run samples the same text;
    # unseeded, a clean-clone `make test` once sampled nothing printable after the prompt (whitespace or the
    # end-of-document token first).
    assert commands[5].startswith('python -c "from transformers import pipeline;'), commands[5]
    commands[5] = commands[5].replace('python -c "', 'python -c "import torch; torch.manual_seed(0); ', 1)
    (tmp_path / "tests").mkdir()
    for link, target in (("tools", "tools"), ("recipes", "recipes"), ("tests/data", "tests/data")):
        (tmp_path / link).symlink_to(REPO / target)
    script = "set -euo pipefail\n" + "".join(f"echo '+ {c.split()[0]} {c.split()[1]}'\n{c}\n" for c in commands)
    bin_dir = str(Path(sys.executable).parent)  # the virtualenv's bin: `python` and `periln-train`
    out = run(["bash", "-c", script], cwd=tmp_path, timeout=300,
              env={"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}).stdout
    assert "wrote my_run/tok.model (1000 pieces" in out, out[-3000:]
    assert f"step {STEPS}/{STEPS} |" in out and f"saved checkpoint iteration {STEPS}" in out, out[-3000:]
    assert "vocab_size: 1000" in out  # read from the tokenizer; model.vocab_size stays null
    assert (tmp_path / "my_run/hf/config.json").is_file()
    generated = out.rsplit("+ python -c\n", 1)[1].split("ROMEO:", 1)
    assert len(generated) == 2 and generated[1].strip(), out[-2000:]  # the prompt, then sampled text
