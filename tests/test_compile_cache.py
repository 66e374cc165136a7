"""The on-disk compile cache: hits on rerun, keys, damaged entries, outcomes never cached, concurrency."""

import json
import threading

import pytest

from codesign.compile import cache as C
from codesign.compile import worker
from codesign.compile.cache import CompileCache, cache_key, compile_cached
from codesign.compile.hlo import Collective
from codesign.compile.report import CompileReport, MemoryStats
from codesign.compile.targets import compile_candidate
from codesign.config import Workload
from codesign.hardware.catalog import load_hardware
from codesign.presets import get_preset
from codesign.sharding.strategy import Strategy

W = Workload(global_batch=8, seq_len=32)
CFG = get_preset("tiny-dense")
HW = load_hardware("tpu-v5p", 2)
S = Strategy.parse("data=2")


def _report(outcome="ok", **kw) -> CompileReport:
    base = {"outcome": outcome, "target": "cpu", "compile_s": 1.5, "mesh": (("data", 2), ("fsdp", 1)),
            "full_mesh": (("data", 4),), "data_scale": 2, "flops": 1.25e9, "matmul_flops": 1e9,
            "bytes_accessed": 3e6,
            "xla_cost_analysis": {"flops": 5e8, "bytes_accessed": None, "transcendentals": 0.0,
                                  "optimal_seconds": None},
            "collectives": (Collective("all-reduce", 1024, 2, ("data",), 3, "f32"),),
            "memory": MemoryStats(1, 2, 1, 4, 0, 6, 100), "while_loops": (("while.1", 2, "known_trip_count"),),
            "notes": ("a note",), "versions": {"jax": "0.10.2"}}
    base.update(kw)
    return CompileReport(**base)


class Counting:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *a, **k):
        self.calls += 1
        return self.fn(*a, **k)


def test_report_json_round_trip():
    r = _report()
    assert CompileReport.from_json(json.loads(json.dumps(r.to_json()))) == r


def test_rerun_hits_the_cache_without_compiling(tmp_path):
    cache = CompileCache(tmp_path)
    fn = Counting(compile_candidate)
    cfg1 = CFG.replace(layers=1)
    first = compile_cached(cfg1, W, S, HW, "cpu", cache=cache, compile_fn=fn)
    assert first.outcome == "ok", first.message
    again = compile_cached(cfg1, W, S, HW, "cpu", cache=cache, compile_fn=fn)
    assert fn.calls == 1 and cache.hits == 1 and cache.misses == 1
    assert again == first


def test_truncated_entry_is_dropped_and_recomputed(tmp_path):
    cache = CompileCache(tmp_path)
    fn = Counting(lambda *a, **k: _report())
    compile_cached(CFG, W, S, HW, "cpu", cache=cache, compile_fn=fn)
    key = cache_key(CFG, W, S, "cpu", HW)
    path = cache.path(key)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert cache.get(key) is None and cache.corrupt == 1 and not path.exists()
    r = compile_cached(CFG, W, S, HW, "cpu", cache=cache, compile_fn=fn)
    assert fn.calls == 2 and r == _report()
    assert cache.get(key) == _report()  # valid again


def test_tampered_entry_fails_its_checksum(tmp_path):
    cache = CompileCache(tmp_path)
    cache.put("k" * 64, _report())
    path = cache.path("k" * 64)
    entry = json.loads(path.read_text())
    entry["report"]["flops"] = 1.0
    path.write_text(json.dumps(entry))
    assert cache.get("k" * 64) is None and cache.corrupt == 1


def test_outcomes_cached_except_timeout(tmp_path):
    cache = CompileCache(tmp_path)
    for outcome in ("ok", "oom", "error"):
        assert cache.put(outcome * 8, _report(outcome))
        assert cache.get(outcome * 8).outcome == outcome
    assert cache.put("t" * 8, _report("timeout")) is False
    assert cache.get("t" * 8) is None


def test_key_covers_what_changes_a_compile():
    k = cache_key(CFG, W, S, "cpu", HW)
    assert k == cache_key(CFG.replace(source="elsewhere"), W, S, "cpu", HW)  # provenance only
    different = [
        cache_key(CFG.replace(hidden=128), W, S, "cpu", HW),
        cache_key(CFG, Workload(global_batch=16, seq_len=32), S, "cpu", HW),
        cache_key(CFG, W, Strategy.parse("data=2,remat=none"), "cpu", HW),
        cache_key(CFG, W, S, "tpu", HW),
        cache_key(CFG, W, S, "cpu", load_hardware("tpu-v6e", 4)),
        cache_key(CFG, W, S, "cpu", HW, max_compile_devices=1),
    ]
    assert k not in different and len(set(different)) == len(different)
    with pytest.raises(ValueError, match="resolved target"):
        cache_key(CFG, W, S, "auto", HW)


def test_default_directory_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("CODESIGN_CACHE_DIR", str(tmp_path / "c"))
    assert CompileCache().directory == tmp_path / "c"
    monkeypatch.delenv("CODESIGN_CACHE_DIR")
    assert str(CompileCache().directory).endswith("codesign/compile")


def test_concurrent_writers_leave_a_valid_entry(tmp_path):
    caches = [CompileCache(tmp_path) for _ in range(8)]
    reports = [_report(flops=float(i)) for i in range(8)]
    threads = [threading.Thread(target=lambda c=c, r=r: [c.put("same" * 16, r) for _ in range(20)])
               for c, r in zip(caches, reports)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = CompileCache(tmp_path).get("same" * 16)
    assert got in reports
    assert not list(tmp_path.glob("*/*.tmp"))


def test_compile_many_serves_hits_without_starting_workers(tmp_path, monkeypatch):
    cache = CompileCache(tmp_path)
    reqs = [worker.CompileRequest(CFG, W, Strategy.parse(s), HW, "cpu") for s in ("data=2", "fsdp=2")]
    for r in reqs:
        cache.put(cache_key(r.cfg, r.workload, r.strategy, "cpu", r.hardware), _report(notes=(r.strategy.spec,)))

    def boom(*a, **k):
        raise AssertionError("a worker was started for a cached candidate")

    monkeypatch.setattr(worker, "compile_in_subprocess", boom)
    seen = []
    out = worker.compile_many(reqs, workers=2, cache=cache, progress_callback=lambda i, q, rep: seen.append(i))
    assert [r.notes for r in out] == [("data=2,remat=full",), ("fsdp=2,remat=full",)]
    assert sorted(seen) == [0, 1] and cache.hits == 2


def test_code_digest_is_stable():
    assert C._code_digest() == C._code_digest() and len(C._code_digest()) == 16
