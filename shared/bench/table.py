"""The benchmark's report: the backends' records joined into one JSON document, and its table.

The per-backend records are `shared.bench.measure`'s. What needs both backends, or the machine,
is computed here: each backend's FLOP/s as a fraction of the best float32 matmul rate measured
on this machine (numpy in the launching process, and each framework in its own), the loader's
headroom over what each backend consumes, and the flax/torch step-time ratio.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

MIB = 2**20


def best_matmul(rates: Mapping[str, float | None]) -> tuple[str | None, float | None]:
    """The fastest (source, FLOP/s) of the measured matmul rates."""
    known = {name: rate for name, rate in rates.items() if rate}
    if not known:
        return None, None
    name = max(known, key=known.__getitem__)
    return name, known[name]


def combine(
    header: dict[str, Any],
    backends: Mapping[str, dict[str, Any]],
    *,
    numpy_matmul: float | None,
    matmul_size: int,
    loader: dict[str, Any] | None,
) -> dict[str, Any]:
    """The JSON document of one `twindiff bench` call."""
    rates: dict[str, float | None] = {"numpy": numpy_matmul}
    for name, record in backends.items():
        rates[name] = record.get("matmul_flops_per_second")
    source, peak = best_matmul(rates)
    document = {
        **header,
        "matmul": {
            "size": matmul_size,
            "dtype": "float32",
            "flops_per_second": rates,
            "best": peak,
            "best_source": source,
        },
        "loader": loader,
        "backends": {},
    }
    for name, record in backends.items():
        record = dict(record)
        achieved = record.get("achieved_flops_per_second")
        devices = record.get("matmul_devices") or 1
        record["flops_utilization"] = achieved / (peak * devices) if achieved and peak else None
        images = record.get("images_per_second")
        if loader and images:
            record["loader_headroom"] = loader["images_per_second"] / images
        document["backends"][name] = record
    flax, torch = document["backends"].get("flax"), document["backends"].get("torch")
    ratio = None
    if flax and torch and flax.get("step_seconds") and torch.get("step_seconds"):
        ratio = flax["step_seconds"] / torch["step_seconds"]
    document["flax_over_torch_step_time"] = ratio
    return document


# --- the table ---------------------------------------------------------------------------------


def _num(value: float | None, fmt: str, scale: float = 1.0) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value / scale, fmt)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _range(r: dict[str, Any]) -> str:
    return f"{_num(r.get('step_seconds_min'), '.3f')}-{_num(r.get('step_seconds_max'), '.3f')}"


def _wait(r: dict[str, Any]) -> str:
    return f"{_pct(r.get('data_wait_fraction'))}/{_pct(r.get('data_wait_fraction_max'))}"


_ROWS: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
    ("device", lambda r: r.get("device") or "-"),
    ("framework", lambda r: r.get("framework") or "-"),
    ("CPU threads", lambda r: str(r.get("threads") or "-")),
    ("setup s (compile excluded)", lambda r: _num(r.get("setup_seconds"), ".1f")),
    ("compile s (ahead of time)", lambda r: _num(r.get("compile_seconds"), ".1f")),
    ("first step s", lambda r: _num(r.get("first_step_seconds"), ".3f")),
    ("step s (median)", lambda r: _num(r.get("step_seconds"), ".3f")),
    ("step s (min-max)", _range),
    ("CPU s per step (median)", lambda r: _num(r.get("step_cpu_seconds"), ".3f")),
    ("images/s", lambda r: _num(r.get("images_per_second"), ".1f")),
    ("data wait (mean/worst)", _wait),
    ("GFLOP per step", lambda r: _num(r.get("step_flops"), ".2f", 1e9)),
    ("achieved GFLOP/s", lambda r: _num(r.get("achieved_flops_per_second"), ".1f", 1e9)),
    ("of best matmul", lambda r: _pct(r.get("flops_utilization"))),
    ("own matmul GFLOP/s", lambda r: _num(r.get("matmul_flops_per_second"), ".1f", 1e9)),
    ("peak RSS MiB", lambda r: _num(r.get("peak_rss_bytes"), ".0f", MIB)),
    ("peak device MiB", lambda r: _num(r.get("peak_device_memory_bytes"), ".0f", MIB)),
    ("loader headroom", lambda r: _num(r.get("loader_headroom"), ".0f") + "x"),
    ("final loss", lambda r: _num(r.get("final_loss"), ".4f")),
]


def format_table(document: dict[str, Any]) -> str:
    """The document as text: a header, one column per backend, then the machine-wide lines."""
    d = document
    lines = [
        f"twindiff bench {d['preset']}: {d['description']}",
        f"  {d['task']}, {d['model_config']}, {d['resolution']}px, batch {d['batch_size']} per "
        f"device, {d['steps']} timed steps after {d['warmup']} warm-up; {d['machine']}",
    ]
    names = list(d["backends"])
    failed = {n: r["error"] for n, r in d["backends"].items() if r.get("error")}
    shown = [n for n in names if n not in failed]
    if shown:
        width = max(len(label) for label, _ in _ROWS) + 2
        columns = {n: [cell(d["backends"][n]) for _, cell in _ROWS] for n in shown}
        col = max(16, *(len(v) + 2 for cells in columns.values() for v in cells))
        lines.append("")
        lines.append(" " * width + "".join(f"{n:>{col}}" for n in shown))
        for i, (label, _) in enumerate(_ROWS):
            lines.append(f"{label:<{width}}" + "".join(f"{columns[n][i]:>{col}}" for n in shown))
    lines.append("")
    for name, error in failed.items():
        lines.append(f"{name}: FAILED: {error}")
    if d.get("flax_over_torch_step_time"):
        lines.append(f"flax/torch step time: {d['flax_over_torch_step_time']:.2f}x")
    matmul = d["matmul"]
    if matmul["best"]:
        measured = ", ".join(
            f"{name} {rate / 1e9:.1f}" for name, rate in matmul["flops_per_second"].items() if rate
        )
        lines.append(
            f"best matmul: {matmul['best'] / 1e9:.1f} GFLOP/s ({matmul['best_source']}; float32 "
            f"{matmul['size']}x{matmul['size']}, best of a few runs; measured: {measured} GFLOP/s)"
        )
    loader = d.get("loader")
    if loader:
        lines.append(
            f"loader alone: {loader['images_per_second']:.0f} images/s "
            f"({loader['num_workers']} workers, batch {loader['batch_size']})"
        )
    return "\n".join(lines)
