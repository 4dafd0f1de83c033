"""The shared base class: everything an optimizer needs except its math and its op call.

A subclass inherits from this class and from its torch.optim twin (``class Adam(FusedOptimizer,
torch.optim.Adam)``): the twin's constructor supplies the exact signature, defaults, validation
messages, ``__setstate__`` and state-dict policies, while this class replaces ``step()`` with
one op call per (param group, device) over all of that group's tensors and dtypes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from fused_opt import _ops  # noqa: F401  (loads the library that registers the ops)


@dataclass
class DeviceBucket:
    """The tensors of one param group on one device, in the order the op takes them."""

    params: list[Tensor] = field(default_factory=list)
    grads: list[Tensor] = field(default_factory=list)
    states: dict[str, list[Tensor]] = field(default_factory=dict)
    steps: list[Tensor] = field(default_factory=list)
    first_step: list[bool] = field(default_factory=list)


class FusedOptimizer(Optimizer):
    """Base class of fused_opt's optimizers.

    Subclasses define:
      * ``_state_keys(group)``: names of the per-element state tensors, in the op's order;
      * ``_has_step``: whether the state keeps a ``step`` counter (all but SGD);
      * ``_new_state(p, group)``: the state of a param on its first step, when it is not zeros;
      * ``_launch(group, bucket, lr, lr_tensor)``: the one op call for a bucket;
      * ``_sparse_grad_error``: torch.optim's message for sparse grads, or None when the
        optimizer accepts them, in which case ``_step_sparse(group, params)`` handles them;
      * ``_sparse_weight_decay_error``: torch.optim's message for a sparse grad in a group with
        weight decay, which torch's sparse path cannot apply.
    """

    _has_step = True
    _sparse_grad_error: str | None = None
    _sparse_weight_decay_error: str | None = None

    @staticmethod
    def _reject_differentiable(differentiable: bool) -> None:
        if differentiable:
            raise NotImplementedError(
                "fused_opt optimizers do not support differentiable=True; "
                "use torch.optim for differentiating through the optimizer step"
            )

    def _after_torch_init(self) -> None:
        # torch's constructors declare AMP support when fused=True because their fused kernels
        # read grad_scale/found_inf; these kernels do not, so GradScaler must unscale first.
        self._step_supports_amp_scaling = False

    # ----------------------------------------------------------------------------------------
    # Subclass interface

    def _state_keys(self, group: dict[str, Any]) -> Sequence[str]:
        raise NotImplementedError

    def _new_state(self, p: Tensor, group: dict[str, Any]) -> dict[str, Tensor]:
        """A param's first-step state: a zero step counter and zeroed state tensors."""
        state = {"step": torch.zeros((), dtype=torch.float32, device=p.device)}
        for key in self._state_keys(group):
            state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _launch(
        self, group: dict[str, Any], bucket: DeviceBucket, lr: float, lr_tensor: Tensor | None
    ) -> None:
        raise NotImplementedError

    def _step_sparse(self, group: dict[str, Any], params: list[Tensor]) -> None:
        raise NotImplementedError

    # ----------------------------------------------------------------------------------------
    # step()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Performs one optimization step for every param group.

        Args:
            closure (Callable, optional): A closure that reevaluates the model and returns the
                loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Validate every group before touching any tensor, so a bad grad anywhere leaves the
        # whole optimizer as it was.
        sparse_params = [
            self._validate_group(index, group) for index, group in enumerate(self.param_groups)
        ]
        for group, sparse in zip(self.param_groups, sparse_params):
            self._run_group(group, sparse)
        return loss

    def _validate_group(self, group_index: int, group: dict[str, Any]) -> list[Tensor]:
        """Checks every grad of the group; returns the params whose grads are sparse."""
        sparse_params = []
        for param_index, p in enumerate(group["params"]):
            grad = p.grad
            if grad is None:
                continue
            if grad.is_sparse:
                if self._sparse_grad_error is not None:
                    raise RuntimeError(self._sparse_grad_error)
                # torch's sparse path raises this only midway through the step; here it comes
                # before any tensor is touched.
                if group["weight_decay"] != 0:
                    raise RuntimeError(self._sparse_weight_decay_error)
                sparse_params.append(p)
                continue
            self._check_dense_grad(group_index, param_index, group, p, grad)
        return sparse_params

    def _check_dense_grad(
        self, group_index: int, param_index: int, group: dict[str, Any], p: Tensor, grad: Tensor
    ) -> None:
        for what, got, want in (
            ("dtype", grad.dtype, p.dtype),
            ("device", grad.device, p.device),
            ("shape", tuple(grad.shape), tuple(p.shape)),
        ):
            if got != want:
                raise RuntimeError(
                    f"{type(self).__name__}: the grad of "
                    f"{self._describe_param(group_index, param_index, group, p)} has {what} "
                    f"{got} but the param has {what} {want}"
                )
        if not _is_dense(p):
            raise RuntimeError(
                f"{type(self).__name__}: "
                f"{self._describe_param(group_index, param_index, group, p)} is a strided view "
                f"with gaps (strides {p.stride()}); fused_opt updates dense params only"
            )

    @staticmethod
    def _describe_param(group_index: int, param_index: int, group: dict[str, Any], p: Tensor) -> str:
        names = group.get("param_names")
        where = (
            f"param '{names[param_index]}'"
            if names is not None and param_index < len(names)
            else f"param_groups[{group_index}]['params'][{param_index}]"
        )
        return f"{where} (shape {tuple(p.shape)}, dtype {p.dtype})"

    def _run_group(self, group: dict[str, Any], sparse_params: list[Tensor]) -> None:
        keys = self._state_keys(group)
        # Plain SGD keeps no state at all, and its params get no (empty) state entries, as in torch.
        stateful = bool(keys) or self._has_step
        buckets: dict[torch.device, DeviceBucket] = {}
        for p in group["params"]:
            grad = p.grad
            if grad is None or grad.is_sparse:
                continue
            state = self.state[p] if stateful else {}
            first_step = self._ensure_state(p, state, group, keys) if stateful else False
            bucket = buckets.setdefault(p.device, DeviceBucket())
            # The kernels walk param, grad and states as one flat range; autograd gives grads the
            # param's layout, and the rare grad that differs is copied into it.
            if p.numel() > 1 and grad.stride() != p.stride():
                grad = torch.empty_like(p).copy_(grad)
            as_real = torch.view_as_real if p.is_complex() else _identity
            bucket.params.append(as_real(p))
            bucket.grads.append(as_real(grad))
            for key in keys:
                bucket.states.setdefault(key, []).append(as_real(state[key]))
            if self._has_step:
                bucket.steps.append(state["step"])
            bucket.first_step.append(first_step)

        lr, lr_tensor = _split_lr(group["lr"])
        for bucket in buckets.values():
            self._launch(group, bucket, lr, lr_tensor)
        if sparse_params:
            self._step_sparse(group, sparse_params)

    def _ensure_state(
        self, p: Tensor, state: dict[str, Any], group: dict[str, Any], keys: Sequence[str]
    ) -> bool:
        """Creates missing state; returns whether this is the param's first step."""
        first_step = len(state) == 0 or any(state.get(key) is None for key in keys)
        if first_step:
            fresh = self._new_state(p, group)
            for key, value in fresh.items():
                if state.get(key) is None:
                    state[key] = value
        return first_step

    # ----------------------------------------------------------------------------------------
    # Checkpoints

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a state dict saved by this class or by its torch.optim twin.

        Shapes and keys are checked for every param before anything is loaded, so a mismatched
        checkpoint raises a ValueError naming the param and leaves the optimizer unchanged.
        """
        self._check_state_dict(state_dict)
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            keys = self._state_keys(group)
            for p in group["params"]:
                state = self.state.get(p)
                if not state:
                    continue
                step = state.get("step")
                if step is not None:
                    if not torch.is_tensor(step):
                        step = torch.tensor(float(step))
                    # The kernels keep the counter beside the param, in float32, as torch's fused
                    # and capturable paths do.
                    state["step"] = step.to(device=p.device, dtype=torch.float32)
                for key in keys:
                    value = state.get(key)
                    # torch may have built a buffer in its grad's layout (SGD clones the grad);
                    # the kernels walk it as the param's flat range, so give it that layout.
                    if torch.is_tensor(value) and p.numel() > 1 and value.stride() != p.stride():
                        state[key] = torch.empty_like(p).copy_(value)

    def _check_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved_groups = state_dict.get("param_groups")
        saved_state = state_dict.get("state")
        if saved_groups is None or saved_state is None:
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: expected the keys 'state' and "
                "'param_groups'"
            )
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: the state dict has "
                f"{len(saved_groups)} param groups but the optimizer has {len(self.param_groups)}"
            )
        for group_index, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if len(group["params"]) != len(saved["params"]):
                raise ValueError(
                    f"{type(self).__name__}.load_state_dict: param group {group_index} has "
                    f"{len(saved['params'])} params in the state dict but "
                    f"{len(group['params'])} in the optimizer"
                )
            merged = {**group, **{k: v for k, v in saved.items() if k != "params"}}
            keys = self._state_keys(merged)
            for param_index, (p, saved_id) in enumerate(zip(group["params"], saved["params"])):
                state = saved_state.get(saved_id)
                if not state:
                    continue
                label = self._describe_param(group_index, param_index, group, p)
                missing = [k for k in keys if state.get(k) is None and not self._lazy_key(k)]
                if self._has_step and "step" not in state:
                    missing.append("step")
                if missing:
                    raise ValueError(
                        f"{type(self).__name__}.load_state_dict: the state of {label} lacks "
                        f"{', '.join(repr(k) for k in missing)}"
                    )
                for key in keys:
                    value = state.get(key)
                    if torch.is_tensor(value) and tuple(value.shape) != tuple(p.shape):
                        raise ValueError(
                            f"{type(self).__name__}.load_state_dict: state '{key}' of {label} "
                            f"has shape {tuple(value.shape)} but the param has shape "
                            f"{tuple(p.shape)}"
                        )

    def _lazy_key(self, key: str) -> bool:
        """Whether a saved state may lack `key` (SGD's buffer is created on the first step)."""
        return False


def _is_dense(t: Tensor) -> bool:
    """Whether the elements fill one gap-free block of memory, in any dimension order."""
    if t.is_contiguous():
        return True
    expected_stride = 1
    for stride, size in sorted((s, n) for n, s in zip(t.shape, t.stride()) if n != 1):
        if stride != expected_stride:
            return False
        expected_stride *= size
    return True


def _identity(t: Tensor) -> Tensor:
    return t


def _split_lr(lr: float | Tensor) -> tuple[float, Tensor | None]:
    """A tensor lr is read by the kernel itself, so changing it in place needs no new call."""
    if torch.is_tensor(lr):
        return 0.0, lr
    return float(lr), None


def hyper(value: float | Tensor) -> float:
    """A hyperparameter the kernels take by value (betas, weight decay, ...)."""
    return float(value)
