"""The step plan: what a step() finds out per param, kept for the next step.

Everything a step works out per param repeats from one step to the next (which op call a param
goes to, its state tensors, its step counter, its master) except its grad, which autograd hands
anew each step. After a full step, the optimizer keeps these as a plan (``fused_opt._C.StepPlan``,
csrc/step_plan.cpp): the op calls of that step with their tensor lists converted once. The next
step reads each param's grad in C++ and repeats the calls with the hyperparameters of that step.

The plan is used only while nothing it was made from has changed. The structure that decides the
calls is compared in Python, per group: the group objects, their ``params`` lists and lengths,
the options that pick the op call and the state tensors, and the ``state`` dict object
(``load_state_dict`` replaces groups and state; ``add_param_group`` adds a group). The C++ side
compares the state's entries (clearing the state restarts it) and checks each param: its grad
present (and none new), of the param's dtype, device, shape and layout, the param unchanged in
dtype, device, shape and layout, and the version counter of every param with a master or a Kahan
compensation. Anything
else (a grad set to None or replaced by one of another kind, a dtype or device change, a
master-weight param written in place, a param's state dict or one of its state tensors replaced
by another object) sends the step through the full path, which checks, reports and makes a new
plan.

Loss scaling is read every step. A group's hyperparameters are checked, and the op arguments made
from them, again whenever one of its values is not the very object it was at the last step
(immutable values only; a group holding a tensor or a list is checked and read anew every step).
fused_opt.GradScaler's statistics pass leaves the grads it read in the plan for the step that
follows (``holding``), so both take the same grads and read them once.

A plan is made only for what it can repeat exactly: dense grads in their param's layout on one
device, no DTensor or complex params, no ``shard_group`` (whose collective it lacks), outside
torch.compile.
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from fused_opt import _C, _distributed, _ops

if TYPE_CHECKING:
    from fused_opt.optimizer import DeviceBucket, FusedOptimizer, GradStats


class StepPlan:
    """The op calls of one step, for the optimizer's next steps (see the module docstring)."""

    def __init__(
        self,
        optimizer: FusedOptimizer,
        device: torch.device,
        buckets: list[DeviceBucket],
        stepped: list[Tensor],
        idle: list[Tensor],
        norm_stats: GradStats,
    ) -> None:
        self.namespace = _ops.op_namespace
        self.state = optimizer.state
        self.groups = list(optimizer.param_groups)
        self.param_lists = [group["params"] for group in self.groups]
        self.lengths = [len(params) for params in self.param_lists]
        self.shapes = [optimizer._group_shape(group) for group in self.groups]
        self.device = device
        self.buckets = buckets
        self.norm_stats = norm_stats
        # The groups whose hyperparameters a step checks: those with a grad.
        self.stepping_groups = [
            (index, group)
            for index, group in enumerate(self.groups)
            if any(p.grad is not None for p in group["params"])
        ]
        versioned = [
            (p, optimizer._master_versions[p]) for bucket in buckets for p in bucket.watched
        ]
        self.native = _C.StepPlan(idle, versioned, optimizer.state)
        # Whether the native plan holds grads gathered by gather_grads().
        self.holding = False
        namespace = self.namespace.name
        # Per stepping group, the values its hyperparameters were last checked and read from.
        self.checked: dict[int, tuple[Any, ...] | None] = {}
        # Per call, the op's keyword arguments made from those values (None: to be made).
        self.options: list[dict[str, Any] | None] = [None] * len(buckets)
        self.calls = []
        for bucket in buckets:
            lists, options = optimizer._op_arguments(bucket)
            index = self.native.add_call(
                f"{namespace}::{optimizer._op_name}", bucket.params, list(lists), options
            )
            self.calls.append((index, bucket))
        self.norm_call = self.native.add_call(
            f"{namespace}::grad_norm_",
            stepped,
            [None, norm_stats.norm, norm_stats.found_inf, norm_stats.workspace],
            {},
        )

    @classmethod
    def of_step(
        cls,
        optimizer: FusedOptimizer,
        buckets: dict[tuple[Any, ...], DeviceBucket],
        norm_stats: dict[Any, GradStats],
    ) -> StepPlan | None:
        """The plan that repeats the step that just ran the op calls of ``buckets``, or None
        where a plan could not repeat it exactly."""
        if not buckets or torch.compiler.is_compiling():
            return None
        devices = {device for device, *_ in buckets}
        if len(devices) != 1:
            return None
        (device,) = devices
        stepped, idle = [], []
        for group in optimizer.param_groups:
            for p in group["params"]:
                grad = p.grad
                if grad is None:
                    idle.append(p)
                elif grad.is_sparse or _distributed.is_dtensor(p):
                    return None
                else:
                    stepped.append(p)
        for bucket in buckets.values():
            # A param the step took as a view (complex, a DTensor's shard) or whose grad it
            # copied into the param's layout is one that the plan could not hand over as it is.
            for p, grad, origin in zip(bucket.params, bucket.grads, bucket.origins):
                if p is not origin or grad is not origin.grad:
                    return None
        stats = norm_stats.get((device, None))
        if stats is None:
            from fused_opt.optimizer import GradStats

            stats = norm_stats[device, None] = GradStats.on(device)
        return cls(optimizer, device, list(buckets.values()), stepped, idle, stats)

    def fits(self, optimizer: FusedOptimizer) -> bool:
        """Whether the optimizer's groups and state are still those the plan was made from (the
        per-param checks come in gather_grads)."""
        groups = optimizer.param_groups
        if (
            len(groups) != len(self.groups)
            or optimizer.state is not self.state
            or _ops.op_namespace is not self.namespace
        ):
            return False
        for group, planned, params, length, shape in zip(
            groups, self.groups, self.param_lists, self.lengths, self.shapes
        ):
            if group is not planned or group["params"] is not params or len(params) != length:
                return False
            try:
                if optimizer._group_shape(group) != shape:
                    return False
            except (TypeError, ValueError):
                # A hyperparameter the modes are made from is bad: the full path says which.
                return False
        return True

    def gather_grads(self) -> bool:
        """Reads every param's grad in C++; False when one no longer fits the plan. The grads
        are held until release_grads()."""
        self.holding = self.native.gather_grads()
        return self.holding

    def release_grads(self) -> None:
        self.native.release_grads()
        self.holding = False

    def grad_stats(self, grad_scale: Tensor | None) -> dict[torch.device, GradStats]:
        """The grad_norm_ pass of the full path over the gathered grads (same order, same bits);
        ``grad_scale`` is on the plan's device."""
        self.native.call(self.norm_call, {"grad_scale": grad_scale})
        return {self.device: self.norm_stats}

    def check_hyperparameters(self, optimizer: FusedOptimizer) -> None:
        """Checks every stepping group's hyperparameters, as the full path does; a group whose
        values are the same objects as when they last passed needs no check."""
        changed = []
        for index, group in self.stepping_groups:
            values = tuple(group.values())
            checked = self.checked.get(index)
            if checked is not None and len(checked) == len(values):
                if all(map(operator.is_, checked, values)):
                    continue
            optimizer._check_hyperparameters(f"param_groups[{index}]", group, stepping=True)
            changed.append((index, values if _immutable(group) else None))
        if changed:
            self.checked.update(changed)
            self.options = [None] * len(self.calls)

    def step(self, optimizer: FusedOptimizer, scaling: dict[str, Any]) -> None:
        """The step's op calls over the gathered grads, with this step's hyperparameters (after
        check_hyperparameters)."""
        for position, (index, bucket) in enumerate(self.calls):
            options = self.options[position]
            if options is None:
                _, options = optimizer._op_arguments(bucket)
                options.update(optimizer._common_arguments(self.device, bucket, {}))
                self.options[position] = options
            self.native.call(index, {**options, **scaling})


# Hyperparameter values that cannot change without being replaced by another object.
_IMMUTABLE = (float, int, bool, str, type(None))


def _immutable(group: dict[str, Any]) -> bool:
    """Whether every hyperparameter of the group is an immutable value (a tensor, say, may be
    changed in place and is then read anew every step)."""
    for key, value in group.items():
        if key in ("params", "param_names"):
            continue
        if type(value) is tuple:
            if not all(type(item) in _IMMUTABLE for item in value):
                return False
        elif type(value) not in _IMMUTABLE:
            return False
    return True
