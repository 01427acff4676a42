"""Everyday weight inspection: statistics, plots, TensorBoard logging, checkpoint diffs, reports.

Works on any ``nn.Module`` (its named parameters), a state dict, or a checkpoint file read
tensor by tensor without the model's code::

    from circuits.inspect import weight_stats, checkpoint_stats, inspect_report
    print(weight_stats(model).to_text())
    checkpoint_stats("big.safetensors").to_csv("stats.csv")
    inspect_report("fashion-inception", out_dir="report", format="html")
"""

from .checkpoint import CheckpointReader, checkpoint_stats, iter_checkpoint, read_safetensors_header
from .stats import (
    LayerStats,
    StatsConfig,
    StatsTable,
    default_init_std,
    spectral_norm,
    stats_from_items,
    tensor_stats,
    weight_stats,
)

__all__ = [
    "CheckpointReader",
    "checkpoint_stats",
    "iter_checkpoint",
    "read_safetensors_header",
    "LayerStats",
    "StatsConfig",
    "StatsTable",
    "default_init_std",
    "spectral_norm",
    "stats_from_items",
    "tensor_stats",
    "weight_stats",
]
