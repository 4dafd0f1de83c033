"""RMSprop, plain or centered, with momentum and weight decay: torch has no fused RMSprop."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fused_opt import _ops
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
        master_weights: keep a float32 master copy of every float16/bfloat16 param in the state
            (``"master_param"``, made from the param on its first step) with float32 states, and
            update master, states and the 16-bit param in the same single pass. Other params
            are their own masters. Default False.
        max_grad_norm: clip the global L2 norm of all gradients of all groups to this value,
            with ``torch.nn.utils.clip_grad_norm_``'s formula, in registers after one read-only
            norm pass (the gradients are never written). Every group must have the same value.
            Default None: no clipping.
        l1_decay: L1 penalty per group (>= 0), with ``weight_decay`` the elastic net, in the
            same pass. Default 0: none.
        l1_mode: ``"subgradient"`` adds ``l1_decay * sign(p)`` to the gradient (the step on
            ``loss + l1_decay * p.abs().sum()``); ``"proximal"`` soft-thresholds the param after
            the update by ``l1_decay`` times its per-element step size, which gives exact zeros
            (csrc/include/fused_opt/math/l1.h). Default ``"subgradient"``.
        foreach, capturable: accepted and stored in the param groups, so state dicts round-trip with
            torch.optim; they do not change how fused_opt computes.
        differentiable: must be False; True raises NotImplementedError.

    Attributes:
        param_groups, state, defaults: as in torch.optim; checkpoints have torch.optim's keys.
        last_grad_norm: the unscaled global gradient norm of the last step, before clipping, as
            a 0-dim float32 tensor on the params' device, when that step clipped or ran under
            :class:`fused_opt.GradScaler`; else None. The next step reuses the tensor: clone it
            to keep it.
        last_step_skipped: the GradScaler's ``found_inf`` of the last step, a 0-dim tensor that
            is nonzero when an inf/NaN gradient skipped the step (nothing changed: params,
            states, step counters); None when the step ran without a scaler.

    State per param (as torch): ``step``, ``square_avg``, ``grad_avg`` when centered,
    ``momentum_buffer`` with momentum, and ``master_param`` under master weights.
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
