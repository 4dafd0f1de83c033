"""Adam and AdamW with every option of torch.optim.Adam, one op call per device for all groups."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fused_opt.optimizer import DeviceBucket, FusedOptimizer


class Adam(FusedOptimizer, torch.optim.Adam):
    """Drop-in for :class:`torch.optim.Adam`: same signature, defaults, errors and state, with
    every group's step in one fused op call per device.

    Args:
        params: an iterable of tensors or of param group dicts, as for torch.optim.
        lr: learning rate, a float or a one-element float tensor (read on the device by the
            kernel when it is on the params' device). Default 1e-3.
        betas: the running averages' coefficients (beta1, beta2), floats or one-element
            tensors. Default (0.9, 0.999).
        eps: added to the denominator. Default 1e-8.
        weight_decay: L2 penalty added to the gradient (decoupled, as AdamW, when
            ``decoupled_weight_decay``). Default 0.
        amsgrad: keep the maximum of the second moments (``max_exp_avg_sq``). Default False.
        maximize: ascend instead of descending. Default False.
        decoupled_weight_decay: decay the params directly, as AdamW. Default False.
        {fused_args}
        foreach, fused, capturable: accepted and stored in the param groups, so state dicts
            round-trip with torch.optim; they do not change how fused_opt computes.
        differentiable: must be False; True raises NotImplementedError.

    Attributes:
        {fused_attributes}

    State per param (as torch): ``step``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``
    with amsgrad, ``master_param`` under master weights, and ``kahan_compensation`` under
    ``param_rounding="kahan"``.
    """

    _sparse_grad_error = (
        "Adam does not support sparse gradients, please consider SparseAdam instead"
    )
    _number_keys = ("eps", "weight_decay")
    _op_name = "adam_"

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
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
        torch.optim.Adam.__init__(
            self,
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            foreach=foreach,
            maximize=maximize,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=decoupled_weight_decay,
        )
        self._after_torch_init(
            master_weights, max_grad_norm, l1_decay, l1_mode, shard_group, state_dtype,
            param_rounding, rounding_seed,
        )

    def _device_read_hypers(self, where: str, group: dict[str, Any]) -> list[tuple[str, Any]]:
        betas = group.get("betas")
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise TypeError(f"{where}['betas'] must be a pair (beta1, beta2), got {betas!r}")
        return [
            *super()._device_read_hypers(where, group),
            (f"{where}['betas'][0]", betas[0]),
            (f"{where}['betas'][1]", betas[1]),
        ]

    _signed_state_keys = frozenset({"exp_avg"})

    def _state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        if group["amsgrad"]:
            return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
        return ("exp_avg", "exp_avg_sq")

    def _call_modes(self, group: dict[str, Any]) -> tuple[bool, ...]:
        return (group["amsgrad"], group["maximize"], group["decoupled_weight_decay"])

    def _op_arguments(
        self, bucket: DeviceBucket
    ) -> tuple[tuple[list[Tensor], ...], dict[str, Any]]:
        beta1, beta1_tensor = bucket.split_hypers([group["betas"][0] for group in bucket.groups])
        beta2, beta2_tensor = bucket.split_hypers([group["betas"][1] for group in bucket.groups])
        amsgrad, maximize, decoupled_weight_decay = self._call_modes(bucket.groups[0])
        lists = (
            bucket.params,
            bucket.grads,
            bucket.states["exp_avg"],
            bucket.states["exp_avg_sq"],
            bucket.states.get("max_exp_avg_sq", []),
            bucket.steps,
            bucket.masters,
        )
        return lists, {
            "beta1": beta1,
            "beta2": beta2,
            "weight_decay": bucket.hypers("weight_decay"),
            "eps": bucket.hypers("eps"),
            "amsgrad": amsgrad,
            "maximize": maximize,
            "decoupled_weight_decay": decoupled_weight_decay,
            "beta1_tensor": beta1_tensor,
            "beta2_tensor": beta2_tensor,
        }


class AdamW(Adam, torch.optim.AdamW):
    """Drop-in for :class:`torch.optim.AdamW` (Adam with decoupled weight decay): same
    signature, defaults, errors and state, with every group's step in one fused op call per
    device.

    Args:
        params: an iterable of tensors or of param group dicts, as for torch.optim.
        lr: learning rate, a float or a one-element float tensor (read on the device by the
            kernel when it is on the params' device). Default 1e-3.
        betas: the running averages' coefficients (beta1, beta2), floats or one-element
            tensors. Default (0.9, 0.999).
        eps: added to the denominator. Default 1e-8.
        weight_decay: decoupled weight decay, params multiplied by ``1 - lr * weight_decay``.
            Default 1e-2.
        amsgrad: keep the maximum of the second moments (``max_exp_avg_sq``). Default False.
        maximize: ascend instead of descending. Default False.
        {fused_args}
        foreach, fused, capturable: accepted and stored in the param groups, so state dicts
            round-trip with torch.optim; they do not change how fused_opt computes.
        differentiable: must be False; True raises NotImplementedError.

    Attributes:
        {fused_attributes}

    State per param (as torch): ``step``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``
    with amsgrad, ``master_param`` under master weights, and ``kahan_compensation`` under
    ``param_rounding="kahan"``.
    """

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
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
        torch.optim.AdamW.__init__(
            self,
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            maximize=maximize,
            foreach=foreach,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
        )
        self._after_torch_init(
            master_weights, max_grad_norm, l1_decay, l1_mode, shard_group, state_dtype,
            param_rounding, rounding_seed,
        )
