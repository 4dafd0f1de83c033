"""SGD with momentum, dampening, Nesterov and weight decay; sparse grads as torch.optim.SGD."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim.sgd import sgd as torch_sgd

from fused_opt.optimizer import DeviceBucket, FusedOptimizer, hyper


class SGD(FusedOptimizer, torch.optim.SGD):
    """Drop-in for :class:`torch.optim.SGD`: same signature, defaults, errors and state.

    The momentum buffer takes the first gradient as is, as in torch. Sparse gradients are
    handled by torch's own single-tensor path, so results match torch exactly for them.
    ``foreach`` and ``fused`` are accepted and stored; ``differentiable=True`` raises
    NotImplementedError.
    """

    _has_step = False
    _sparse_weight_decay_error = (
        "add(sparse, dense) is not supported. Use add(dense, sparse) instead."
    )

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float | Tensor = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
    ) -> None:
        self._reject_differentiable(differentiable)
        torch.optim.SGD.__init__(
            self,
            params,
            lr,
            momentum,
            dampening,
            weight_decay,
            nesterov,
            maximize=maximize,
            foreach=foreach,
            differentiable=differentiable,
            fused=fused,
        )
        self._after_torch_init()

    def _state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("momentum_buffer",) if group["momentum"] != 0 else ()

    def _lazy_key(self, key: str) -> bool:
        return key == "momentum_buffer"

    def _new_state(self, p: Tensor, group: dict[str, Any]) -> dict[str, Tensor]:
        # The kernel writes the whole buffer on the first step, so it needs no zeroing.
        if group["momentum"] != 0:
            return {"momentum_buffer": torch.empty_like(p, memory_format=torch.preserve_format)}
        return {}

    def _launch(
        self, group: dict[str, Any], bucket: DeviceBucket, lr: float, lr_tensor: Tensor | None
    ) -> None:
        has_momentum = group["momentum"] != 0
        torch.ops.fused_opt.sgd_(
            bucket.params,
            bucket.grads,
            bucket.states.get("momentum_buffer", []),
            bucket.first_step if has_momentum else [],
            lr=lr,
            momentum=hyper(group["momentum"]),
            dampening=hyper(group["dampening"]),
            weight_decay=hyper(group["weight_decay"]),
            nesterov=group["nesterov"],
            maximize=group["maximize"],
            lr_tensor=lr_tensor,
        )

    def _step_sparse(self, group: dict[str, Any], params: list[Tensor]) -> None:
        has_momentum = group["momentum"] != 0
        buffers = [self.state[p].get("momentum_buffer") for p in params] if has_momentum else []
        torch_sgd(
            params,
            [p.grad for p in params],
            buffers,
            has_sparse_grad=True,
            foreach=False,
            weight_decay=group["weight_decay"],
            momentum=group["momentum"],
            lr=group["lr"],
            dampening=group["dampening"],
            nesterov=group["nesterov"],
            maximize=group["maximize"],
        )
        for p, buffer in zip(params, buffers):
            self.state[p]["momentum_buffer"] = buffer
