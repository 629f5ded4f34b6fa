"""Where a step's numbers go: one stdout line, metrics.jsonl in the run dir, TensorBoard if installed."""

from __future__ import annotations

import json
from pathlib import Path

STDOUT_KEYS = (("loss", "loss {:.4f}"), ("lr", "lr {:.3e}"), ("grad_norm", "grad_norm {:.3f}"),
               ("tokens_per_s", "tok/s {:.0f}"), ("ms_per_step", "ms/step {:.0f}"), ("mfu", "mfu {:.1%}"),
               ("valid_loss", "valid_loss {:.4f}"), ("final_valid_loss", "final valid_loss {:.4f}"))


class MetricsLog:
    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool = True, total_steps: int | None = None):
        self.enabled = enabled
        self.total_steps = total_steps
        self.file = open(Path(run_dir) / "metrics.jsonl", "a") if enabled else None
        self.writer = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except ImportError:  # tensorboard is optional
                pass

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        step = record["step"]
        parts = [f"step {step}/{self.total_steps}" if self.total_steps else f"step {step}"]
        parts += [fmt.format(record[k]) for k, fmt in STDOUT_KEYS if k in record]
        if record.get("skipped"):
            parts.append("skipped (fp16 overflow)")
        if record.get("spike"):
            parts.append(f"SPIKE: {record['spike']}")
        print(" | ".join(parts), flush=True)
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                    self.writer.add_scalar(key, value, step)
                elif isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
                    for i, v in enumerate(value):
                        self.writer.add_scalar(f"{key}/layer_{i:02d}", v, step)

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.writer is not None:
            self.writer.close()
