"""Adapters for the other optimizer libraries, each measured when it imports and runs here.

None of them is a dependency of fused_opt. discover() tries the libraries the device can run (apex's
FusedAdam and FusedSGD and DeepSpeed's FusedAdam on CUDA, DeepSpeed's CPUAdam on CPU, bitsandbytes and
torchao's 8-bit Adam on both) by building a tiny optimizer and taking a step, which also compiles DeepSpeed's
ops on first use; a library that is missing or fails is named in a note and the run goes on without it.

An adapter only maps a case onto the library's own class. Where the library lacks an option of the case,
or would silently ignore it, the adapter raises Unsupported, so no row compares different math.
"""

import contextlib
import logging
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch

from .implementations import EIGHT_BIT_STATES, Case, Implementation, Pipeline, Unsupported, bare_step


@dataclass(frozen=True)
class Peer:
    """A library's implementations: `load(device)` imports the library and returns them, raising when it
    cannot; `device_types` are those it runs on."""
    label: str
    implementations: tuple[str, ...]
    device_types: tuple[str, ...]
    load: Callable[[torch.device], list[Implementation]]


@dataclass
class Discovery:
    implementations: list[Implementation] = field(default_factory=list)
    found: list[str] = field(default_factory=list)      # "library version" of each library that loaded
    missing: list[str] = field(default_factory=list)    # "implementations (why)" of each one not measured


@contextlib.contextmanager
def _quiet():
    """Silences the warnings these libraries log on import and first use (no accelerator found, optional
    kernels missing): they are about features this benchmark does not use."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def _reject(case: Case, library: str, options: tuple[str, ...]) -> None:
    """Raises Unsupported when the case sets one of `options`, which `library` lacks or ignores."""
    for option in options:
        if case.kwargs.get(option):
            raise Unsupported(f"{library} has no {option}")


def _trial(make_optimizer: Callable, optimizer: str, device: torch.device) -> None:
    """One step of a tiny optimizer: the library's native code loads (or compiles) and runs, or raises."""
    param = torch.nn.Parameter(torch.zeros(8, device=device))
    param.grad = torch.ones(8, device=device)
    with _quiet():
        make_optimizer(Case("trial", optimizer, {"lr": 1e-3}, "fp32", n_states=2), [param]).step()


