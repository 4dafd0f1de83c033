"""SGD with momentum, dampening, Nesterov and weight decay; sparse grads as torch.optim.SGD."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim.sgd import sgd as torch_sgd

from fused_opt.optimizer import DeviceBucket, FusedOptimizer, new_step, plain_bool


class SGD(FusedOptimizer, torch.optim.SGD):
    """Drop-in for :class:`torch.optim.SGD`: same signature, defaults, errors and state, with
    every group's step in one fused op call per device.

    Args:
        params: an iterable of tensors or of param group dicts, as for torch.optim.
        lr: learning rate, a float or a one-element float tensor. Default 1e-3.
        momentum: momentum factor; 0 keeps no buffer. Default 0.
        dampening: dampening of the momentum. Default 0.
        weight_decay: L2 penalty added to the gradient. Default 0.
        nesterov: Nesterov momentum (needs momentum > 0 and dampening 0). Default False.
        maximize: ascend instead of descending. Default False.
        {fused_args}
        foreach, fused: accepted and stored in the param groups, so state dicts round-trip with
            torch.optim; they do not change how fused_opt computes.
        differentiable: must be False; True raises NotImplementedError.

    Attributes:
        {fused_attributes}

    The momentum buffer takes the first gradient as is, as in torch. With momentum, the state
    also keeps a ``step`` counter beside the buffer (torch's SGD has none): the kernel starts the
    buffer on the step that takes the counter to one, so a first step that GradScaler skips
    leaves the buffer unstarted instead of uninitialized. Sparse gradients are
    handled by torch's own single-tensor path, so results match torch exactly for them.
    ``foreach`` and ``fused`` are accepted and stored; ``differentiable=True`` raises
    NotImplementedError.
    """

    _sparse_weight_decay_error = (
        "add(sparse, dense) is not supported. Use add(dense, sparse) instead."
    )
    _number_keys = ("momentum", "dampening", "weight_decay")
    _op_name = "sgd_"

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
        self._after_torch_init(
            master_weights, max_grad_norm, l1_decay, l1_mode, shard_group, state_dtype,
            param_rounding, rounding_seed,
        )

    _signed_state_keys = frozenset({"momentum_buffer"})

    def _state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("momentum_buffer",) if group["momentum"] != 0 else ()

    def _keeps_step(self, group: dict[str, Any]) -> bool:
        # Stochastic rounding hashes the step (csrc/include/fused_opt/math/rounding.h).
        return group["momentum"] != 0 or group["param_rounding"] == "stochastic"

    def _lazy_key(self, key: str) -> bool:
        # torch.optim.SGD creates the buffer on the first step and keeps no counter.
        return key in ("momentum_buffer", "step")

    def state_dict(self) -> dict[str, Any]:
        """As torch.optim.SGD's, without the step counters, so that the two have the same keys
        (see FusedOptimizer.state_dict). A saved buffer loads as a started one, as in torch: a
        buffer not started yet (every step so far skipped: zeros) resumes as a started one, so
        with dampening its next grad is weighed by 1 - dampening instead of 1, as torch.optim.SGD
        does with that checkpoint."""
        state_dict = super().state_dict()
        # Stochastic rounding's counters are kept: they decide the random bits of the next step.
        counted = {
            index
            for group in state_dict["param_groups"]
            if group.get("param_rounding") == "stochastic"
            for index in group["params"]
        }
        state_dict["state"] = {
            index: {
                key: value for key, value in state.items() if key != "step" or index in counted
            }
            for index, state in state_dict["state"].items()
        }
        return state_dict

    def _complete_loaded_state(self, state: dict[str, Any], group: dict[str, Any]) -> None:
        # The counter tells the kernel whether the buffer has been started. torch.optim.SGD keeps
        # none: a buffer it saved has been started; a buffer missing starts afresh, as in torch.
        # Without momentum, only stochastic rounding keeps (and saves) a counter.
        if state.get("momentum_buffer") is None:
            if group["momentum"] != 0 or not self._keeps_step(group):
                state.pop("step", None)
        elif state.get("step") is None:
            state["step"] = torch.ones((), dtype=torch.float32)

    def _new_state(self, p: Tensor, group: dict[str, Any], dtype: torch.dtype) -> dict[str, Tensor]:
        # The kernel writes the whole buffer on its first step, but a first step that GradScaler
        # skips leaves it unwritten, and state_dict() would hand out uninitialized memory as a
        # buffer that torch.optim.SGD takes for a started one.
        state = {"step": new_step(p)} if self._keeps_step(group) else {}
        if group["momentum"] != 0:
            state["momentum_buffer"] = torch.zeros_like(
                p, dtype=dtype, memory_format=torch.preserve_format
            )
        return state

    def _call_modes(self, group: dict[str, Any]) -> tuple[bool, ...]:
        # A momentum schedule that reaches 0 turns a Nesterov group into plain SGD, as in torch.
        has_momentum = plain_bool(group["momentum"] != 0)
        # Step counters are all the call's tensors' or none.
        keeps_step = plain_bool(self._keeps_step(group))
        return (has_momentum, group["nesterov"] and has_momentum, group["maximize"], keeps_step)

    def _op_arguments(
        self, bucket: DeviceBucket
    ) -> tuple[tuple[list[Tensor], ...], dict[str, Any]]:
        _, nesterov, maximize, _ = self._call_modes(bucket.groups[0])
        lists = (
            bucket.params,
            bucket.grads,
            bucket.states.get("momentum_buffer", []),
            bucket.steps,
            bucket.masters,
        )
        return lists, {
            "momentum": bucket.hypers("momentum"),
            "dampening": bucket.hypers("dampening"),
            "weight_decay": bucket.hypers("weight_decay"),
            "nesterov": nesterov,
            "maximize": maximize,
        }

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
