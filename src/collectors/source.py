"""What the collector reads activations from: adapter features or plain MLP neurons."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Protocol

import torch
from torch import nn

from adapters.branch import FeatureSink


class FeatureSource(Protocol):
    """A model whose per-layer units (features or neurons) can be recorded.

    ``units(layer)`` lists the unit indices recorded at a layer, in the order of the last
    dimension of what ``recording`` hands to the sink; ``width`` is the stride of the
    global index ``layer * width + index``.
    """

    model: Any

    @property
    def n_layers(self) -> int: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def width(self) -> int: ...

    def units(self, layer: int) -> torch.Tensor: ...

    def decoder_columns(self, layer: int) -> torch.Tensor: ...

    def unembedding(self) -> torch.Tensor: ...

    def final_norm(self) -> nn.Module | None: ...

    def recording(
        self, layers: list[int], sink: FeatureSink | None = None
    ) -> AbstractContextManager[Any]: ...
