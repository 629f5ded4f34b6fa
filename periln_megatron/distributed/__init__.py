"""Processes: the distributed environment and parallel layout, the CPU stand-ins for CUDA, the launcher."""
