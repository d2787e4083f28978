"""Host-side helpers shared by the op modules: where the kernels can run, the dispatch rule, and
one launch-configuration type with its autotuned launcher.

Shape specialisation. The launchers turn sizes into Python ints (``int(B)``, tile and split
arithmetic, ``if B > 0``), so every new batch size B (and L, D, H) is a new launch configuration,
a new autotune key and, under ``torch.compile``, a recompilation (sizes are specialised, not
symbolic). That is deliberate: the training engine keeps B static (training drops the last partial
batch, evaluation pads to the batch size), so one compilation serves a whole run. A caller that
feeds many different batch sizes pays one compile (and one autotune sweep) per size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

from ._triton import HAVE_TRITON

TRITON_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def interpret_mode() -> bool:
    """True when Triton runs its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available() -> bool:
    """Whether the Triton kernels can run in this process at all: triton is installed and either a
    CUDA device is visible or the CPU interpreter is on (``TRITON_INTERPRET=1``, fp32 only).

    Where this is False every op silently takes its plain-PyTorch ``*_ref`` path; ``C2FNet`` warns
    once at construction when ``fast_kernels=True`` is asked for on such a machine.
    """
    return not unavailable_reason()


def unavailable_reason() -> str:
    """Why the kernels cannot run here ("" when ``available()``)."""
    if not HAVE_TRITON:
        return "triton is not installed"
    if not (torch.cuda.is_available() or interpret_mode()):
        return "there is no CUDA device and TRITON_INTERPRET is not set"
    return ""


_WARNED: set[str] = set()


def warn_if_unavailable(who: str) -> bool:
    """Warn once per process (per ``who``) when the kernels cannot run here, saying that the
    plain-PyTorch reference path runs instead. Returns ``available()``."""
    reason = unavailable_reason()
    if reason and who not in _WARNED:
        import warnings

        _WARNED.add(who)
        warnings.warn(
            f"{who}: the Triton kernels cannot run here ({reason}); the plain-PyTorch reference "
            f"path is used instead (same results, not the fast path).",
            RuntimeWarning,
            stacklevel=3,
        )
    return not reason


def dtype_name(t: torch.Tensor) -> str:
    """Triton's name of a tensor's dtype ("fp32", "bf16", "fp16")."""
    return TRITON_DTYPES[t.dtype]


