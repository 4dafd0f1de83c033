"""The shared base class: everything an optimizer needs except its math and its op call.

A subclass inherits from this class and from its torch.optim twin (``class Adam(FusedOptimizer,
torch.optim.Adam)``): the twin's constructor supplies the exact signature, defaults, validation
messages, ``__setstate__`` and state-dict policies, while this class replaces ``step()`` with
one op call per device over the tensors, dtypes and param groups of every group (more only
where groups differ in a mode that changes which state tensors exist, or in master weights).

Mixed precision lives here too, for every optimizer alike: fp32 master weights for 16-bit params
(``master_weights=True``), the loss scale and skip flag of ``torch.amp.GradScaler`` applied inside
the kernels (``_step_supports_amp_scaling``), and global-norm clipping (``max_grad_norm=``) from a
read-only statistics pass over the gradients.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from fused_opt import _distributed, _ops, _quantize
from fused_opt._plan import StepPlan

MASTER_KEY = "master_param"
#: The state key of a bfloat16 param's Kahan compensation under ``param_rounding="kahan"``.
COMPENSATION_KEY = "kahan_compensation"
#: The ways ``l1_mode`` applies ``l1_decay`` (csrc/include/fused_opt/math/l1.h).
L1_MODES = ("subgradient", "proximal")
#: The ways ``param_rounding`` stores updated bfloat16 params without master weights
#: (csrc/include/fused_opt/math/rounding.h).
PARAM_ROUNDINGS = ("nearest", "stochastic", "kahan")
# A group without these keys (a torch.optim checkpoint, or one saved before fused_opt had L1 or
# param_rounding) was trained without L1 and rounded to nearest; state_dict() leaves them out of
# a group that has these values.
_NEUTRAL_OPTIONS = {
    "l1_decay": 0.0,
    "l1_mode": "subgradient",
    "param_rounding": "nearest",
    "rounding_seed": 0,
}
# The options fused_opt adds to every param group.
_FUSED_GROUP_KEYS = ("master_weights", "max_grad_norm", "state_dtype", *_NEUTRAL_OPTIONS)
#: What ``state_dtype`` may be: None (the dtype of what the states update: the param, or its
#: float32 master), or one of these; torch.uint8 is the blockwise 8-bit format of
#: fused_opt/_quantize.py.
STATE_DTYPES = (torch.float32, torch.bfloat16, torch.uint8)
_MASTER_DTYPES = (torch.float16, torch.bfloat16)
# Params up to this many elements (under one multi-tensor chunk of torch's and apex's kernels)
# get their first states as views of shared buffers (_make_states_together); a larger param's
# data outweighs its metadata, and its states stay its own to free or save alone.
SHARED_STATE_MAX_NUMEL = 1 << 16
# Params a master-weight op call also takes, as their own masters (complex64: pairs of float32).
_OWN_MASTER_DTYPES = (torch.float32, torch.complex64)


@dataclass
class DeviceBucket:
    """The tensors of one op call: the params of one device that agree in master weights and in
    the optimizer's call-wide modes, group after group, in the order the op takes them."""

    params: list[Tensor] = field(default_factory=list)
    grads: list[Tensor] = field(default_factory=list)
    #: The optimizer's params themselves, of which ``params`` may hold views (complex, DTensor).
    origins: list[Tensor] = field(default_factory=list)
    #: The params (of ``origins``) with a master weight or a Kahan compensation, which depend on
    #: the param's value: a step watches their version counters.
    watched: list[Tensor] = field(default_factory=list)
    states: dict[str, list[Tensor]] = field(default_factory=dict)
    steps: list[Tensor] = field(default_factory=list)
    masters: list[Tensor] = field(default_factory=list)
    #: The param groups of the call, each owning the next ``group_sizes[i]`` params.
    groups: list[dict[str, Any]] = field(default_factory=list)
    group_sizes: list[int] = field(default_factory=list)

    def enter(self, group: dict[str, Any]) -> None:
        """Counts one more param of ``group``, whose params come one after another."""
        if not self.groups or self.groups[-1] is not group:
            self.groups.append(group)
            self.group_sizes.append(0)
        self.group_sizes[-1] += 1

    def hypers(self, key: str) -> list[float]:
        """A hyperparameter the kernels take by value, one per group."""
        return [hyper(group[key]) for group in self.groups]

    @staticmethod
    def split_hypers(
        values: Sequence[float | Tensor],
    ) -> tuple[list[float], list[Tensor | None]]:
        """Per-group hyperparameters that may be tensors: the floats and the tensors (see
        split_hyper)."""
        floats, tensors = zip(*(split_hyper(value) for value in values))
        return list(floats), list(tensors)


@dataclass
class GradStats:
    """What the read-only gradient pass leaves on one device; reused every step, so a step
    allocates nothing. ``norm`` is the unscaled global norm of all the optimizer's gradients."""

    norm: Tensor
    found_inf: Tensor
    workspace: Tensor

    @classmethod
    def on(cls, device: torch.device) -> GradStats:
        scalar = {"dtype": torch.float32, "device": device}
        return cls(
            torch.zeros((), **scalar),
            torch.zeros((), **scalar),
            torch.zeros(_ops.GRAD_NORM_WORKSPACE_NUMEL, **scalar),
        )


# The parts of every optimizer's docstring that all of them share, written once: a class
# docstring's lines "{fused_args}" and "{fused_attributes}" become these (see __init_subclass__).
_FUSED_ARGS_DOC = """\
        master_weights: keep a float32 master copy of every float16/bfloat16 param in the state
            (``"master_param"``, made from the param on its first step) with float32 states, and
            update master, states and the 16-bit param in the same single pass. Other params
            are their own masters. In-place edits of a 16-bit param between steps are kept
            (see ``refresh_master_weights``). Default False.
        max_grad_norm: clip the global L2 norm of all gradients of all groups (of all ranks, for
            DTensor params, or over ``shard_group``) to this value, with
            ``torch.nn.utils.clip_grad_norm_``'s formula, in registers after one read-only norm
            pass (the gradients are never written). Every group must have the same value.
            Default None: no clipping.
        l1_decay: L1 penalty per group (>= 0), with ``weight_decay`` the elastic net, in the
            same pass. Default 0: none.
        l1_mode: ``"subgradient"`` adds ``l1_decay * sign(p)`` to the gradient (the step on
            ``loss + l1_decay * p.abs().sum()``); ``"proximal"`` soft-thresholds the param after
            the update by ``l1_decay`` times its per-element step size, which gives exact zeros
            (csrc/include/fused_opt/math/l1.h). Sparse grads take no L1. Default
            ``"subgradient"``.
        shard_group: the plain-tensor params of this optimizer are disjoint shards of one model
            over this ``torch.distributed`` process group (True: the default group), as each
            rank's part under ``ZeroRedundancyOptimizer``, which passes the keyword on: the norm
            of ``max_grad_norm`` and :class:`fused_opt.GradScaler`'s inf/NaN flag are summed over
            the group in one ``all_reduce`` per step, so every rank clips by the same coefficient
            and skips the same steps. Not saved in the state dict (a process group cannot be
            pickled). Through ZeroRedundancyOptimizer, which keeps its keywords in its own param
            groups and so in its checkpoints, give True for its default group, or set
            ``zero.optim.shard_group = group`` for another. DTensor params are summed over their
            mesh without it. Default None: the statistics are this process's alone.
        state_dtype: how the per-element states (moments, buffers, sums) are stored, per
            group: None, the dtype of what they update (the param, or its float32 master), or
            ``torch.bfloat16`` beside float32 params and masters, which halves their memory
            and bytes moved; the math runs in float32 and rounds the states to nearest when it
            stores them. Or ``torch.uint8``: blockwise 8-bit states beside float32 params and
            masters of at least 4,096 elements (smaller ones keep float32 states), one byte per
            element plus a float32 maximum per 256 (fused_opt/_quantize.py), decoded and
            encoded again in the same pass (not for DTensor params, nor centered RMSprop).
            ``torch.float32`` is the
            default's dtype for float32 params and masters. Saved in a group only where it
            differs from the optimizer's default; torch.optim loads bfloat16 states as its
            param's dtype, and 8-bit ones from ``torch_state_dict()``. Default None.
        param_rounding: how updated bfloat16 params without master weights are stored, per
            group: ``"nearest"`` (as torch), or ``"stochastic"``: rounded up or down at random
            with the probabilities that make the rounding unbiased, so that updates below half a
            bfloat16 ulp still move the weights on average (csrc/include/fused_opt/math/
            rounding.h). Its random bits are a hash of ``rounding_seed``, the param's position in
            the step's op call, its step counter and the element's index: reproducible, and the
            same on every thread count, launch geometry and backend. Or ``"kahan"``: rounded to
            nearest, with what the rounding dropped kept in a bfloat16 compensation buffer per
            param (state ``"kahan_compensation"``, 2 bytes per element) that the next update
            adds back, so that small updates accumulate there until they move the param. float32
            and float64 params need no rounding; float16 params and master weights are refused
            with either. Saved in a group only where not "nearest". Default ``"nearest"``.
        rounding_seed: the seed of ``param_rounding="stochastic"``, an int in [0, 2**63), per
            group. Default 0.
"""
_FUSED_ATTRIBUTES_DOC = """\
        param_groups, state, defaults: as in torch.optim; checkpoints have torch.optim's keys.
        last_grad_norm: the unscaled global gradient norm of the last step, before clipping, as
            a 0-dim float32 tensor on the params' device, when that step clipped or ran under
            :class:`fused_opt.GradScaler`; else None. The next step reuses the tensor: clone it
            to keep it.
        last_step_skipped: the GradScaler's ``found_inf`` of the last step, a 0-dim tensor that
            is nonzero when an inf/NaN gradient skipped the step (nothing changed: params,
            states, step counters); None when the step ran without a scaler.
"""


