"""GradScaler for fused_opt optimizers: loss scaling and clipping in two passes over the grads."""

from __future__ import annotations

from typing import Any

import torch
from torch.amp.grad_scaler import OptState

from fused_opt import _distributed
from fused_opt.optimizer import FusedOptimizer


class GradScaler(torch.amp.GradScaler):
    """Drop-in for :class:`torch.amp.GradScaler`: same constructor, methods and state dict.

    With a fused_opt optimizer, :meth:`step` reads every gradient once (their global norm and
    whether any is inf or NaN, in one deterministic pass) and then runs the optimizer's step,
    which unscales and clips the gradients in registers and changes nothing when one was inf or
    NaN. Nothing waits for the device, no gradient is written back, and :meth:`update` backs
    the scale off from the same flag. Afterwards ``optimizer.last_grad_norm`` holds the
    unscaled, unclipped norm and ``optimizer.last_step_skipped`` the flag, as device tensors.

    A ZeroRedundancyOptimizer around a fused_opt optimizer counts as one: the passes run on this
    rank's local optimizer, and with its ``shard_group`` every rank skips together.

    With any other optimizer, after an explicit :meth:`unscale_`, or when a grad is sparse, it
    behaves exactly as torch's GradScaler.
    """

    def step(self, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        # ZeroRedundancyOptimizer's step() steps its local optimizer, which reads the scaling
        # set on it here, and then broadcasts the params.
        local = _distributed.local_optimizer(optimizer)
        if not (
            self._enabled
            and isinstance(local, FusedOptimizer)
            and not hasattr(local, "grad_scale")
            and self._per_optimizer_states[id(optimizer)]["stage"] is OptState.READY
        ):
            return super().step(optimizer, *args, **kwargs)
        # The check, the pass and the step take the very grads the check read (a step plan
        # keeps them; where the answer is no, nothing is kept), so that they read them once and
        # the step takes the grads measured.
        if not local._kernels_take_scaling(keep_grads=True):
            return super().step(optimizer, *args, **kwargs)
        try:
            if "closure" in kwargs:
                raise RuntimeError(
                    "Closure use is not currently supported if GradScaler is enabled."
                )
            scale, _ = self._check_scale_growth_tracker("step")
            stats = local._compute_grad_stats(scale, keep_grads=True)
            if not stats:
                # torch's GradScaler refuses a step with no grads at all the same way.
                raise AssertionError("No inf checks were recorded for this optimizer.")
            found_inf_per_device = {device: s.found_inf for device, s in stats.items()}
            optimizer_state = self._per_optimizer_states[id(optimizer)]
            optimizer_state["found_inf_per_device"] = found_inf_per_device
            found_infs = [
                t if t.device == scale.device else t.to(scale.device, non_blocking=True)
                for t in found_inf_per_device.values()
            ]
            local.grad_scale = scale
            local.found_inf = found_infs[0] if len(found_infs) == 1 else sum(found_infs)
            local._precomputed_grad_stats = stats
            try:
                result = optimizer.step(*args, **kwargs)
            finally:
                del local.grad_scale, local.found_inf, local._precomputed_grad_stats
        finally:
            local._release_grads()
        optimizer_state["stage"] = OptState.STEPPED
        return result
