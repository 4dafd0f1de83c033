"""Adam and AdamW with every option of torch.optim.Adam, one op call per device for all groups."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fused_opt import _ops
from fused_opt.optimizer import DeviceBucket, FusedOptimizer


class Adam(FusedOptimizer, torch.optim.Adam):
    """Drop-in for :class:`torch.optim.Adam`: same signature, defaults, errors and state.

    ``foreach``, ``fused`` and ``capturable`` are accepted and stored in the param groups so
    state dicts round-trip, but every step runs fused_opt's kernel; ``differentiable=True``
    raises NotImplementedError. fused_opt's own keywords, here and on every optimizer:

    * ``master_weights``: float16/bfloat16 params are updated through a float32 master copy
      kept in the state (``"master_param"``), with float32 moments, in the same single pass.
    * ``max_grad_norm``: clip the global L2 norm of all gradients to this value, as
      ``torch.nn.utils.clip_grad_norm_`` does, in registers after one read-only norm pass.
    * ``l1_decay`` (per group, >= 0) with ``l1_mode``: L1 regularization in the same pass, and
      with ``weight_decay`` elastic net. ``"subgradient"`` adds ``l1_decay * sign(p)`` to the
      gradient (the step on ``loss + l1_decay * p.abs().sum()``); ``"proximal"`` soft-thresholds
      the param after the update by ``l1_decay`` times its per-element step size, giving exact
      zeros (csrc/include/fused_opt/math/l1.h). Sparse grads (SGD, Adagrad) take no L1.
    """

    _sparse_grad_error = (
        "Adam does not support sparse gradients, please consider SparseAdam instead"
    )
    _number_keys = ("eps", "weight_decay")

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
        self._after_torch_init(master_weights, max_grad_norm, l1_decay, l1_mode)

    def _device_read_hypers(self, where: str, group: dict[str, Any]) -> list[tuple[str, Any]]:
        betas = group.get("betas")
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise TypeError(f"{where}['betas'] must be a pair (beta1, beta2), got {betas!r}")
        return [
            *super()._device_read_hypers(where, group),
            (f"{where}['betas'][0]", betas[0]),
            (f"{where}['betas'][1]", betas[1]),
        ]

    def _state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        if group["amsgrad"]:
            return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
        return ("exp_avg", "exp_avg_sq")

    def _call_modes(self, group: dict[str, Any]) -> tuple[bool, ...]:
        return (group["amsgrad"], group["maximize"], group["decoupled_weight_decay"])

    def _launch(self, bucket: DeviceBucket, common: dict[str, Any]) -> None:
        beta1, beta1_tensor = bucket.split_hypers([group["betas"][0] for group in bucket.groups])
        beta2, beta2_tensor = bucket.split_hypers([group["betas"][1] for group in bucket.groups])
        amsgrad, maximize, decoupled_weight_decay = self._call_modes(bucket.groups[0])
        _ops.op_namespace.adam_(
            bucket.params,
            bucket.grads,
            bucket.states["exp_avg"],
            bucket.states["exp_avg_sq"],
            bucket.states.get("max_exp_avg_sq", []),
            bucket.steps,
            bucket.masters,
            beta1=beta1,
            beta2=beta2,
            weight_decay=bucket.hypers("weight_decay"),
            eps=bucket.hypers("eps"),
            amsgrad=amsgrad,
            maximize=maximize,
            decoupled_weight_decay=decoupled_weight_decay,
            beta1_tensor=beta1_tensor,
            beta2_tensor=beta2_tensor,
            **common,
        )


class AdamW(Adam, torch.optim.AdamW):
    """Drop-in for :class:`torch.optim.AdamW` (Adam with decoupled weight decay)."""

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
        self._after_torch_init(master_weights, max_grad_norm, l1_decay, l1_mode)
