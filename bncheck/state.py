"""Snapshot and restore everything bncheck could disturb while it inspects a model.

``preserved(model)`` records, for every submodule, its ``training`` flag, every buffer (the
object and a copy of its values), the ``requires_grad`` flag of every parameter, and the RNG
states of torch (CPU and initialised CUDA devices), numpy and ``random``; on exit (normal or
by exception) it puts every one of them back. Buffers are restored in place, so tensors the
user or an optimizer holds stay the same objects. Parameters are not copied (that would
double the model's memory); bncheck's forward passes run under ``torch.no_grad()`` and never
write to them.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["preserved", "RNGState", "ModelState"]


@dataclass
class RNGState:
    torch_cpu: torch.Tensor
    torch_cuda: list[torch.Tensor] | None
    numpy: Any
    python: Any

    @classmethod
    def capture(cls) -> RNGState:
        cuda = None
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            cuda = torch.cuda.get_rng_state_all()
        return cls(torch.get_rng_state(), cuda, np.random.get_state(), random.getstate())

    def restore(self) -> None:
        torch.set_rng_state(self.torch_cpu)
        if self.torch_cuda is not None:
            torch.cuda.set_rng_state_all(self.torch_cuda)
        np.random.set_state(self.numpy)
        random.setstate(self.python)


@dataclass
class ModelState:
    training: list[tuple[nn.Module, bool]]
    buffers: list[tuple[nn.Module, str, torch.Tensor | None, torch.Tensor | None, int]]
    requires_grad: list[tuple[nn.Parameter, bool]]

    @classmethod
    def capture(cls, model: nn.Module) -> ModelState:
        training = [(m, m.training) for m in model.modules()]
        buffers: list[tuple[nn.Module, str, torch.Tensor | None, torch.Tensor | None, int]] = []
        for module in model.modules():
            for name, buf in module._buffers.items():
                if isinstance(buf, torch.Tensor) and not isinstance(
                    buf, nn.parameter.UninitializedBuffer
                ):
                    buffers.append((module, name, buf, buf.detach().clone(), buf._version))
                else:
                    buffers.append((module, name, buf, None, 0))
        grads = [(p, p.requires_grad) for p in model.parameters()]
        return cls(training, buffers, grads)

    def restore(self) -> None:
        for module, flag in self.training:
            module.training = flag
        with torch.no_grad():
            for module, name, original, copy, version in self.buffers:
                if isinstance(module._buffers, dict):
                    if module._buffers.get(name) is not original:
                        module._buffers[name] = original
                elif original is not None:  # TorchScript: buffers cannot be swapped back
                    original = dict(module.named_buffers(recurse=False)).get(name, original)
                if original is not None and copy is not None and original._version != version:
                    original.copy_(copy)
        for param, flag in self.requires_grad:
            if param.requires_grad != flag:
                param.requires_grad_(flag)


@contextmanager
def preserved(model: nn.Module) -> Iterator[None]:
    """Restore ``model``'s modes, buffers, ``requires_grad`` flags and all RNG states on exit."""
    rng = RNGState.capture()
    state = ModelState.capture(model)
    try:
        yield
    finally:
        state.restore()
        rng.restore()