class FusedOptimizer(Optimizer):
    """Base class of fused_opt's optimizers.

    Subclasses define:
      * ``_state_keys(group)``: names of the per-element state tensors, in the op's order;
      * ``_keeps_step(group)``: whether the state keeps a ``step`` counter (all but plain SGD);
      * ``_new_state(p, group, dtype)``: the state of a param on its first step, when it is not
        zeros; state tensors take ``dtype`` (float32 under master weights, else the param's).
        ``p`` may stand for several small params laid end to end (_make_states_together), so
        the state may depend on its dtype, device and size only;
      * ``_call_modes(group)``: the group's options that every group of one op call must share
        (those that are a bool of the op, or decide which state tensors exist);
      * ``_op_name``: the step op (csrc/schemas.h), and ``_op_arguments(bucket)``: its tensor
        lists for a bucket, in the op's order (``bucket.masters`` last), and the keyword
        arguments of the optimizer's own per-group hyperparameters (``bucket.hypers``) and
        modes; the arguments every step op shares (group sizes, lr, L1, loss scaling, clipping,
        the workspace) are added by this class;
      * ``_sparse_grad_error``: torch.optim's message for sparse grads, or None when the
        optimizer accepts them, in which case ``_step_sparse(group, params)`` handles them;
      * ``_sparse_weight_decay_error``: torch.optim's message for a sparse grad in a group with
        weight decay, which torch's sparse path cannot apply;
      * ``_signed_state_keys``: the states that may be negative, as the math header's
        ``kSignedStates`` says;
      * ``_number_keys``: the group's hyperparameters the op call takes as numbers, and
        ``_device_read_hypers(where, group)`` those that may be tensors the kernels read on the
        device (lr; Adam adds its betas), so that a step checks them all before any op call.
    """

    _sparse_grad_error: str | None = None
    _sparse_weight_decay_error: str | None = None
    # The state keys whose values may be negative: those whose bit is set in the element
    # functor's kSignedStates (csrc/include/fused_opt/math), which picks their 8-bit code.
    _signed_state_keys: frozenset[str] = frozenset()
    _number_keys: tuple[str, ...] = ()
    _op_name: str
    # The plan of the next step (fused_opt/_plan.py): made by a full step, dropped when the
    # groups or the state are replaced. Never saved or copied (not part of __getstate__).
    _step_plan: StepPlan | None = None

    #: The unscaled global gradient norm of the last step (before clipping), as a 0-dim float32
    #: tensor on the params' device, when that step clipped or ran under fused_opt.GradScaler;
    #: else None. The tensor is reused by the next step: clone it to keep it.
    last_grad_norm: Tensor | None = None
    #: GradScaler's found_inf of the last step: nonzero when the step was skipped; None when the
    #: step ran without a scaler.
    last_step_skipped: Tensor | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        doc = cls.__dict__.get("__doc__")
        if doc:
            cls.__doc__ = doc.replace("        {fused_args}\n", _FUSED_ARGS_DOC).replace(
                "        {fused_attributes}\n", _FUSED_ATTRIBUTES_DOC
            )

    @staticmethod
    def _reject_differentiable(differentiable: bool) -> None:
        if differentiable:
            raise NotImplementedError(
                "fused_opt optimizers do not support differentiable=True; "
                "use torch.optim for differentiating through the optimizer step"
            )

    def _after_torch_init(
        self,
        master_weights: bool,
        max_grad_norm: float | None,
        l1_decay: float | Tensor = 0.0,
        l1_mode: str = "subgradient",
        shard_group: Any = None,
        state_dtype: torch.dtype | None = None,
        param_rounding: str = "nearest",
        rounding_seed: int = 0,
    ) -> None:
        """Adds fused_opt's own options to the defaults and to every param group (all but
        ``shard_group``, which is no group's: see the property)."""
        if not isinstance(master_weights, bool):
            raise TypeError(f"master_weights must be a bool, got {master_weights!r}")
        if max_grad_norm is not None and not (
            isinstance(max_grad_norm, (int, float))
            and math.isfinite(max_grad_norm)
            and max_grad_norm >= 0
        ):
            raise ValueError(f"Invalid max_grad_norm value: {max_grad_norm}")
        _check_l1("", {"l1_decay": l1_decay, "l1_mode": l1_mode}, stepping=False)
        _check_state_dtype("state_dtype", state_dtype)
        rounding = {"param_rounding": param_rounding, "rounding_seed": rounding_seed}
        _check_param_rounding("", rounding | {"master_weights": master_weights})
        self.defaults.update(rounding)
        self.defaults["state_dtype"] = state_dtype
        self.defaults["l1_decay"] = l1_decay
        self.defaults["l1_mode"] = l1_mode
        self.defaults["master_weights"] = master_weights
        self.defaults["max_grad_norm"] = None if max_grad_norm is None else float(max_grad_norm)
        self.shard_group = shard_group
        for group in self.param_groups:
            self._set_fused_opt_defaults(group)
        self._master_versions: dict[Tensor, int] = {}

    @property
    def shard_group(self) -> Any:
        """None, or the process group (True: the default group) over which the plain-tensor
        params of this optimizer are disjoint shards of one model, as each rank's part under
        ZeroRedundancyOptimizer: the gradient statistics then sum over it (see
        _compute_grad_stats). A process group cannot be pickled, so it is not in the state dict
        or the param groups; a copy or unpickled optimizer has None, and a checkpoint loads
        without changing it."""
        return self.__dict__.get("_shard_group")

    @shard_group.setter
    def shard_group(self, value: Any) -> None:
        _distributed.check_shard_group(value)
        self.__dict__["_shard_group"] = value

    def _set_fused_opt_defaults(self, group: dict[str, Any]) -> None:
        for key in _FUSED_GROUP_KEYS:
            group.setdefault(key, self.defaults[key])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self._step_plan = None
        super().add_param_group(param_group)
        if "master_weights" in self.defaults:
            self._set_fused_opt_defaults(self.param_groups[-1])

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._step_plan = None
        super().__setstate__(state)
        # Groups loaded from a torch.optim checkpoint lack fused_opt's options; one without L1's
        # keys was trained without L1, and one without param_rounding rounded to nearest,
        # whatever this optimizer's defaults say.
        for key, neutral in _NEUTRAL_OPTIONS.items():
            self.defaults.setdefault(key, neutral)
        # Optimizers pickled before state_dtype existed kept every state in the default dtype.
        self.defaults.setdefault("state_dtype", None)
        for group in self.param_groups:
            for key, neutral in _NEUTRAL_OPTIONS.items():
                group.setdefault(key, neutral)
            self._set_fused_opt_defaults(group)
        # A copy or unpickled optimizer knows no versions: its first step compares every master
        # with its param, which keeps whatever still agrees.
        self._master_versions = {}

    def _kernels_take_scaling(self, keep_grads: bool = False) -> bool:
        """Whether a GradScaler may hand this step grad_scale and found_inf instead of unscaling:
        the kernels unscale in registers and skip on the device. torch's sparse path cannot, so
        with a sparse grad present the scaler unscales and checks first, as for torch.optim.

        With ``keep_grads``, a step plan that fits keeps the grads it read to find out, for the
        statistics pass and the step that follow, until ``_release_grads()``."""
        if self._sparse_grad_error is not None:
            return True
        plan = self._plan_with_grads()
        if plan is not None:
            # A plan is made and used only where every grad is dense.
            if not keep_grads:
                plan.release_grads()
            return True
        return not any(
            p.grad is not None and p.grad.is_sparse
            for group in self.param_groups
            for p in group["params"]
        )

    @property
    def _step_supports_amp_scaling(self) -> bool:
        """torch.amp.GradScaler hands grad_scale and found_inf to step() when this is set, and
        trainers read it to tell whether they may unscale and clip the grads themselves:
        Lightning refuses ``gradient_clip_val`` while it is set (as for torch.optim's
        fused=True), with or without a scaler. So it is set only where the optimizer clips the
        grads itself (max_grad_norm), which a trainer's clipping would repeat; elsewhere the
        stock scaler unscales the grads first, as for torch.optim. fused_opt.GradScaler hands
        the scaling to the kernels either way."""
        return (
            any(group.get("max_grad_norm") is not None for group in self.param_groups)
            and self._kernels_take_scaling()
        )

    @_step_supports_amp_scaling.setter
    def _step_supports_amp_scaling(self, value: bool) -> None:
        # torch's constructors assign it (True for fused=True); the property above decides.
        pass

    # ----------------------------------------------------------------------------------------
    # Subclass interface

    def _state_keys(self, group: dict[str, Any]) -> Sequence[str]:
        raise NotImplementedError

    def _keeps_step(self, group: dict[str, Any]) -> bool:
        return True

    def _new_state(self, p: Tensor, group: dict[str, Any], dtype: torch.dtype) -> dict[str, Tensor]:
        """A param's first-step state: a zero step counter and zeroed state tensors."""
        state = {"step": new_step(p)}
        for key in self._state_keys(group):
            state[key] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        return state

    def _call_modes(self, group: dict[str, Any]) -> tuple[Any, ...]:
        raise NotImplementedError

    def _op_arguments(
        self, bucket: DeviceBucket
    ) -> tuple[tuple[list[Tensor], ...], dict[str, Any]]:
        raise NotImplementedError

    def _group_shape(self, group: dict[str, Any]) -> tuple[Any, ...]:
        """What decides a group's op calls and state tensors, beside its params' dtypes."""
        return (
            self._call_modes(group),
            tuple(self._state_keys(group)),
            self._keeps_step(group),
            group["master_weights"],
            group["state_dtype"],
            # A change is validated by a full step (float16 params are refused with it).
            group["param_rounding"],
        )

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
        plan = self._plan_with_grads()
        if plan is not None:
            try:
                plan.check_hyperparameters(self)
                plan.step(self, self._scaling_by_device(False, plan)[plan.device])
            finally:
                plan.release_grads()
            return loss
        # Validate every group before touching any tensor, so a bad grad or hyperparameter
        # anywhere leaves the whole optimizer as it was.
        seen: set[int] = set()
        sparse_params = [
            self._validate_group(index, group, seen) for index, group in enumerate(self.param_groups)
        ]
        scaling = self._scaling_by_device(any(sparse_params))
        buckets: dict[tuple[Any, ...], DeviceBucket] = {}
        for group in self.param_groups:
            self._collect_group(group, buckets)
        for (device, *_), bucket in buckets.items():
            lists, options = self._op_arguments(bucket)
            options.update(self._common_arguments(device, bucket, scaling[device]))
            getattr(_ops.op_namespace, self._op_name)(*lists, **options)
        for group, sparse in zip(self.param_groups, sparse_params):
            if sparse:
                self._step_sparse(group, sparse)
        # With shard_group no plan is used (see _plan_with_grads), so none is made.
        self._step_plan = None if any(sparse_params) or self.shard_group is not None else (
            StepPlan.of_step(self, buckets, self.__dict__.setdefault("_grad_stats", {}))
        )
        return loss

    def _common_arguments(
        self, device: torch.device, bucket: DeviceBucket, scaling: dict[str, Any]
    ) -> dict[str, Any]:
        """The keyword arguments every step op takes (csrc/schemas.h) for a bucket's call."""
        lr, lr_tensor = bucket.split_hypers([group["lr"] for group in bucket.groups])
        return {
            "group_sizes": bucket.group_sizes,
            "lr": lr,
            "l1_decay": bucket.hypers("l1_decay"),
            "l1_proximal": [group["l1_mode"] == "proximal" for group in bucket.groups],
            "stochastic_rounding_seed": [
                group["rounding_seed"] if group["param_rounding"] == "stochastic" else None
                for group in bucket.groups
            ],
            "lr_tensor": lr_tensor,
            "workspace": self._step_workspace(device) if bucket.steps else None,
            **scaling,
        }

    def _plan_with_grads(self) -> StepPlan | None:
        """The step plan, holding this step's grads, when it still fits (fused_opt/_plan.py);
        its caller releases the grads. A plan still holding the grads that fused_opt.GradScaler
        measured just before this step keeps them, so that the step takes the grads measured."""
        plan = self._step_plan
        # torch.compile traces the full path (dynamo cannot look into the plan's C++ side). A
        # plan's statistics are this process's alone: shard_group's collective is not in it.
        if plan is None or torch.compiler.is_compiling() or self.shard_group is not None:
            return None
        if plan.holding:
            return plan
        if not plan.fits(self) or not plan.gather_grads():
            return None
        return plan

    def _release_grads(self) -> None:
        """Ends a hold of the grads left by ``_compute_grad_stats(keep_grads=True)``."""
        plan = self._step_plan
        if plan is not None and plan.holding:
            plan.release_grads()

    def _step_workspace(self, device: torch.device) -> Tensor:
        """The zeroed counter the CUDA kernels advance step counters with (see csrc/ops.cpp),
        one per device, made on the device's first step and reused by every op call on it."""
        # Not part of the optimizer's state: a copy or an unpickled optimizer makes its own.
        workspaces: dict[torch.device, Tensor] = self.__dict__.setdefault("_step_workspaces", {})
        workspace = workspaces.get(device)
        if workspace is None:
            workspace = workspaces[device] = torch.zeros(1, dtype=torch.int32, device=device)
        return workspace

    # ----------------------------------------------------------------------------------------
    # Loss scaling and clipping

    def _max_grad_norm(self) -> float | None:
        """The clipping threshold, which is global: one norm over every param of every group."""
        values = {group["max_grad_norm"] for group in self.param_groups}
        if len(values) > 1:
            raise ValueError(
                f"{type(self).__name__}: max_grad_norm clips the global norm of all params, so "
                f"every param group needs the same value; got {sorted(values, key=str)}"
            )
        return values.pop() if values else None

    def _scaling_by_device(
        self, has_sparse_grads: bool, plan: StepPlan | None = None
    ) -> dict[torch.device, dict[str, Any]]:
        """The scaling keyword arguments of this step's op calls, per device (see csrc/ops.cpp).

        GradScaler sets ``grad_scale`` (None once unscale_ ran) and ``found_inf`` on the
        optimizer before calling step(); fused_opt.GradScaler also leaves the gradient
        statistics of its read-only pass in ``_precomputed_grad_stats``. With ``max_grad_norm``
        and no such statistics, this runs the pass itself: over the grads of ``plan`` when the
        step runs one (fused_opt/_plan.py).
        """
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        max_grad_norm = self._max_grad_norm()
        if has_sparse_grads and (
            grad_scale is not None or found_inf is not None or max_grad_norm is not None
        ):
            raise RuntimeError(
                f"{type(self).__name__}: sparse gradients cannot be unscaled, skipped or clipped "
                "in the kernels; use max_grad_norm=None, and GradScaler unscales them itself"
            )
        stats = getattr(self, "_precomputed_grad_stats", None)
        if stats is None and max_grad_norm is not None:
            stats = (
                plan.grad_stats(_on(grad_scale, plan.device))
                if plan is not None
                else self._compute_grad_stats(grad_scale)
            )
        self.last_step_skipped = found_inf
        self.last_grad_norm = next(iter(stats.values())).norm if stats else None

        return _ScalingByDevice(grad_scale, found_inf, stats, max_grad_norm)

    @torch.no_grad()
    def _compute_grad_stats(
        self, grad_scale: Tensor | None, keep_grads: bool = False
    ) -> dict[torch.device, GradStats]:
        """One read-only pass over every dense gradient: the global norm (divided by
        ``grad_scale``) and whether any element is inf or NaN, left on each device that holds
        gradients (a process without any: no entry, as GradScaler records no inf check for
        it; with ``shard_group``, see below).

        Global means over every param of every group, on every device and, for DTensor params,
        over every rank of their mesh: each rank measures its local shards, and one collective
        sums the squares and the inf/NaN flags, so every rank clips by the same coefficient and
        skips the same steps. An element replicated over mesh dimensions counts once (its square
        is divided by its number of replicas); a plain tensor beside DTensors counts as
        replicated over the whole mesh, as DDP's grads are.

        With ``shard_group``, plain tensors are disjoint shards over that group: each counts
        once, and one collective over the group sums the squares and flags, which every rank
        joins even when it holds no grads, so that none waits for it; such a rank gets the
        group's statistics on its params' device, as every other rank does.

        With ``keep_grads``, a step plan keeps the grads it read for the next step() (which
        then reads none), until ``_release_grads()``."""
        plan = self._plan_with_grads()
        if plan is not None:
            try:
                return plan.grad_stats(_on(grad_scale, plan.device))
            finally:
                if not keep_grads:
                    plan.release_grads()
        shard_group = self.shard_group
        # Grads by (device, replicas): one pass each; replicas None for plain tensors that are
        # replicated over the mesh, 1 for shards.
        grads: dict[tuple[torch.device, int | None], list[Tensor]] = {}
        mesh = None
        for group_index, group in enumerate(self.param_groups):
            for param_index, p in enumerate(group["params"]):
                grad = p.grad
                if grad is None:
                    continue
                count = None if shard_group is None else 1
                if _distributed.is_dtensor(grad):
                    if shard_group is not None:
                        raise ValueError(
                            f"{type(self).__name__}: "
                            f"{self._describe_param(group_index, param_index, group, p)} is a "
                            "DTensor, whose gradient statistics are summed over its device mesh; "
                            "shard_group is for plain-tensor shards (ZeroRedundancyOptimizer): "
                            "leave it None"
                        )
                    if mesh is None:
                        mesh = grad.device_mesh
                    elif grad.device_mesh != mesh:
                        raise ValueError(
                            f"{type(self).__name__}: the global gradient norm of params on more "
                            f"than one device mesh ({mesh} and {grad.device_mesh}) is not "
                            "supported; clip and scale with one optimizer per mesh"
                        )
                    count = _distributed.replicas(p)
                    grad = _distributed.local_grad(p, grad)
                grads.setdefault((grad.device, count), []).append(_as_dense_real(grad))
        # Not part of the optimizer's state: a copy or an unpickled optimizer makes its own.
        buffers: dict[tuple[torch.device, int | None], GradStats] = self.__dict__.setdefault(
            "_grad_stats", {}
        )
        for (device, count), device_grads in grads.items():
            stats = buffers.get((device, count))
            if stats is None:
                stats = buffers[device, count] = GradStats.on(device)
            _ops.op_namespace.grad_norm_(
                device_grads,
                stats.norm,
                stats.found_inf,
                stats.workspace,
                grad_scale=_on(grad_scale, device),
            )
        result: dict[torch.device, GradStats] = {}
        for device, count in grads:
            result.setdefault(device, buffers[device, count])
        if shard_group is not None and not grads:
            # A rank whose part has no grads takes the group's statistics as its own: under
            # GradScaler it records the group's inf flag, so that it skips, and its scale backs
            # off or grows, with every other rank, where it would refuse a step with no inf check.
            device = self._first_param_device()
            stats = buffers.get((device, 1))
            if stats is None:
                stats = buffers[device, 1] = GradStats.on(device)
            result[device] = stats
        if len(grads) > 1 or mesh is not None or shard_group is not None:
            self._combine_grad_stats(
                {key: buffers[key] for key in grads},
                result,
                mesh,
                _distributed.process_group(shard_group),
            )
        return result

    def _combine_grad_stats(
        self,
        parts: dict[tuple[torch.device, int | None], GradStats],
        result: dict[torch.device, GradStats],
        mesh: Any,
        process_group: Any = None,
    ) -> None:
        """Leaves in every ``result`` the norm and inf flag of all ``parts`` together, summed over
        the ranks of ``mesh`` or of ``process_group`` too when there is one. Device-side ops
        only (but for a copy from a second device): nothing is allocated after the first step."""
        first = next(iter(result))
        # Squares and flags summed in double, in a buffer kept between steps like GradStats: the
        # total, and each part's stats in double. A CPU op that mixes float32 into float64
        # allocates a promoted copy of each 0-dim operand; copy_ casts without one.
        totals: dict[torch.device, Tensor] = self.__dict__.setdefault("_grad_stat_totals", {})
        buffer = totals.get(first)
        if buffer is None:
            buffer = totals[first] = torch.zeros(2, 2, dtype=torch.float64, device=first)
        total, part = buffer
        total.zero_()
        world = mesh.size() if mesh is not None else 1
        for (device, count), stats in parts.items():
            part[0].copy_(stats.norm)
            part[1].copy_(stats.found_inf)
            total[0].addcmul_(part[0], part[0], value=1.0 / (world if count is None else count))
            total[1].add_(part[1])
        if mesh is not None:
            _distributed.all_reduce_sum(total, mesh)
        elif process_group is not None:
            _distributed.dist.all_reduce(total, group=process_group)
        for stats in result.values():
            # The flags' sum counts the parts (and ranks) that saw an inf or NaN: clamped to 1.
            stats.norm.copy_(total[0]).sqrt_()
            stats.found_inf.copy_(total[1]).clamp_(max=1.0)

    def _first_param_device(self) -> torch.device:
        return next(
            (p.device for group in self.param_groups for p in group["params"]),
            torch.device("cpu"),
        )

    def _validate_group(self, group_index: int, group: dict[str, Any], seen: set[int]) -> list[Tensor]:
        """Checks every grad of the group, that no param with a grad comes twice (``seen``: the
        ids of those of the groups before), and the hyperparameters of a group that will step;
        returns the params whose grads are sparse."""
        sparse_params = []
        steps = False
        for param_index, p in enumerate(group["params"]):
            grad = p.grad
            if grad is None:
                continue
            if id(p) in seen:
                # torch.optim steps such a param twice in a row; one op call would count its
                # step twice and update it from two threads at once.
                raise ValueError(
                    f"{type(self).__name__}: "
                    f"{self._describe_param(group_index, param_index, group, p)} is also "
                    f"{self._first_position(p)}; fused_opt steps every param once per step, so "
                    "list each param once"
                )
            seen.add(id(p))
            steps = True
            if grad.is_sparse:
                if self._sparse_grad_error is not None:
                    raise RuntimeError(self._sparse_grad_error)
                # torch's sparse path raises this only midway through the step; here it comes
                # before any tensor is touched.
                if group["weight_decay"] != 0:
                    raise RuntimeError(self._sparse_weight_decay_error)
                if group.get("l1_decay", 0) != 0:
                    raise RuntimeError(
                        f"{type(self).__name__}: param_groups[{group_index}] has l1_decay="
                        f"{group['l1_decay']} and "
                        f"{self._describe_param(group_index, param_index, group, p)} has a sparse "
                        "grad; sparse grads take torch's own update, which has no L1: use dense "
                        "grads or l1_decay=0 in this group"
                    )
                sparse_params.append(p)
                continue
            self._check_dense_grad(group_index, param_index, group, p, grad)
            rounding = group.get("param_rounding")
            if p.dtype == torch.float16 and rounding != "nearest":
                raise ValueError(
                    f"{type(self).__name__}: "
                    f"{self._describe_param(group_index, param_index, group, p)} is float16, "
                    f"but param_groups[{group_index}] has param_rounding={rounding!r}, which "
                    "covers bfloat16 params (float16 ones train with master_weights=True)"
                )
        if steps:
            self._check_hyperparameters(f"param_groups[{group_index}]", group, stepping=True)
            # Each param's state dtype, before any state is made.
            if self._state_keys(group):
                for p in group["params"]:
                    if p.grad is not None and not p.grad.is_sparse:
                        self._state_dtype_of(group, p)
        return sparse_params

    def _first_position(self, p: Tensor) -> str:
        """Where a param listed more than once is listed first."""
        for group_index, group in enumerate(self.param_groups):
            for param_index, q in enumerate(group["params"]):
                if q is p:
                    return f"param_groups[{group_index}]['params'][{param_index}]"
        raise AssertionError("the param is in no group")

    def _check_hyperparameters(self, where: str, group: dict[str, Any], stepping: bool) -> None:
        """Every hyperparameter a step reads is a real number or a one-element tensor; when the
        group is ``stepping``, those the kernels read from a tensor themselves (lr, Adam's betas)
        are of a float dtype on the device of every param with a grad. ``where`` names the group
        in the messages."""
        for key in self._number_keys:
            _check_number(f"{where}['{key}']", group.get(key), None, taken_by_value=stepping)
        for label, value in self._device_read_hypers(where, group):
            _check_number(label, value, group["params"] if stepping else None)
        _check_l1(where, group, stepping)
        _check_state_dtype(f"{where}['state_dtype']", group.get("state_dtype"))
        _check_param_rounding(where, group)

    def _state_dtype_of(self, group: dict[str, Any], p: Tensor) -> torch.dtype:
        """The dtype of the param's state tensors: that of what they update (the param, or its
        float32 master) unless the group's ``state_dtype`` asks for bfloat16 or blockwise 8-bit
        (uint8) beside float32; 8-bit only from _quantize.MIN_NUMEL elements on."""
        base = torch.float32 if uses_master(group, p) else p.dtype
        wanted = group["state_dtype"]
        if wanted is None or wanted == base:
            return base
        if wanted == torch.uint8 and base == torch.float32 and not _distributed.is_dtensor(p):
            return wanted if p.numel() >= _quantize.MIN_NUMEL else base
        if wanted == torch.bfloat16 and base == torch.float32:
            return wanted
        if wanted == torch.float32 and p.dtype in _MASTER_DTYPES:
            hint = (
                " (float32 states of a 16-bit param come with its float32 master: "
                "master_weights=True)"
            )
        elif wanted == torch.uint8 and base == torch.float32:
            hint = (
                " that are plain tensors: a DTensor's 8-bit states would need block maxima that "
                "shard with it, which fused_opt does not have yet"
            )
        else:
            hint = ""
        # The group may be one a checkpoint would install: the param names the place.
        group_index, param_index = next(
            (i, j)
            for i, own in enumerate(self.param_groups)
            for j, q in enumerate(own["params"])
            if q is p
        )
        own_group = self.param_groups[group_index]
        raise ValueError(
            f"{type(self).__name__}: param_groups[{group_index}] has state_dtype={wanted} but "
            f"{self._describe_param(group_index, param_index, own_group, p)} keeps its states in "
            f"{base}; bfloat16 and uint8 states are for float32 params and masters{hint}"
        )

    def _device_read_hypers(self, where: str, group: dict[str, Any]) -> list[tuple[str, Any]]:
        """(name, value) of each hyperparameter that may be a tensor the kernels read on the
        device, named as ``where['key']``."""
        return [(f"{where}['lr']", group.get("lr"))]

    def _check_dense_grad(
        self, group_index: int, param_index: int, group: dict[str, Any], p: Tensor, grad: Tensor
    ) -> None:
        problem = (
            _distributed.placement_problem(p, grad)
            if isinstance(p, _distributed.DTensor) or isinstance(grad, _distributed.DTensor)
            else None
        )
        if problem:
            raise RuntimeError(
                f"{type(self).__name__}: {self._describe_param(group_index, param_index, group, p)}"
                f": {problem}"
            )
        # One cheap test per step and param; the message is built only for a mismatch.
        if grad.dtype != p.dtype or grad.device != p.device or grad.shape != p.shape:
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

    def _collect_group(
        self, group: dict[str, Any], buckets: dict[tuple[Any, ...], DeviceBucket]
    ) -> None:
        """Adds the group's params with dense grads to the buckets of their op calls, making
        whatever state they lack."""
        keys = self._state_keys(group)
        modes = self._call_modes(group)
        keeps_step = self._keeps_step(group)
        needed = (*keys, "step") if keeps_step else tuple(keys)
        # Under torch.compile the states are made one by one: slicing thousands of views would
        # only lengthen the trace of a first step.
        make_together = bool(needed) and not torch.compiler.is_compiling()
        for p in group["params"]:
            grad = p.grad
            if grad is None or grad.is_sparse:
                continue
            with_master = uses_master(group, p)
            with_compensation = uses_compensation(group, p)
            # What the op takes as the param's entry of master_params, if anything.
            companion = (
                MASTER_KEY if with_master else COMPENSATION_KEY if with_compensation else None
            )
            # The kernels walk param, grad and states as one flat range, in the param's layout.
            layout = p.stride() if p.numel() > 1 else None
            # Plain SGD keeps no state but a master or compensation, and without one its params
            # get no (empty) state entries, as in torch.
            stateful = bool(needed) or companion is not None
            state = self.state[p] if stateful else {}
            if stateful:
                if (companion is not None and state.get(companion) is None) or any(
                    state.get(key) is None for key in needed
                ):
                    if make_together:
                        # The group's first param that lacks a state: the states of all its
                        # small newcomers are made here at once, and a step after the first
                        # walks the group no second time.
                        make_together = False
                        self._make_states_together(group)
                    self._ensure_state(p, state, group, keys, companion)
                # A param's states are made, re-laid and cast together, so one of them tells
                # for all (a step counter alone has no layout).
                first_state = state.get(keys[0] if keys else companion)
                if (
                    layout is not None
                    and first_state is not None
                    and first_state.dtype != torch.uint8
                    and first_state.stride() != layout
                ):
                    _follow_layout(p, state, keys)
                if keys:
                    # A group's state_dtype changed since the states were made: they follow.
                    dtype = self._state_dtype_of(group, p)
                    if first_state.dtype != dtype:
                        self._cast_states(p, state, keys, dtype)
            # Read no version under torch.compile: dynamo cannot branch on one.
            if (
                companion is not None
                and not torch.compiler.is_compiling()
                and self._master_versions.get(p) != p._version
            ):
                self._refresh_companion(p, state, companion)
            # A master-weight call also takes the float32 params of the group, their own masters,
            # and the compensations of Kahan groups.
            in_master_call = companion is not None or (
                group["master_weights"] and p.dtype in _OWN_MASTER_DTYPES
            )
            bucket = buckets.get((p.device, in_master_call, modes))
            if bucket is None:
                bucket = buckets[p.device, in_master_call, modes] = DeviceBucket(
                    states={key: [] for key in keys}
                )
            bucket.enter(group)
            bucket.origins.append(p)
            if companion is not None:
                bucket.watched.append(p)
            # Autograd gives grads the param's layout; the rare grad that differs is copied into it.
            if layout is not None and grad.stride() != layout:
                grad = torch.empty_like(p).copy_(grad)
            if _distributed.is_dtensor(p):
                grad = _distributed.local_grad(p, grad)
                p, state = p.to_local(), _distributed.local_state(state)
            if p.is_complex():
                p, grad = torch.view_as_real(p), torch.view_as_real(grad)
                state = {key: torch.view_as_real(state[key]) for key in keys} | {
                    key: state[key] for key in ("step", MASTER_KEY) if key in state
                }
            bucket.params.append(p)
            bucket.grads.append(grad)
            for key in keys:
                bucket.states[key].append(state[key])
            if keeps_step:
                bucket.steps.append(state["step"])
            if companion is not None:
                bucket.masters.append(state[companion])

    def _make_states_together(self, group: dict[str, Any]) -> None:
        """Makes the first states of the group's small params that have a dense grad and no
        state yet as views of one buffer per state key (and one of step counters), per device
        and dtype. A step over many small params is bound by the host's loads of each tensor's
        metadata and first bytes, not by its data: views of one buffer share one storage object,
        and their data sit side by side in cache lines and pages instead of one allocation per
        tensor (4,096 one-element AdamW params, each step right after torch's fused AdamW over
        other params: 0.78-0.80x the time)."""
        newcomers: dict[tuple[torch.device, torch.dtype, torch.dtype], list[Tensor]] = {}
        for p in group["params"]:
            grad = p.grad
            if (
                grad is None
                or grad.is_sparse
                or self.state.get(p)
                or p.numel() > SHARED_STATE_MAX_NUMEL
                or not p.is_contiguous()
                or _distributed.is_dtensor(p)
            ):
                continue
            dtype = self._state_dtype_of(group, p)
            if dtype != torch.uint8:
                newcomers.setdefault((p.device, p.dtype, dtype), []).append(p)
        for (device, param_dtype, dtype), params in newcomers.items():
            if len(params) < 2:
                continue
            sizes = [p.numel() for p in params]
            # An expanded scalar stands for the params laid end to end and allocates nothing;
            # the states made like it are contiguous.
            stand_in = torch.empty((), dtype=param_dtype, device=device).expand(sum(sizes))
            for key, made in self._new_state(stand_in, group, dtype).items():
                if made.dim() == 0:  # a step counter: one per param
                    parts = made.expand(len(params)).clone().unbind()
                else:
                    parts = [part.view(p.shape) for part, p in zip(made.split(sizes), params)]
                for p, part in zip(params, parts):
                    self.state[p][key] = part

    def _ensure_state(
        self,
        p: Tensor,
        state: dict[str, Any],
        group: dict[str, Any],
        keys: Sequence[str],
        companion: str | None,
    ) -> None:
        """Creates whatever state the param lacks: all of it on its first step. ``companion`` is
        the state key of the param's master or compensation, if it has one."""
        if companion == COMPENSATION_KEY and state.get(COMPENSATION_KEY) is None:
            state[COMPENSATION_KEY] = torch.zeros_like(p, memory_format=torch.preserve_format)
            self._master_versions[p] = p._version
        if companion == MASTER_KEY and state.get(MASTER_KEY) is None:
            state[MASTER_KEY] = p.detach().to(torch.float32, copy=True)
            self._master_versions[p] = p._version
            # States made before the master (master_weights switched on during training) move
            # to the master's state dtype.
            self._cast_states(p, state, keys, self._state_dtype_of(group, p))
        needed = (*keys, "step") if self._keeps_step(group) else keys
        if any(state.get(key) is None for key in needed):
            dtype = self._state_dtype_of(group, p)
            made_as = torch.float32 if dtype == torch.uint8 else dtype
            for key, value in self._new_state(p, group, made_as).items():
                if state.get(key) is None:
                    state[key] = value
            if dtype == torch.uint8:
                self._cast_states(p, state, keys, dtype)

    def _refresh_companion(self, p: Tensor, state: dict[str, Any], companion: str) -> None:
        """After a write to the param since the last step: its master follows it (see
        _refresh_master), and its compensation, the remainder of a value the param no longer
        holds, is dropped, so that the write is kept exactly (a pruned element stays zero)."""
        if companion == MASTER_KEY:
            self._refresh_master(p, state[MASTER_KEY])
        else:
            state[COMPENSATION_KEY].zero_()
            self._master_versions[p] = p._version

    def _refresh_master(self, p: Tensor, master: Tensor) -> None:
        """Re-starts from the param every element of its master whose rounding the param no longer
        holds, and keeps the float32 bits of every other element: a write to the 16-bit param
        since the last step (a pruning mask, clipping, EMA weights swapped in, a model's
        load_state_dict) is kept, not overwritten from a stale master, and a write that left an
        element as it was (loading the same weights) costs that element no precision. Device
        ops only, no sync; they run only for a param whose version counter moved."""
        master.copy_(torch.where(master.to(p.dtype) == p, master, p.to(torch.float32)))
        self._master_versions[p] = p._version

    def _cast_states(
        self, p: Tensor, state: dict[str, Any], keys: Sequence[str], dtype: torch.dtype
    ) -> None:
        """Stores the param's state tensors in ``dtype``, the counter and the master aside:
        rounded to nearest, or quantized to or from blockwise 8-bit (uint8,
        fused_opt/_quantize.py)."""
        for key in keys:
            value = state.get(key)
            if not torch.is_tensor(value) or value.dtype == dtype:
                continue
            signed = key in self._signed_state_keys
            if value.dtype == torch.uint8:
                flat = _quantize.dequantize(value, p.numel(), signed)
                value = torch.empty_like(p, dtype=torch.float32)
                _flat_memory(value).copy_(flat)
            if dtype == torch.uint8:
                if value.stride() != p.stride():
                    value = torch.empty_like(p, dtype=value.dtype).copy_(value)
                state[key] = _quantize.quantize(_flat_memory(value).to(torch.float32), signed)
            else:
                state[key] = value.to(dtype)

    @torch.no_grad()
    def refresh_master_weights(self) -> None:
        """Brings every float32 master in line with its 16-bit param: each element whose param no
        longer holds the master's rounding restarts from the param; the others keep their
        float32 bits. Clears every Kahan compensation (``param_rounding="kahan"``), which
        belongs to the param's value before the edit. step() does this by itself for every
        param whose version counter moved since the last step. Call it after in-place edits
        that step() cannot see: writes through ``param.data`` (which do not count as versions),
        and edits between the steps of a ``torch.compile``d or CUDA-graph-captured step, which
        cannot branch on version counters and so never checks them."""
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p] if p in self.state else {}
                for companion, used in (
                    (MASTER_KEY, uses_master(group, p)),
                    (COMPENSATION_KEY, uses_compensation(group, p)),
                ):
                    if used and state.get(companion) is not None:
                        self._refresh_companion(p, state, companion)

    # ----------------------------------------------------------------------------------------
    # Checkpoints

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state dict, with the keys of the torch.optim twin's wherever the options
        allow: a group's ``master_weights`` and ``max_grad_norm`` are saved only where they
        differ from the optimizer's own defaults, which a group loaded without them takes;
        ``l1_decay`` and ``l1_mode`` only where L1 is configured (not 0.0 / "subgradient"),
        and a group loaded without them has no L1.
        torch.distributed.checkpoint loads a checkpoint into the keys of the target's state
        dict, so every key fused_opt added would be one that a torch.optim checkpoint lacks."""
        state_dict = super().state_dict()
        for group in state_dict["param_groups"]:
            for key in _FUSED_GROUP_KEYS:
                omitted = _NEUTRAL_OPTIONS.get(key, self.defaults[key])
                if key in group and _same_value(group[key], omitted):
                    del group[key]
            # Quantized states are named by their format where they are saved: a per-param
            # string would not survive torch.optim's loading, which rebuilds iterables.
            if any(
                torch.is_tensor(value) and value.dtype == torch.uint8
                for index in group["params"]
                for value in state_dict["state"].get(index, {}).values()
            ):
                group[_quantize.FORMAT_KEY] = _quantize.FORMAT
        return state_dict

    @torch.no_grad()
    def torch_state_dict(self) -> dict[str, Any]:
        """``state_dict()`` with every blockwise 8-bit state (``state_dtype=torch.uint8``)
        dequantized to a float32 tensor of its param's shape and layout, which torch.optim loads
        (it casts states to its params' dtype). Other states are shared with ``state_dict()``;
        the quantized ones are copied, so this holds them in float32 at once."""
        state_dict = self.state_dict()
        for group, saved_group in zip(self.param_groups, state_dict["param_groups"]):
            if saved_group.pop(_quantize.FORMAT_KEY, None) is None:
                continue
            for p, index in zip(group["params"], saved_group["params"]):
                saved = state_dict["state"].get(index)
                if saved is None:
                    continue
                # The dict is the optimizer's own state: changed in a copy.
                saved = state_dict["state"][index] = dict(saved)
                self._cast_states(p, saved, self._state_keys(group), torch.float32)
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a state dict saved by this class or by its torch.optim twin.

        Everything is checked before anything is loaded (see _check_state_dict), so a checkpoint
        that does not fit raises a ValueError naming what is wrong and leaves the optimizer
        unchanged and usable.
        """
        self._check_state_dict(state_dict)
        self._step_plan = None
        super().load_state_dict(state_dict)
        saved_state = state_dict["state"]
        for group, saved_group in zip(self.param_groups, state_dict["param_groups"]):
            # The saved group named its states' format, which the states now in memory need not
            # have: state_dict() names it again where they do.
            group.pop(_quantize.FORMAT_KEY, None)
            keys = self._state_keys(group)
            for p, saved_id in zip(group["params"], saved_group["params"]):
                state = self.state.get(p)
                if not state:
                    continue
                self._complete_loaded_state(state, group)
                place_step(p, state)
                # torch.optim's loading cast quantized states to the param's dtype, codes and
                # maxima as numbers: taken again from the saved dict.
                for key in keys:
                    value = saved_state[saved_id].get(key)
                    if torch.is_tensor(value) and value.dtype == torch.uint8:
                        state[key] = value.to(device=p.device, copy=True)
                if uses_master(group, p):
                    self._load_master_state(p, state, saved_state[saved_id], keys)
                    # The master is the checkpoint's; a model loaded after the optimizer then
                    # moves the param's version, and the next step keeps the master wherever
                    # the param holds its rounding.
                    self._master_versions[p] = p._version
                else:
                    state.pop(MASTER_KEY, None)
                if uses_compensation(group, p):
                    # torch.optim's loading gave it the param's dtype, its own; a checkpoint
                    # without one (torch.optim's, or one trained to nearest) starts from zero.
                    if state.get(COMPENSATION_KEY) is None:
                        state[COMPENSATION_KEY] = torch.zeros_like(
                            p, memory_format=torch.preserve_format
                        )
                    self._master_versions[p] = p._version
                else:
                    state.pop(COMPENSATION_KEY, None)
                # torch.optim's loading gave the states the param's dtype (exactly, from
                # bfloat16 states); state_dtype stores them as this group keeps them.
                if keys:
                    self._cast_states(p, state, keys, self._state_dtype_of(group, p))
                # torch may have built a buffer in its grad's layout (SGD clones the grad).
                _follow_layout(p, state, keys)

    @staticmethod
    def _load_master_state(
        p: Tensor, state: dict[str, Any], saved: dict[str, Any], keys: Sequence[str]
    ) -> None:
        """torch.optim's loading rounds every state to the param's dtype; under master weights
        the master and the states stay float32, so they are taken again from the saved dict (a
        checkpoint without a master starts one from the param, as a first step does)."""
        for key in (*keys, MASTER_KEY):
            value = saved.get(key)
            if torch.is_tensor(value):
                dtype = torch.uint8 if value.dtype == torch.uint8 else torch.float32
                state[key] = value.to(device=p.device, dtype=dtype, copy=True)
        if state.get(MASTER_KEY) is None:
            state[MASTER_KEY] = p.detach().to(torch.float32, copy=True)

    def _complete_loaded_state(self, state: dict[str, Any], group: dict[str, Any]) -> None:
        """Fills in what a torch.optim checkpoint of this optimizer may lack."""

    def _check_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Refuses, before anything is loaded, a state dict that would not load whole or would
        leave the optimizer unable to step: another optimizer's (its groups lack this one's
        hyperparameters), bad hyperparameter values, and state values of the wrong kind, shape
        or dtype. Messages name the entry as ``param_groups[i]['key']`` or ``state[i]['key']``,
        the indices of the state dict, and the param it belongs to."""
        error = f"{type(self).__name__}.load_state_dict"
        saved_groups = state_dict.get("param_groups")
        saved_state = state_dict.get("state")
        if saved_groups is None or saved_state is None:
            raise ValueError(f"{error}: expected the keys 'state' and 'param_groups'")
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"{error}: the state dict has {len(saved_groups)} param groups but the optimizer "
                f"has {len(self.param_groups)}"
            )
        for group_index, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if len(group["params"]) != len(saved["params"]):
                raise ValueError(
                    f"{error}: param group {group_index} has {len(saved['params'])} params in the "
                    f"state dict but {len(group['params'])} in the optimizer"
                )
        for group_index, loaded in enumerate(self._groups_as_loaded(saved_groups)):
            where = f"param_groups[{group_index}]"
            missing = [key for key in self.defaults if key not in loaded]
            if missing:
                raise ValueError(
                    f"{error}: {where} lacks {', '.join(repr(k) for k in missing)}, which every "
                    f"group of {type(self).__name__} has: is it another optimizer's state dict?"
                )
            try:
                self._check_hyperparameters(where, loaded, stepping=False)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{error}: {exc}") from None
            group = self.param_groups[group_index]
            keys = self._state_keys(loaded)
            needed = (*keys, "step") if self._keeps_step(loaded) else keys
            for param_index, (p, saved_id) in enumerate(zip(group["params"], loaded["params"])):
                state = saved_state.get(saved_id)
                if not state:
                    continue
                label = self._describe_param(group_index, param_index, group, p)
                if keys:
                    try:
                        self._state_dtype_of(loaded, p)
                    except ValueError as exc:
                        raise ValueError(f"{error}: {exc}") from None
                missing = [k for k in needed if state.get(k) is None and not self._lazy_key(k)]
                if missing:
                    raise ValueError(
                        f"{error}: state[{saved_id!r}] of {label} lacks "
                        f"{', '.join(repr(k) for k in missing)}"
                    )
                for key in (*keys, MASTER_KEY, COMPENSATION_KEY):
                    value = state.get(key)
                    if value is not None:
                        problem = _state_tensor_problem(
                            p, value, loaded.get(_quantize.FORMAT_KEY) if key in keys else None
                        )
                        if problem:
                            raise ValueError(
                                f"{error}: state[{saved_id!r}]['{key}'] of {label} {problem}"
                            )
                if "step" in needed and state.get("step") is not None:
                    problem = _step_problem(state["step"])
                    if problem:
                        raise ValueError(
                            f"{error}: state[{saved_id!r}]['step'] of {label} {problem}"
                        )

    def _groups_as_loaded(self, saved_groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The param groups that loading ``saved_groups`` would install, without installing
        them: torch.optim's loading takes the saved groups whole (only their params are this
        optimizer's), and the class's ``__setstate__`` then fills in the keys an older
        checkpoint may lack. Running that ``__setstate__`` on a blank instance tells exactly
        which keys it fills, for this class and this torch version."""
        blank = object.__new__(type(self))
        blank.__setstate__(
            {
                "defaults": dict(self.defaults),
                "state": {},
                "param_groups": [
                    {**saved, "params": own["params"]}
                    for saved, own in zip(saved_groups, self.param_groups)
                ],
            }
        )
        return [
            {**group, "params": saved["params"]}
            for group, saved in zip(blank.param_groups, saved_groups)
        ]

    def _lazy_key(self, key: str) -> bool:
        """Whether a saved state may lack `key` (SGD's buffer is created on the first step)."""
        return False


