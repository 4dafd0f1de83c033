"""One step of every fused_opt optimizer against its torch.optim twin, from an installed fused_opt.

CI runs it from outside the source tree after installing the sdist, so that a file the sdist lacks
or a package file the install drops shows up as a failure here rather than on a user's machine.

    python tools/step_installed.py
"""

import sys
from pathlib import Path

import torch

import fused_opt

SOURCE_TREE = Path(__file__).resolve().parents[1]
CASES = {
    "Adam": {"lr": 1e-2},
    "AdamW": {"lr": 1e-2, "weight_decay": 0.1},
    "SGD": {"lr": 1e-2, "momentum": 0.9},
    "RMSprop": {"lr": 1e-2, "centered": True},
    "Adagrad": {"lr": 1e-2},
}


def resolve_torch_sqrt() -> None:
    """torch's CPU sqrt goes to MKL VML, which picks its kernel on the first call; when that first
    call runs on several threads at once, one thread's chunk can come from a low-accuracy kernel
    (pytorch/pytorch#188792: seen here as 2.8e-4 relative error on half of a 2,112-element
    tensor, in 7 to 10 of 40 fresh processes with 2 threads, torch 2.13.0). One call on one
    element resolves it first, so that torch.optim's twins below compute what they should."""
    for dtype in (torch.float32, torch.float64):
        torch.ones(1, dtype=dtype).sqrt()


def main() -> int:
    location = Path(fused_opt.__file__).resolve()
    if location.parent == SOURCE_TREE / "fused_opt":
        print(f"error: fused_opt was imported from the source tree ({location}), not the install")
        return 1
    resolve_torch_sqrt()
    torch.manual_seed(0)
    failures = []
    for name, options in CASES.items():
        start = [torch.randn(64, 33), torch.randn(7)]
        grads = [torch.randn_like(p) for p in start]
        stepped = {}
        for library in (fused_opt, torch.optim):
            params = [p.clone().requires_grad_() for p in start]
            for param, grad in zip(params, grads):
                param.grad = grad.clone()
            getattr(library, name)(params, **options).step()
            stepped[library.__name__] = params
        changed = all(not torch.equal(p, s) for p, s in zip(stepped["fused_opt"], start))
        agree = all(torch.allclose(a, b, rtol=1e-5, atol=1e-6)
                    for a, b in zip(stepped["fused_opt"], stepped["torch.optim"]))
        print(f"{name}: {'ok' if changed and agree else 'FAILED'}")
        if not (changed and agree):
            failures.append(name)
    print(f"fused_opt {fused_opt.__version__} from {location.parent}, torch {torch.__version__}: "
          f"{len(CASES) - len(failures)} passed, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