def use_triton(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether the Triton kernels (rather than the ``*_ref`` fallbacks) run for these tensors.

    On CUDA always; on CPU only under the interpreter, which handles fp32 alone.
    """
    present = [t for t in tensors if t is not None]
    if not HAVE_TRITON:
        return False
    if all(t.is_cuda for t in present):
        return True
    if interpret_mode() and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in present):
        return True
    return False


def fast_path(*tensors: Optional[torch.Tensor]) -> bool:
    """The one dispatch rule of every op: the Triton kernels run when ``use_triton`` holds, every
    dtype is one the kernels handle (fp32/bf16/fp16), and the batch is not empty."""
    present = [t for t in tensors if t is not None]
    return (
        use_triton(*present)
        and all(t.dtype in TRITON_DTYPES for t in present)
        and all(t.shape[0] > 0 for t in present if t.dim() >= 2)
    )


# ----------------------------------------------------------------------------------------------
# Launch configuration and autotuning
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelLaunch:
    """How the host launches one kernel (the one launch-configuration type of every op).

    ``grid(meta)`` gives the grid for a config's meta-parameters (most grids ignore them);
    ``constexprs`` are the block sizes and flags the host fixes; ``configs`` are the autotune
    candidates (``triton.Config``: the tuned tile sizes, warps, stages), ``configs[0]`` being
    the default that the interpreter runs; ``key`` names the kernel arguments the autotune
    result is keyed on (Triton adds every tensor argument's dtype); ``ints`` are the runtime
    integer arguments the launch arithmetic fixes (e.g. ``ROWS_PER_SPLIT``).

    Nothing a kernel writes or allocates may depend on a tuned value: the buffers and the grid's
    split counts come from the host, so every candidate computes the same thing and autotuning
    (which runs each candidate on the real arguments) is safe; every kernel only writes outputs.
    """

    grid: Callable[[dict[str, Any]], tuple[int, ...]]
    constexprs: dict[str, Any]
    configs: tuple[Any, ...]
    key: tuple[str, ...]
    ints: dict[str, int] = field(default_factory=dict)

    def meta(self, config: Any) -> dict[str, Any]:
        """Every constexpr of a launch with ``config``: the host's and the tuned ones."""
        return {**self.constexprs, **config.kwargs}


def fixed_grid(*grid: int) -> Callable[[dict[str, Any]], tuple[int, ...]]:
    """A grid that does not depend on the tuned meta-parameters."""
    return lambda meta: grid


def config(num_warps: int, num_stages: int = 1, **tiles: int) -> Any:
    """A ``triton.Config`` (tiles as keyword arguments)."""
    import triton

    return triton.Config(dict(tiles), num_warps=num_warps, num_stages=num_stages)


def config_label(cfg: Any) -> str:
    """Short text of a config for report labels, e.g. ``BLOCK_L=16 w8 s1``."""
    tiles = " ".join(f"{k}={v}" for k, v in sorted(cfg.kwargs.items()))
    return f"{tiles} w{cfg.num_warps} s{cfg.num_stages}".strip()


def _config_key(cfg: Any) -> tuple:
    return (tuple(sorted(cfg.kwargs.items())), cfg.num_warps, cfg.num_stages)


def unique_configs(configs: Iterable[Any]) -> tuple[Any, ...]:
    """``configs`` without repeats (same tiles, warps and stages), in order: clamping the tile
    candidates to a small problem often makes several equal."""
    out: dict[tuple, Any] = {}
    for cfg in configs:
        out.setdefault(_config_key(cfg), cfg)
    return tuple(out.values())


def compile_configs(
    launch: KernelLaunch, label: str, signature: dict[str, str], constexprs: dict[str, Any], scalars: dict[str, int]
) -> list[Any]:
    """One ``registry.CompileConfig`` per autotune candidate of ``launch`` (for the kernel report):
    the op's flags/sizes ``constexprs`` plus the launch's, the label extended by the grid and the
    candidate."""
    from .registry import CompileConfig

    return [
        CompileConfig(
            label=f"{label} grid={launch.grid(launch.meta(cfg))} {config_label(cfg)}",
            signature=signature,
            constexprs={**constexprs, **launch.meta(cfg)},
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
            scalars=scalars,
        )
        for cfg in launch.configs
    ]


_TUNED: dict[tuple, Any] = {}


def autotune_enabled() -> bool:
    """False when ``C2F_KERNELS_AUTOTUNE=0``: every launch runs its default (first) candidate,
    skipping the timing sweep (each new problem size otherwise compiles and times every
    candidate once: seconds, which adds up in a test run over many shapes)."""
    return os.environ.get("C2F_KERNELS_AUTOTUNE", "1") not in ("", "0")


def autotuned(kernel: Any, configs: Sequence[Any], key: Sequence[str]) -> Any:
    """``triton.autotune(configs, key)(kernel)``, one object per (kernel, configs, key).

    Under the interpreter (or with ``C2F_KERNELS_AUTOTUNE=0``) only ``configs[0]`` is kept:
    there is nothing to time on a CPU, and a one-config autotuner launches it directly. Only ``configs`` and ``key`` are used (no
    ``prune_configs_by``, ``reset_to_zero``, ...) so that ``torch.compile`` traces the
    autotuner through ``wrap_triton`` on every torch >= 2.6.
    """
    import triton

    configs = list(configs[:1] if interpret_mode() or not autotune_enabled() else configs)
    cache_key = (id(kernel), tuple(_config_key(c) for c in configs), tuple(key))
    tuned = _TUNED.get(cache_key)
    if tuned is None:
        tuned = triton.autotune(configs=configs, key=list(key))(kernel)
        _TUNED[cache_key] = tuned
    return tuned


def launchable(fn: Any) -> Any:
    """``wrap_triton(fn)`` so that ``torch.compile`` traces the launch; under the interpreter the
    plain (interpreted) kernel.

    Older torch releases reject the interpreter's ``InterpretedFunction`` in ``wrap_triton``; the
    interpreter only runs eagerly on CPU anyway, where nothing needs tracing.
    """
    if interpret_mode():
        return fn
    from torch.library import wrap_triton

    return wrap_triton(fn)


def launch(kernel: Any, how: KernelLaunch, *args: Any, **constexprs: Any) -> None:
    """Launch ``kernel`` autotuned over ``how.configs`` on ``how.grid``; ``constexprs`` are the
    op's flags (they join ``how.constexprs``)."""
    launchable(autotuned(kernel, how.configs, how.key))[how.grid](*args, **how.constexprs, **constexprs)