class _ScalingByDevice(dict):
    """The scaling keyword arguments of one step's op calls, per device, each made when its
    device first asks: a step walks no param list to find its devices."""

    def __init__(
        self,
        grad_scale: Tensor | None,
        found_inf: Tensor | None,
        stats: dict[torch.device, GradStats] | None,
        max_grad_norm: float | None,
    ) -> None:
        super().__init__()
        self._grad_scale, self._found_inf = grad_scale, found_inf
        self._stats, self._max_grad_norm = stats, max_grad_norm

    def __missing__(self, device: torch.device) -> dict[str, Any]:
        clipping = self._max_grad_norm is not None
        kwargs = self[device] = {
            "grad_scale": _on(self._grad_scale, device),
            "found_inf": _on(self._found_inf, device),
            "grad_norm": self._stats[device].norm if clipping else None,
            "max_grad_norm": self._max_grad_norm,
        }
        return kwargs


def plain_bool(condition: Any) -> bool:
    """A comparison of a group's hyperparameter as a plain bool, for the call modes that key the
    buckets. torch.compile (2.14) may trace a float hyperparameter as a symbol, and then its
    comparison too, through bool() as well; comparing two such keys fails. Branching on it makes
    dynamo guard on the value and yield a constant instead."""
    return True if condition else False