def _load_apex(device: torch.device) -> list[Implementation]:
    from apex.optimizers import FusedAdam, FusedSGD

    def make(case: Case, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        if case.optimizer in ("Adam", "AdamW"):
            _reject(case, "apex FusedAdam", ("amsgrad",))
            return FusedAdam(params, lr=case.kwargs["lr"], weight_decay=case.kwargs.get("weight_decay", 0.0),
                             adam_w_mode=case.optimizer == "AdamW")
        if case.dtype == "bf16":
            # FusedSGD leaves bf16 params untouched without an error (field notes).
            raise Unsupported("apex FusedSGD skips bf16 params")
        return FusedSGD(params, **case.kwargs)

    _trial(make, "Adam", device)
    return [Implementation("apex-fused", make, optimizers=("Adam", "AdamW", "SGD"))]


def _deepspeed_adam_kwargs(case: Case) -> dict:
    _reject(case, "DeepSpeed", ("amsgrad",))
    return {"lr": case.kwargs["lr"], "weight_decay": case.kwargs.get("weight_decay", 0.0)}


def _load_deepspeed_cpu(device: torch.device) -> list[Implementation]:
    with _quiet():
        from deepspeed.ops.adam import DeepSpeedCPUAdam

    def make(case: Case, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        # States in the params' dtype, as the case's other implementations keep them.
        with _quiet():
            return DeepSpeedCPUAdam(params, adamw_mode=case.optimizer == "AdamW", fp32_optimizer_states=False,
                                    **_deepspeed_adam_kwargs(case))

    _trial(make, "Adam", device)
    return [Implementation("deepspeed-cpuadam", make, optimizers=("Adam", "AdamW"))]


def _load_deepspeed_cuda(device: torch.device) -> list[Implementation]:
    with _quiet():
        from deepspeed.ops.adam import FusedAdam

    def make(case: Case, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        with _quiet():
            return FusedAdam(params, adam_w_mode=case.optimizer == "AdamW", **_deepspeed_adam_kwargs(case))

    _trial(make, "Adam", device)
    return [Implementation("deepspeed-fusedadam", make, optimizers=("Adam", "AdamW"))]


# The 8-bit states case runs a library whose states are 8-bit anyway as its plain step.
_NATIVE_8BIT = {EIGHT_BIT_STATES: Pipeline(bare_step)}


def _load_bitsandbytes(device: torch.device) -> list[Implementation]:
    with _quiet():
        import bitsandbytes

    def maker(bits: int):
        def make(case: Case, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
            # bitsandbytes accepts amsgrad, nesterov and RMSprop's momentum but ignores them.
            ignored = ("amsgrad", "nesterov", "centered") + (("momentum",) if case.optimizer == "RMSprop" else ())
            _reject(case, "bitsandbytes", ignored)
            optimizer_class = getattr(bitsandbytes.optim, f"{case.optimizer}{bits}bit")
            with _quiet():
                return optimizer_class(params, **case.kwargs)
        return make

    slow_here = "" if device.type == "cuda" else "bitsandbytes runs its CPU update as unfused torch ops"
    optimizers = ("Adam", "AdamW", "SGD", "RMSprop", "Adagrad")
    implementations = [
        # 32-bit states are fp32 whatever the params' dtype.
        Implementation("bnb-32bit", maker(32), state_size=4, slow_here=slow_here, optimizers=optimizers),
        Implementation("bnb-8bit", maker(8), state_size=1, slow_here=slow_here, optimizers=optimizers,
                       pipelines=_NATIVE_8BIT),
    ]
    for implementation in implementations:
        _trial(implementation.make_optimizer, "Adam", device)
    return implementations


def _load_torchao(device: torch.device) -> list[Implementation]:
    with _quiet():
        import torchao.optim

    def make(case: Case, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        _reject(case, "torchao", ("maximize",))
        optimizer_class = getattr(torchao.optim, f"{case.optimizer}8bit")
        kwargs = {key: value for key, value in case.kwargs.items() if key != "maximize"}
        kwargs.setdefault("weight_decay", 0.0)  # torchao's AdamW defaults to 0.01, torch's Adam to 0
        with _quiet():
            return optimizer_class(params, block_size=256, **kwargs)

    # Its step is torch.compile'd per param shape: seconds of compiling per shape on a CPU.
    slow_here = "" if device.type == "cuda" else "torchao compiles its step for each param shape"
    # No trial step: it would compile for seconds in every run that finds torchao, even one that leaves
    # it out; a step that fails in the measured run drops its row with the error.
    return [Implementation("torchao-8bit", make, state_size=1, slow_here=slow_here,
                           optimizers=("Adam", "AdamW"), pipelines=_NATIVE_8BIT)]


PEERS = (
    Peer("apex", ("apex-fused",), ("cuda",), _load_apex),
    Peer("deepspeed", ("deepspeed-fusedadam",), ("cuda",), _load_deepspeed_cuda),
    Peer("deepspeed", ("deepspeed-cpuadam",), ("cpu",), _load_deepspeed_cpu),
    Peer("bitsandbytes", ("bnb-32bit", "bnb-8bit"), ("cpu", "cuda"), _load_bitsandbytes),
    Peer("torchao", ("torchao-8bit",), ("cpu", "cuda"), _load_torchao),
)
PEER_IMPLEMENTATIONS = tuple(name for peer in PEERS for name in peer.implementations)


def _version(package: str) -> str:
    try:
        from importlib.metadata import version
        return version(package)
    except Exception:
        return "?"


def discover(device: torch.device, wanted: set[str] | None = None,
             announce: Callable[[str], None] | None = None) -> Discovery:
    """The peers' implementations that run on `device` (only those named in `wanted`, when given).

    `announce(label)` is called before each library loads, since a load can take minutes (DeepSpeed
    compiles its ops on first use).
    """
    discovery = Discovery()
    for peer in PEERS:
        names = [name for name in peer.implementations if wanted is None or name in wanted]
        if not names:
            continue
        label = "/".join(names)
        if device.type not in peer.device_types:
            discovery.missing.append(f"{label} ({'/'.join(peer.device_types)} only)")
            continue
        if announce is not None:
            announce(label)
        try:
            loaded = peer.load(device)
        except ImportError as exc:
            why = f"{peer.label} not installed" if exc.name == peer.label else f"import failed: {exc}"
            discovery.missing.append(f"{label} ({why})")
            continue
        except Exception as exc:  # a peer that fails to build or run is noted, never fatal
            first_line = str(exc).splitlines()[0] if str(exc) else ""
            discovery.missing.append(f"{label} (failed: {type(exc).__name__}: {first_line})")
            continue
        discovery.implementations += [impl for impl in loaded if impl.name in names]
        discovery.found.append(f"{peer.label} {_version(peer.label)}")
    return discovery
