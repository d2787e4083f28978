"""Which ``@triton.autotune`` configuration won for each Triton kernel of the ``kernels`` package.

The winners live only in the process that ran the kernels, so the benchmark session calls
:func:`collect` at its end (``conftest.pytest_sessionfinish``), prints :func:`format_report` and
writes ``autotune.json`` next to the results. Kernels without ``@triton.autotune`` are listed as
such; if nothing is autotuned (or triton is missing) the report says so instead of failing.

``python -m benchmarks.autotune_report`` prints the report of a fresh process (every autotuned
kernel then shows "not run yet": useful only to list which kernels are autotuned).
"""

from __future__ import annotations

import importlib
from typing import Any


def _autotuners() -> dict[str, Any]:
    """name → kernel object (an ``Autotuner`` or a plain ``JITFunction``) for every kernel of the
    registry and every autotuned function found in the op modules."""
    found: dict[str, Any] = {}
    try:
        import kernels
        from kernels import registry
    except Exception as exc:  # noqa: BLE001
        return {"<kernels import failed>": exc}
    try:
        for name, spec in registry.all_kernels().items():
            found[name] = spec.fn
    except Exception as exc:  # noqa: BLE001
        found["<registry failed>"] = exc
    try:
        from triton.runtime.autotuner import Autotuner
    except Exception:  # noqa: BLE001
        return found
    seen = {id(v) for v in found.values()}
    for module_name in getattr(kernels, "OP_MODULES", ()):
        try:
            module = importlib.import_module(f"kernels.{module_name}")
        except Exception:  # noqa: BLE001
            continue
        for attr, value in vars(module).items():
            if isinstance(value, Autotuner) and id(value) not in seen:
                found[f"{module_name}.{attr}"] = value
                seen.add(id(value))
    return found


def _config_dict(config: Any) -> dict:
    if config is None:
        return {}
    out = dict(getattr(config, "kwargs", {}) or {})
    for key in ("num_warps", "num_stages", "num_ctas", "maxnreg"):
        value = getattr(config, key, None)
        if value is not None:
            out[key] = value
    return out


def collect() -> dict[str, Any]:
    """``{kernel: {"autotuned": bool, "best_config": {...} | None, "by_key": {key: {...}}}}``."""
    report: dict[str, Any] = {}
    for name, fn in _autotuners().items():
        if isinstance(fn, Exception):
            report[name] = {"error": f"{type(fn).__name__}: {fn}"}
            continue
        configs = getattr(fn, "configs", None)
        cache = getattr(fn, "cache", None)
        autotuned = configs is not None and isinstance(cache, dict)
        if not autotuned:
            report[name] = {"autotuned": False}
            continue
        best = getattr(fn, "best_config", None)
        report[name] = {
            "autotuned": True,
            "candidates": len(configs),
            "best_config": _config_dict(best) if best is not None else None,
            "by_key": {str(key): _config_dict(cfg) for key, cfg in cache.items()},
        }
    return report


def format_report(report: dict[str, Any]) -> str:
    if not report:
        return "no Triton kernels found"
    lines = []
    for name, entry in report.items():
        if "error" in entry:
            lines.append(f"{name}: {entry['error']}")
        elif not entry.get("autotuned"):
            lines.append(f"{name}: not autotuned (fixed launch configuration)")
        elif not entry["by_key"]:
            lines.append(f"{name}: autotuned over {entry['candidates']} configs, not run yet")
        else:
            lines.append(f"{name}: autotuned over {entry['candidates']} configs; last best {entry['best_config']}")
            for key, cfg in entry["by_key"].items():
                lines.append(f"    key {key}: {cfg}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(format_report(collect()))
