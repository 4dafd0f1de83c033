"""Adagrad with lr decay and weight decay; sparse grads as torch.optim.Adagrad."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim.adagrad import adagrad as torch_adagrad

from fused_opt import _ops
from fused_opt.optimizer import (
    DeviceBucket,
    FusedOptimizer,
    new_step,
    place_step,
    uses_master,
)


class Adagrad(FusedOptimizer, torch.optim.Adagrad):
    """Drop-in for :class:`torch.optim.Adagrad`: same signature, defaults, errors and state,
    with every group's step in one fused op call per device.

    Args:
        params: an iterable of tensors or of param group dicts, as for torch.optim.
        lr: learning rate, a float or a one-element float tensor. Default 1e-2.
        lr_decay: learning rate decay per step. Default 0.
        weight_decay: L2 penalty added to the gradient. Default 0.
        initial_accumulator_value: the starting value of the ``sum`` state. Default 0.
        eps: added to the denominator. Default 1e-10.
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
            (csrc/include/fused_opt/math/l1.h). Sparse grads take no L1. Default ``"subgradient"``.
        foreach, fused: accepted and stored in the param groups, so state dicts round-trip with
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

    As in torch, the state (``step`` and ``sum``) is created in the constructor. Sparse
    gradients are handled by torch's own single-tensor path. ``foreach`` and ``fused`` are
    accepted and stored; ``differentiable=True`` raises NotImplementedError.
    """

    _sparse_weight_decay_error = "weight_decay option is not compatible with sparse gradients"
    _number_keys = ("lr_decay", "weight_decay", "eps")

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-2,
        lr_decay: float = 0,
        weight_decay: float = 0,
        initial_accumulator_value: float = 0,
        eps: float = 1e-10,
        foreach: bool | None = None,
        *,
        maximize: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        master_weights: bool = False,
        max_grad_norm: float | None = None,
        l1_decay: float | Tensor = 0.0,
        l1_mode: str = "subgradient",
    ) -> None:
        self._reject_differentiable(differentiable)
        torch.optim.Adagrad.__init__(
            self,
            params,
            lr,
            lr_decay,
            weight_decay,
            initial_accumulator_value,
            eps,
            foreach,
            maximize=maximize,
            differentiable=differentiable,
            fused=fused,
        )
        self._after_torch_init(master_weights, max_grad_norm, l1_decay, l1_mode)
        for group in self.param_groups:
            for p in group["params"]:
                place_step(p, self.state[p])
                # torch made the sum in the param's dtype, which may round its initial value.
                # The master is made here too: torch.distributed.checkpoint loads into the keys
                # the state already has, and would otherwise leave it out.
                if uses_master(group, p):
                    self.state[p].update(self._new_state(p, group, torch.float32))
                    self._ensure_state(p, self.state[p], group, self._state_keys(group), True)

    def _state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("sum",)

    def _new_state(self, p: Tensor, group: dict[str, Any], dtype: torch.dtype) -> dict[str, Tensor]:
        # Params added with add_param_group after construction get their state here. Like
        # torch.optim.Adagrad, fill with the constructor's value even when the group has its own.
        initial = self.defaults["initial_accumulator_value"]
        fill = complex(initial, initial) if p.is_complex() else initial
        return {
            "step": new_step(p),
            "sum": torch.full_like(p, fill, dtype=dtype, memory_format=torch.preserve_format),
        }

    def _call_modes(self, group: dict[str, Any]) -> tuple[bool, ...]:
        return (group["maximize"],)

    def _launch(self, bucket: DeviceBucket, common: dict[str, Any]) -> None:
        (maximize,) = self._call_modes(bucket.groups[0])
        _ops.op_namespace.adagrad_(
            bucket.params,
            bucket.grads,
            bucket.states["sum"],
            bucket.steps,
            bucket.masters,
            lr_decay=bucket.hypers("lr_decay"),
            weight_decay=bucket.hypers("weight_decay"),
            eps=bucket.hypers("eps"),
            maximize=maximize,
            **common,
        )

    def _step_sparse(self, group: dict[str, Any], params: list[Tensor]) -> None:
        torch_adagrad(
            params,
            [p.grad for p in params],
            [self.state[p]["sum"] for p in params],
            [self.state[p]["step"] for p in params],
            has_sparse_grad=True,
            foreach=False,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            lr_decay=group["lr_decay"],
            eps=group["eps"],
            maximize=group["maximize"],
        )
