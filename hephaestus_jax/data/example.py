"""The unit every data path carries: a rendered document (`Example`), and random access to many (`DocumentSource`).

Below the renderer (`chat_format`) and the readers (`sources`), so that packing, record encoding and the training
lanes need only numpy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True, eq=False)
class Example:
    """A rendered record: int32 `tokens` and `loss_mask` of equal length; loss_mask[i] == 1 when tokens[i] is a
    training target. The leading `<|begin_of_text|>` is never a target (nothing precedes it)."""

    tokens: np.ndarray
    loss_mask: np.ndarray

    def __post_init__(self) -> None:
        if self.tokens.dtype != np.int32 or self.loss_mask.dtype != np.int32:
            raise TypeError(f"tokens and loss_mask must be int32, got {self.tokens.dtype} and {self.loss_mask.dtype}")
        if self.tokens.ndim != 1 or self.tokens.shape != self.loss_mask.shape:
            raise ValueError(
                f"tokens {self.tokens.shape} and loss_mask {self.loss_mask.shape} must be equal-length 1-D"
            )


class DocumentSource(Protocol):
    """Random access to rendered documents."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Example: ...
