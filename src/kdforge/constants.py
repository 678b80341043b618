"""Constants shared by every layer of kdforge (defined once, imported everywhere).

``IGNORE_INDEX``: the label value of a position that is not trained on and not counted (the
Hugging Face / PyTorch ``CrossEntropyLoss`` convention, ``-100``).
"""

from __future__ import annotations

IGNORE_INDEX = -100

__all__ = ["IGNORE_INDEX"]
