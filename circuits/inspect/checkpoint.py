"""Statistics of a checkpoint file read tensor by tensor, without the model's code.

The reading itself (format sniffing, unwrapping, streaming, pickle safety) is
:mod:`circuits.models.checkpoint`, the one reader every entry point uses; its names are
re-exported here.

Example:
    >>> checkpoint_stats("model.pth").to_text()                  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any, Optional

from .._io import PathLike
from ..models.checkpoint import CHECKPOINT_SUFFIXES, CheckpointReader, iter_checkpoint, read_safetensors_header
from .stats import StatsConfig, StatsTable, stats_from_items

__all__ = ["CheckpointReader", "iter_checkpoint", "checkpoint_stats", "read_safetensors_header", "CHECKPOINT_SUFFIXES"]


def checkpoint_stats(path: PathLike, config: Optional[StatsConfig] = None, progress: bool = False, **kwargs: Any) -> StatsTable:
    """The :func:`~circuits.inspect.stats.weight_stats` table of a checkpoint, streamed.

    Needs no model code: every floating-point tensor is a row (buffers such as BatchNorm
    running statistics included; integer tensors, optimizer state and entries that are not
    tensors are listed in ``table.skipped``).
    """
    with CheckpointReader(path) as reader:
        table = stats_from_items(iter(reader), config, progress=progress, total=len(reader), **kwargs)
    table.notes = list(reader.notes)
    return table
