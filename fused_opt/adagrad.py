"""Adagrad with lr decay and weight decay; sparse grads as torch.optim.Adagrad."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim.adagrad import adagrad as torch_adagrad

from fused_opt.optimizer import (
    COMPENSATION_KEY,
    MASTER_KEY,
    DeviceBucket,
    FusedOptimizer,
    new_step,
    place_step,
    uses_compensation,
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
        {fused_args}
        foreach, fused: accepted and stored in the param groups, so state dicts round-trip with
            torch.optim; they do not change how fused_opt computes.
        differentiable: must be False; True raises NotImplementedError.

    Attributes:
        {fused_attributes}

    As in torch, the state (``step`` and ``sum``) is created in the constructor. Sparse
    gradients are handled by torch's own single-tensor path. ``foreach`` and ``fused`` are
    accepted and stored; ``differentiable=True`` raises NotImplementedError.
    """

    _sparse_weight_decay_error = "weight_decay option is not compatible with sparse gradients"
    _number_keys = ("lr_decay", "weight_decay", "eps")
    _op_name = "adagrad_"

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
        state_dtype: torch.dtype | None = None,
        param_rounding: str = "nearest",
        rounding_seed: int = 0,
        shard_group: Any = None,
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
        self._after_torch_init(
            master_weights, max_grad_norm, l1_decay, l1_mode, shard_group, state_dtype,
            param_rounding, rounding_seed,
        )
        for group in self.param_groups:
            for p in group["params"]:
                place_step(p, self.state[p])
                # torch made the sum in the param's dtype, which may round its initial value.
                # The master (or compensation) is made here too: torch.distributed.checkpoint
                # loads into the keys the state already has, and would otherwise leave it out.
                if uses_master(group, p):
                    self.state[p].update(self._new_state(p, group, torch.float32))
                    self._ensure_state(p, self.state[p], group, self._state_keys(group),
                                       MASTER_KEY)
                elif uses_compensation(group, p):
                    self._ensure_state(p, self.state[p], group, self._state_keys(group),
                                       COMPENSATION_KEY)
                # In the dtype the step keeps it in, for the same reason: DCP loads a saved
                # 8-bit sum only into a tensor of its own shape.
                self._cast_states(p, self.state[p], self._state_keys(group),
                                  self._state_dtype_of(group, p))

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

    def _op_arguments(
        self, bucket: DeviceBucket
    ) -> tuple[tuple[list[Tensor], ...], dict[str, Any]]:
        (maximize,) = self._call_modes(bucket.groups[0])
        lists = (
            bucket.params,
            bucket.grads,
            bucket.states["sum"],
            bucket.steps,
            bucket.masters,
        )
        return lists, {
            "lr_decay": bucket.hypers("lr_decay"),
            "weight_decay": bucket.hypers("weight_decay"),
            "eps": bucket.hypers("eps"),
            "maximize": maximize,
        }

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
