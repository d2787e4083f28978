"""Which ``@triton.autotune`` configuration won for each Triton kernel of the ``kernels`` package.

The winners live only in the process that ran the kernels, so the benchmark session calls
:func:`collect` at its end (``conftest.pytest_sessionfinish``), prints :func:`format_report` and
writes ``autotune.json`` next to the results. Every kernel is launched through
``kernels._utils.autotuned``, which keeps one autotuner per candidate set; a kernel not launched
in the process is listed as such, and a failure to import the kernels is reported, not raised.

``python -m benchmarks.autotune_report`` prints the report of a fresh process (every kernel then
shows "not launched in this process": useful only to list the kernels).
"""

from __future__ import annotations

from typing import Any


def _autotuners() -> dict[str, Any]:
    """name → kernel object for every kernel of the registry: the ``Autotuner`` its launches built
    in this process (``kernels._utils.autotuned`` keeps them), or the plain ``JITFunction`` when it
    has not been launched. A kernel launched with several candidate sets (e.g. per problem size)
    gets one entry per set: ``name``, ``name#2``, ..."""
    found: dict[str, Any] = {}
    try:
        from kernels import _utils, registry
    except Exception as exc:  # noqa: BLE001
        return {"<kernels import failed>": exc}
    try:
        for name, spec in registry.all_kernels().items():
            found[name] = spec.fn
    except Exception as exc:  # noqa: BLE001
        found["<registry failed>"] = exc
    names = {id(fn): name for name, fn in found.items()}
    sets: dict[str, int] = {}
    for tuned in list(_utils._TUNED.values()):
        fn = getattr(tuned, "fn", None)
        name = names.get(id(fn), getattr(fn, "__name__", repr(fn)))
        sets[name] = sets.get(name, 0) + 1
        found[name if sets[name] == 1 else f"{name}#{sets[name]}"] = tuned
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
            lines.append(f"{name}: not launched in this process")
        elif not entry["by_key"]:
            lines.append(f"{name}: autotuned over {entry['candidates']} configs, not run yet")
        else:
            lines.append(f"{name}: autotuned over {entry['candidates']} configs; last best {entry['best_config']}")
            for key, cfg in entry["by_key"].items():
                lines.append(f"    key {key}: {cfg}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(format_report(collect()))
