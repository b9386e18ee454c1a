"""A progress bar over transformer layers for the converters."""

from __future__ import annotations

from typing import Optional

from tqdm import tqdm


class LayerProgress:
    """Counts a layer done when conversion moves past it (embedding and head are not counted)."""

    def __init__(self, num_layers: int, desc: str, enabled: bool = True) -> None:
        self.bar = tqdm(total=num_layers, desc=desc, unit="layer", disable=not enabled, dynamic_ncols=True)
        self.layer: Optional[int] = None

    def at(self, layer: Optional[int]) -> None:
        """Conversion is now working on ``layer`` (None: embedding, final norm or output layer)."""
        if self.layer is not None and layer != self.layer:
            self.bar.update(1)
        self.layer = layer

    def close(self) -> None:
        self.at(None)
        self.bar.close()
