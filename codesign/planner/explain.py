"""Why the winner won and the main losers lost, in one line each."""

from __future__ import annotations

from typing import Any

from codesign.units import fmt_bytes as _gb


def explain(rows: list[dict[str, Any]], chosen: int | None, capacity: int) -> list[str]:
    lines: list[str] = []
    if chosen is None:
        best = min(rows, key=lambda r: r["memory_per_device_bytes"]) if rows else None
        if best:
            lines.append(
                f"nothing fits: the leanest layout {best['strategy']['spec']} needs "
                f"{_gb(best['memory_per_device_bytes'])} per device > {_gb(capacity)} available"
            )
        return lines
    win = rows[chosen]
    t_win = win["step_time_s"]
    lines.append(
        f"chosen {win['strategy']['spec']}: {t_win:.3g} s/step, MFU {win['mfu']:.1%}, "
        f"{_gb(win['memory_per_device_bytes'])} of {_gb(capacity)} per device ({win['evidence']})"
    )
    lines += [f"  {r}" for r in win.get("reasons", [])[:4]]
    # The fastest layouts that do not fit.
    faster_oom = [
        r
        for r in rows
        if not r["fits"]
        and r["step_time_s"] < 0.995 * t_win
        and r.get("compile", {}).get("outcome") not in ("error", "timeout")
    ]
    for r in sorted(faster_oom, key=lambda r: r["step_time_s"])[:2]:
        lines.append(
            f"{r['strategy']['spec']} would be {1 - r['step_time_s'] / t_win:.1%} faster but does not fit: "
            f"{_gb(r['memory_per_device_bytes'])} > {_gb(capacity)}"
        )

    # The best of each other mesh shape (ignoring remat/microbatches), and what holds it back.
    seen = {_shape(win)}
    # Only rows measured by the same instrument compare fairly with the winner.
    peers = [
        r
        for r in rows
        if r["fits"] and r.get("compiled") == win.get("compiled") and r["step_time_s"] >= t_win
    ]
    for r in sorted(peers, key=lambda r: r["step_time_s"]):
        shape = _shape(r)
        if shape in seen or len(seen) >= 4:
            continue
        seen.add(shape)
        why = next(iter(r.get("reasons", [])), "")
        lines.append(
            f"{r['strategy']['spec']} is {r['step_time_s'] / t_win - 1:.1%} slower"
            + (f": {why}" if why else "")
        )

    for r in rows:
        c = r.get("compile") or {}
        if c.get("outcome") in ("error", "timeout"):
            lines.append(f"{r['strategy']['spec']}: compile {c['outcome']}: {c.get('message', '')[:160]}")
    return lines


def _shape(row: dict[str, Any]) -> tuple:
    return tuple(sorted(row["strategy"]["mesh"].items()))
