"""How a fast piece installs itself: the module keeps its state and takes a subclass."""

from __future__ import annotations

from torch import nn


def swap_class(module: nn.Module, plain: type, fast: type) -> bool:
    """Give `module` (an instance of `plain`, exactly) the class `fast`; False if it is not one.

    `fast` subclasses `plain` and adds no state, so parameters, buffers, state-dict
    keys and hooks stay as they were; an already swapped module is left alone.
    """
    if type(module) is not plain:
        return False
    module.__class__ = fast
    return True