def _follow_layout(p: Tensor, state: dict[str, Any], keys: Sequence[str]) -> None:
    """Gives the param's state tensors the param's memory layout, which the kernels walk all of
    them in as one flat range. It changes when a checkpoint was saved from another layout, or when
    the param itself is re-laid in place (``model.to(memory_format=torch.channels_last)`` keeps
    the Parameters and changes their strides); torch.optim's ops accept any layout, so it trains
    on there."""
    if p.numel() <= 1:
        return
    stride = p.stride()
    for key in (*keys, MASTER_KEY, COMPENSATION_KEY):
        value = state.get(key)
        # A quantized state is flat, its codes in the param's memory order already.
        if value is not None and value.dtype != torch.uint8 and value.stride() != stride:
            state[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)


def _flat_memory(t: Tensor) -> Tensor:
    """A dense tensor's elements in memory order, as a 1-D view."""
    return t.reshape(-1) if t.is_contiguous() else t.as_strided((t.numel(),), (1,))


def _state_tensor_problem(p: Tensor, value: Any, quantized_format: Any = None) -> str | None:
    """What keeps a saved state value from being a state tensor of ``p``, or None. torch.optim's
    loading casts a real param's states to its dtype, and leaves a complex param's as they are.
    A uint8 state is blockwise 8-bit, of the format its group names (``quantized_format``)."""
    if not torch.is_tensor(value):
        return f"is a {type(value).__name__}, not a tensor"
    if value.is_sparse:
        return "is a sparse tensor"
    if value.dtype == torch.uint8 and not p.is_complex():
        if quantized_format != _quantize.FORMAT:
            named = (
                "names no format"
                if quantized_format is None
                else f"names the format {quantized_format!r}"
            )
            return (
                f"is uint8, a blockwise 8-bit state, but its param group {named} "
                f"('{_quantize.FORMAT_KEY}'); this fused_opt reads {_quantize.FORMAT!r}"
            )
        expected = _quantize.state_bytes(p.numel())
        if value.dim() != 1 or value.numel() != expected:
            return (
                f"has shape {tuple(value.shape)}; a blockwise 8-bit state of a param of "
                f"{p.numel()} elements is a 1-D uint8 tensor of {expected} bytes"
            )
        return None
    if tuple(value.shape) != tuple(p.shape):
        return f"has shape {tuple(value.shape)} but the param has shape {tuple(p.shape)}"
    if p.is_complex() and value.dtype != p.dtype:
        return f"has dtype {value.dtype} but the param is {p.dtype}"
    if not p.is_complex() and not value.is_floating_point():
        return f"has dtype {value.dtype}; a state of a {p.dtype} param is a float tensor"
    return None


