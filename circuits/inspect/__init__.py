"""Everyday weight inspection: statistics, spectral diagnostics, plots, training tracking,
checkpoint diffs, reports.

Works on any ``nn.Module`` (its named parameters), a state dict, or a checkpoint file read
tensor by tensor without the model's code::

    from circuits.inspect import weight_stats, checkpoint_stats, inspect_report
    print(weight_stats(model).to_text())
    checkpoint_stats("big.safetensors").to_csv("stats.csv")
    inspect_report("fashion-inception", out_dir="report", format="html")
    diff_report("epoch1.pth", "epoch2.pth", out_dir="diff", format="html")
    with watch(model, "runs/exp1", every=100): train(...)
"""

from .checkpoint import CheckpointReader, checkpoint_stats, iter_checkpoint, read_safetensors_header
from .spectral import PowerLawFit, SpectralConfig, SpectralStats, esd, fit_power_law, spectral_stats
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

_LAZY = {
    # matplotlib / tensorboard are imported only when these are used
    "Plot": "plots", "plot_histograms": "plots", "plot_heatmap": "plots", "block_pool": "plots",
    "plot_conv_filters": "plots", "normalize_filters": "plots", "plot_weight_norms": "plots",
    "plot_neuron_embedding": "plots", "plot_activations": "plots", "first_conv_weight": "plots",
    "histogram": "plots", "pool_matrix": "plots", "plot_histogram_data": "plots", "plot_pooled_heatmap": "plots", "plot_spectra": "plots",
    "plot_alphas": "plots", "embedding_input": "plots",
    "ArchGraph": "graph", "GraphNode": "graph", "trace_graph": "graph", "graph_to_dot": "graph",
    "plot_graph": "graph",
    "TensorBoardWeightLogger": "tracking", "ScalarWriter": "tracking", "Watcher": "tracking", "watch": "tracking",
    "diff_checkpoints": "diff", "diff_report": "diff", "CheckpointDiff": "diff", "TensorDiff": "diff",
    "DiffError": "diff",
    "inspect_report": "report", "InspectError": "report", "ReportLimits": "report",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_LAZY) + [
    "CheckpointReader",
    "checkpoint_stats",
    "iter_checkpoint",
    "read_safetensors_header",
    "PowerLawFit",
    "SpectralConfig",
    "SpectralStats",
    "esd",
    "fit_power_law",
    "spectral_stats",
    "LayerStats",
    "StatsConfig",
    "StatsTable",
    "default_init_std",
    "spectral_norm",
    "stats_from_items",
    "tensor_stats",
    "weight_stats",
]
