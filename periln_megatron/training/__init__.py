"""Training: the loop, optimizer and schedule, stopping, diagnostics, metrics and the run lock."""