def _step_problem(step: Any) -> str | None:
    """What keeps a saved value from being a step counter, or None."""
    if torch.is_tensor(step):
        if step.numel() != 1 or step.is_complex() or step.dtype == torch.bool:
            return (
                f"is a {step.dtype} tensor of shape {tuple(step.shape)}; a step counter is one "
                "real number"
            )
        return None
    if isinstance(step, bool) or not isinstance(step, numbers.Real):
        return f"is {step!r}; a step counter is a number or a one-element tensor"
    return None


def uses_master(group: dict[str, Any], p: Tensor) -> bool:
    """Whether the param is updated through an fp32 master copy: 16-bit params of a group with
    master_weights=True. Other params of such a group are their own masters."""
    return group["master_weights"] and p.dtype in _MASTER_DTYPES


def uses_compensation(group: dict[str, Any], p: Tensor) -> bool:
    """Whether the param keeps a Kahan compensation: bfloat16 params of a group with
    param_rounding="kahan" (which master weights are refused with)."""
    return group.get("param_rounding") == "kahan" and p.dtype == torch.bfloat16


def place_step(p: Tensor, state: dict[str, Any]) -> None:
    """Puts the state's step counter (if any) where the kernels keep it: beside the param, in
    float32, as torch's fused and capturable paths do. torch.optim's non-fused paths keep it on
    the CPU, in float64 under a float64 default dtype."""
    step = state.get("step")
    if step is None:
        return
    if not torch.is_tensor(step):
        step = torch.tensor(float(step))
    state["step"] = step.to(device=p.device, dtype=torch.float32).reshape(())


