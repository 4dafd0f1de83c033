"""RMSprop, plain or centered, with momentum and weight decay: torch has no fused RMSprop."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fused_opt import _ops
from fused_opt.optimizer import DeviceBucket, FusedOptimizer, plain_bool


class RMSprop(FusedOptimizer, torch.optim.RMSprop):
    """Drop-in for :class:`torch.optim.RMSprop`: same signature, defaults, errors and state.

    ``foreach`` and ``capturable`` are accepted and stored; ``differentiable=True`` raises
    NotImplementedError.
    """

    _sparse_grad_error = "RMSprop does not support sparse gradients"
    _number_keys = ("alpha", "eps", "weight_decay", "momentum")

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum: float = 0,
        centered: bool = False,
        capturable: bool = False,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
        *,
        master_weights: bool = False,
        max_grad_norm: float | None = None,
        l1_decay: float | Tensor = 0.0,
        l1_mode: str = "subgradient",
    ) -> None:
        self._reject_differentiable(differentiable)
        torch.optim.RMSprop.__init__(
            self,
            params,
            lr,
            alpha,
            eps,
            weight_decay,
            momentum,
            centered,
            capturable,
            foreach,
            maximize,
            differentiable,
        )
        self._after_torch_init(master_weights, max_grad_norm, l1_decay, l1_mode)

    def _state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        keys = ("square_avg",)
        if group["centered"]:
            keys += ("grad_avg",)
        if group["momentum"] > 0:
            keys += ("momentum_buffer",)
        return keys

    def _call_modes(self, group: dict[str, Any]) -> tuple[bool, ...]:
        return (group["centered"], plain_bool(group["momentum"] > 0), group["maximize"])

    def _launch(self, bucket: DeviceBucket, common: dict[str, Any]) -> None:
        centered, _, maximize = self._call_modes(bucket.groups[0])
        _ops.op_namespace.rmsprop_(
            bucket.params,
            bucket.grads,
            bucket.states["square_avg"],
            bucket.states.get("grad_avg", []),
            bucket.states.get("momentum_buffer", []),
            bucket.steps,
            bucket.masters,
            alpha=bucket.hypers("alpha"),
            eps=bucket.hypers("eps"),
            weight_decay=bucket.hypers("weight_decay"),
            momentum=bucket.hypers("momentum"),
            centered=centered,
            maximize=maximize,
            **common,
        )
