"""RMSprop, plain or centered, with momentum and weight decay: torch has no fused RMSprop."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fused_opt.optimizer import DeviceBucket, FusedOptimizer, plain_bool


class RMSprop(FusedOptimizer, torch.optim.RMSprop):
    """Drop-in for :class:`torch.optim.RMSprop`: same signature, defaults, errors and state,
    with every group's step in one fused op call per device (torch has no fused RMSprop).

    Args:
        params: an iterable of tensors or of param group dicts, as for torch.optim.
        lr: learning rate, a float or a one-element float tensor. Default 1e-2.
        alpha: smoothing constant of the squared-gradient average. Default 0.99.
        eps: added to the denominator. Default 1e-8.
        weight_decay: L2 penalty added to the gradient. Default 0.
        momentum: momentum factor; 0 keeps no buffer. Default 0.
        centered: normalize by the gradient's estimated variance (keeps ``grad_avg``).
            Default False.
        maximize: ascend instead of descending. Default False.
        {fused_args}
        foreach, capturable: accepted and stored in the param groups, so state dicts round-trip with
            torch.optim; they do not change how fused_opt computes.
        differentiable: must be False; True raises NotImplementedError.

    Attributes:
        {fused_attributes}

    State per param (as torch): ``step``, ``square_avg``, ``grad_avg`` when centered,
    ``momentum_buffer`` with momentum, ``master_param`` under master weights, and
    ``kahan_compensation`` under ``param_rounding="kahan"``.
    """

    _sparse_grad_error = "RMSprop does not support sparse gradients"
    _number_keys = ("alpha", "eps", "weight_decay", "momentum")
    _op_name = "rmsprop_"

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
        state_dtype: torch.dtype | None = None,
        param_rounding: str = "nearest",
        rounding_seed: int = 0,
        shard_group: Any = None,
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
        self._after_torch_init(
            master_weights, max_grad_norm, l1_decay, l1_mode, shard_group, state_dtype,
            param_rounding, rounding_seed,
        )
        for index, group in enumerate(self.param_groups):
            _check_centered_states(f"param_groups[{index}]", group)

    def _check_hyperparameters(self, where: str, group: dict[str, Any], stepping: bool) -> None:
        super()._check_hyperparameters(where, group, stepping)
        _check_centered_states(where, group)

    _signed_state_keys = frozenset({"grad_avg", "momentum_buffer"})

    def _state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        keys = ("square_avg",)
        if group["centered"]:
            keys += ("grad_avg",)
        if group["momentum"] > 0:
            keys += ("momentum_buffer",)
        return keys

    def _call_modes(self, group: dict[str, Any]) -> tuple[bool, ...]:
        return (group["centered"], plain_bool(group["momentum"] > 0), group["maximize"])

    def _op_arguments(
        self, bucket: DeviceBucket
    ) -> tuple[tuple[list[Tensor], ...], dict[str, Any]]:
        centered, _, maximize = self._call_modes(bucket.groups[0])
        lists = (
            bucket.params,
            bucket.grads,
            bucket.states["square_avg"],
            bucket.states.get("grad_avg", []),
            bucket.states.get("momentum_buffer", []),
            bucket.steps,
            bucket.masters,
        )
        return lists, {
            "alpha": bucket.hypers("alpha"),
            "eps": bucket.hypers("eps"),
            "weight_decay": bucket.hypers("weight_decay"),
            "momentum": bucket.hypers("momentum"),
            "centered": centered,
            "maximize": maximize,
        }


def _check_centered_states(where: str, group: dict[str, Any]) -> None:
    """Refuses centered RMSprop on 8-bit states: its variance, square_avg - grad_avg ** 2, is a
    small difference of two large numbers wherever the gradient varies little, and the codes'
    relative error (up to 1/16 each) makes it negative there, and the step NaN."""
    if group.get("centered") and group.get("state_dtype") is torch.uint8:
        raise ValueError(
            f"{where} has centered=True and state_dtype=torch.uint8: the centered variance "
            "square_avg - grad_avg**2 is a small difference of 8-bit values wherever the gradient "
            "varies little, where their rounding makes it negative and the step NaN; use "
            "state_dtype=torch.bfloat16 or centered=False"
        )