def new_step(p: Tensor) -> Tensor:
    """A step counter that has not counted yet, beside the param, in float32."""
    return torch.zeros((), dtype=torch.float32, device=p.device)


def _on(t: Tensor | None, device: torch.device) -> Tensor | None:
    """A scaler tensor on the device of the op that reads it (a copy only across devices)."""
    return t if t is None or t.device == device else t.to(device, non_blocking=True)


def _as_dense_real(grad: Tensor) -> Tensor:
    """The grad as the statistics pass reads it: real numbers in gap-free memory."""
    if not _is_dense(grad):
        grad = grad.contiguous()
    return torch.view_as_real(grad) if grad.is_complex() else grad


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


# The dtypes the kernels read a hyperparameter tensor in.
_HYPER_TENSOR_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _check_number(
    label: str, value: Any, read_beside: Sequence[Tensor] | None, taken_by_value: bool = False
) -> None:
    """Refuses a hyperparameter the op calls cannot take (see _check_hyperparameters); a tensor
    value is read by the kernels of ``read_beside``'s params that have grads (None: by none), or
    ``taken_by_value`` by the step on the host."""
    if torch.is_tensor(value):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            raise ValueError(
                f"{label} must be a real number or a one-element real tensor, got a "
                f"{value.dtype} tensor of shape {tuple(value.shape)}"
            )
        if taken_by_value and value.device.type != "cpu":
            # Reading it would wait for the device on every step, and fail in a captured graph.
            raise ValueError(
                f"{label} is a tensor on {value.device}; fused_opt reads this hyperparameter on "
                "the host, which would synchronize with the device every step: give a float or a "
                "CPU tensor"
            )
        if read_beside is None:
            return
        devices = {p.device for p in read_beside if p.grad is not None}
        if value.dtype not in _HYPER_TENSOR_DTYPES:
            raise ValueError(
                f"{label} is a {value.dtype} tensor; the kernels read float32, float64, float16 "
                "or bfloat16"
            )
        # A CPU tensor is host memory, which the op reads without a sync (csrc/cuda/ops_cuda.cpp).
        elsewhere = sorted(str(d) for d in devices if d != value.device)
        if elsewhere and value.device.type != "cpu":
            raise ValueError(
                f"{label} is a tensor on {value.device}, which the kernels read on the params' "
                f"device; the group has params on {', '.join(elsewhere)}"
            )
    elif not isinstance(value, numbers.Real):
        raise TypeError(f"{label} must be a real number or a one-element tensor, got {value!r}")


