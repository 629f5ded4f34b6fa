"""The parallel layout (TP, PP, VPP, CP, SP) and the checks megatron-core would otherwise fail on
later. Torch-free: recipe validation (config/validate.py) uses it before anything is imported."""

from __future__ import annotations

from dataclasses import dataclass


class LayoutError(ValueError):
    """A parallel layout that cannot work with this world size or model; `key` is the recipe key to fix."""

    def __init__(self, message: str, key: str = "parallel"):
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class ParallelLayout:
    tp: int = 1
    pp: int = 1
    vpp: int | None = None  # virtual pipeline stages per rank (interleaved schedule)
    cp: int = 1
    sequence_parallel: bool = False

    @property
    def model_parallel(self) -> int:
        return self.tp * self.pp * self.cp

    def data_parallel(self, world_size: int) -> int:
        return world_size // self.model_parallel


def check_layout(
    layout: ParallelLayout,
    world_size: int,
    num_attention_heads: int | None = None,
    num_query_groups: int | None = None,
    num_layers: int | None = None,
) -> None:
    """Raise LayoutError for a layout that megatron-core would reject later, or crash on."""
    for name in ("tp", "pp", "cp"):
        if getattr(layout, name) < 1:
            raise LayoutError(f"parallel.{name} must be >= 1, got {getattr(layout, name)}", f"parallel.{name}")
    if world_size % layout.model_parallel:
        # the key to fix: the first of tp, pp, cp whose running product no longer divides the world
        product, key = 1, "parallel.cp"
        for name in ("tp", "pp", "cp"):
            product *= getattr(layout, name)
            if world_size % product:
                key = f"parallel.{name}"
                break
        raise LayoutError(
            f"world size {world_size} is not divisible by tp*pp*cp = "
            f"{layout.tp}*{layout.pp}*{layout.cp} = {layout.model_parallel}", key
        )
    if layout.sequence_parallel and layout.tp == 1:
        raise LayoutError("parallel.sequence_parallel needs parallel.tp > 1", "parallel.sequence_parallel")
    if layout.vpp is not None:
        if layout.pp < 2:
            raise LayoutError("parallel.vpp (interleaved pipeline) needs parallel.pp >= 2", "parallel.vpp")
        if layout.vpp < 1:
            raise LayoutError(f"parallel.vpp must be >= 1, got {layout.vpp}", "parallel.vpp")
    if num_attention_heads is not None:
        if layout.tp > num_attention_heads:
            raise LayoutError(f"parallel.tp={layout.tp} is larger than model.num_attention_heads={num_attention_heads}",
                              "parallel.tp")
        if num_attention_heads % layout.tp:
            raise LayoutError(f"model.num_attention_heads={num_attention_heads} is not divisible by parallel.tp={layout.tp}",
                              "parallel.tp")
    if num_query_groups is not None and num_query_groups % layout.tp:
        raise LayoutError(f"model.num_query_groups={num_query_groups} is not divisible by parallel.tp={layout.tp}",
                          "parallel.tp")
    if num_layers is not None:
        stages = layout.pp * (layout.vpp or 1)
        if num_layers % stages:
            raise LayoutError(
                f"model.num_layers={num_layers} is not divisible by parallel.pp*vpp = {stages}",
                "parallel.vpp" if layout.vpp else "parallel.pp",
            )