def _check_l1(where: str, group: dict[str, Any], stepping: bool) -> None:
    """``l1_decay`` is a finite number >= 0 (or a one-element CPU tensor of one) and ``l1_mode``
    one of L1_MODES; ``where`` names the group (empty: the constructor's arguments)."""
    label = f"{where}['l1_decay']" if where else "l1_decay"
    value = group.get("l1_decay")
    _check_number(label, value, None, taken_by_value=stepping)
    # A GPU tensor outside a step (a checkpoint's) is left to the step, which refuses it.
    if not torch.is_tensor(value) or value.device.type == "cpu":
        number = float(value)
        if not (math.isfinite(number) and number >= 0):
            raise ValueError(f"Invalid {label} value: {number}; it must be a finite number >= 0")
    mode = group.get("l1_mode")
    if not (isinstance(mode, str) and mode in L1_MODES):
        mode_label = f"{where}['l1_mode']" if where else "l1_mode"
        raise ValueError(
            f"Invalid {mode_label} value: {mode!r}; it must be one of "
            f"{', '.join(repr(m) for m in L1_MODES)}"
        )


def _check_param_rounding(where: str, group: dict[str, Any]) -> None:
    """``param_rounding`` is one of PARAM_ROUNDINGS, all but "nearest" only without master weights
    (the float32 masters keep the exact values then), and ``rounding_seed`` an int in
    [0, 2**63); ``where`` names the group (empty: the constructor's arguments)."""
    def label(key: str) -> str:
        return f"{where}['{key}']" if where else key

    mode = group.get("param_rounding")
    if not (isinstance(mode, str) and mode in PARAM_ROUNDINGS):
        raise ValueError(
            f"Invalid {label('param_rounding')} value: {mode!r}; it must be one of "
            f"{', '.join(repr(m) for m in PARAM_ROUNDINGS)}"
        )
    seed = group.get("rounding_seed")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(
            f"Invalid {label('rounding_seed')} value: {seed!r}; it must be an int in [0, 2**63)"
        )
    if mode != "nearest" and group.get("master_weights"):
        raise ValueError(
            f"{label('param_rounding')} is {mode!r} together with master_weights=True: "
            f"{mode} rounding is for bfloat16 params trained without masters (the float32 "
            "masters keep the exact values); choose one"
        )


def _check_state_dtype(label: str, value: Any) -> None:
    # By identity: dtypes are singletons, and a tensor given by mistake compares elementwise.
    if value is not None and not any(value is dtype for dtype in STATE_DTYPES):
        raise ValueError(
            f"Invalid {label} value: {value!r}; it must be None (the dtype of what the states "
            f"update) or one of {', '.join(map(str, STATE_DTYPES))}"
        )


def _same_value(value: Any, omitted: Any) -> bool:
    """Whether a group's option is the value state_dict() leaves out; a tensor is always kept."""
    return not torch.is_tensor(value) and value == omitted


def split_hyper(value: float | Tensor) -> tuple[float, Tensor | None]:
    """A tensor hyperparameter (lr, betas) is read by the kernel itself, on the device, so
    changing it in place needs no new call and reading it needs no host sync."""
    if torch.is_tensor(value):
        return 0.0, value
    return float(value), None


def hyper(value: float | Tensor) -> float:
    """A hyperparameter the kernels take by value (betas, weight decay, ...)."""
    return float(value)
