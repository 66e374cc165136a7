"""The on-disk compile cache and the measuring loop in front of it: hits on rerun, keys that follow the
package source, damaged entries, outcomes never cached, concurrency, reuse, the analytic target."""

import json
import os
import shutil
import threading
from pathlib import Path

import pytest

from codesign.compile import cache as C
from codesign.compile import measure as M
from codesign.compile.cache import CompileCache, cache_key, source_digest
from codesign.compile.worker import CompileRequest
from codesign.config import Workload
from codesign.hardware.catalog import load_hardware
from codesign.presets import get_preset
from codesign.report import Collective, CompileReport, MemoryStats, OverlapWindow
from codesign.sharding.strategy import Strategy
from tests.conftest import env_asking_for_host_devices

W = Workload(global_batch=8, seq_len=32)
CFG = get_preset("tiny-dense")
HW = load_hardware("tpu-v5p", 2)
S = Strategy.parse("data=2")


def _report(outcome="ok", **kw) -> CompileReport:
    base = {
        "outcome": outcome,
        "target": "cpu",
        "compile_s": 1.5,
        "mesh": (("data", 2), ("fsdp", 1)),
        "full_mesh": (("data", 4),),
        "data_scale": 2,
        "flops": 1.25e9,
        "matmul_flops": 1e9,
        "bytes_accessed": 3e6,
        "xla_cost_analysis": {
            "flops": 5e8,
            "bytes_accessed": None,
            "transcendentals": 0.0,
            "optimal_seconds": None,
        },
        "collectives": (
            Collective("all-reduce", 1024, 2, ("data",), 3, "f32"),
            Collective(
                "all-gather", 2048, 2, ("data",), 4, "bf16", 2, OverlapWindow(1e6, 9e5, 3e4, 2e4, 10.0)
            ),
        ),
        "xla_flags": {"xla_tpu_overlap_compute_collective_tc": "true"},
        "overlap_from_schedule": True,
        "memory": MemoryStats(1, 2, 1, 4, 0, 6, 100),
        "while_loops": (("while.1", 2, "known_trip_count"),),
        "notes": ("a note",),
        "versions": {"jax": "0.10.2"},
    }
    base.update(kw)
    return CompileReport(**base)


def _req(cfg=CFG, w=W, s=S, target="cpu", hw=HW, **kw) -> CompileRequest:
    return CompileRequest(cfg, w, s, hw, target, **kw)


class FakeWorker:
    """Stands in for the worker subprocess: counts the compiles the loop really starts."""

    def __init__(self, monkeypatch, make=lambda *a: _report()):
        self.calls = 0
        self.make = make
        monkeypatch.setattr(M, "compile_in_subprocess", self)

    def __call__(
        self, cfg, workload, strategy, hardware, target, timeout_s, save_hlo=None, mcd=None, flags=None
    ):
        self.calls += 1
        return self.make(cfg, workload, strategy, hardware, target)


def test_report_json_round_trip():
    r = _report()
    assert CompileReport.from_json(json.loads(json.dumps(r.to_json()))) == r


def test_rerun_hits_the_cache_without_compiling(tmp_path):
    cache = CompileCache(tmp_path)
    stats = M.MeasureStats()
    first = M.measure([_req(cfg=CFG.replace(layers=1))], cache=cache, timeout_s=300, stats=stats)[0]
    assert first.outcome == "ok", first.message
    again = M.measure([_req(cfg=CFG.replace(layers=1))], cache=cache, stats=stats)[0]
    assert stats.compiled == 1 and stats.cache_hits == 1 and cache.hits == 1 and cache.misses == 1
    assert again == first


@pytest.mark.parametrize("damage", ["truncate", "not-utf8", "empty", "directory"])
def test_damaged_entry_is_a_miss_and_recompiled(tmp_path, monkeypatch, damage):
    cache = CompileCache(tmp_path)
    fake = FakeWorker(monkeypatch)
    M.measure([_req()], cache=cache)
    key = cache_key(_req())
    path = cache.path(key)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "not-utf8":
        path.write_bytes(b"\xff\xfe\x00garbage\x80" * 10)
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        path.unlink()
        path.mkdir()
    assert cache.get(key) is None and cache.misses == 2  # the first measure's miss, and this one
    r = M.measure([_req()], cache=cache)[0]
    assert fake.calls == 2 and r == _report()
    if damage != "directory":
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


def test_key_covers_what_changes_a_compile(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    k = cache_key(_req())
    assert k == cache_key(_req(cfg=CFG.replace(source="elsewhere")))  # provenance only
    different = [
        cache_key(_req(cfg=CFG.replace(hidden=128))),
        cache_key(_req(w=Workload(global_batch=16, seq_len=32))),
        cache_key(_req(s=Strategy.parse("data=2,remat=none"))),
        cache_key(_req(target="tpu")),
        cache_key(_req(hw=load_hardware("tpu-v6e", 4))),
        cache_key(_req(max_compile_devices=1)),
        cache_key(_req(), code="0" * 16),
    ]
    assert k not in different and len(set(different)) == len(different)
    with pytest.raises(ValueError, match="resolved target"):
        cache_key(_req(target="auto"))
    # XLA flags change the compiled program; the emulated device count is set per request, so it does not.
    user = {**os.environ, **env_asking_for_host_devices(8)}
    assert cache_key(_req(), env=user) == k
    fast_math = {**os.environ, **env_asking_for_host_devices(8, "--xla_cpu_enable_fast_math=true")}
    assert cache_key(_req(), env=fast_math) != k


def test_the_targets_xla_flags_are_in_the_key(monkeypatch):
    """The overlap flags are part of the target: its defaults, an override, and a removed default each
    give their own key; the same settings in another order give the same one."""
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.delenv("LIBTPU_INIT_ARGS", raising=False)
    tpu = cache_key(_req(target="tpu"))
    assert tpu == cache_key(_req(target="tpu", xla_flags=()))  # no override: the tpu defaults
    cm = (
        ("xla_tpu_enable_windowed_einsum_for_all_gather", "true"),
        ("xla_tpu_enable_async_collective_fusion", "true"),
    )
    keys = {
        cache_key(_req(target="tpu", xla_flags=cm)),
        cache_key(_req(target="tpu", xla_flags=(("xla_tpu_enable_async_collective_fusion", ""),))),
        cache_key(_req(target="tpu", xla_flags=(("xla_tpu_enable_async_collective_fusion", "false"),))),
    }
    assert tpu not in keys and len(keys) == 3
    assert cache_key(_req(target="tpu", xla_flags=cm[::-1])) == cache_key(_req(target="tpu", xla_flags=cm))


def test_a_changed_model_file_changes_the_key(tmp_path):
    """The digest covers the whole package: editing a model (not only compile/) must miss the cache."""
    import codesign

    copy = tmp_path / "codesign"
    shutil.copytree(Path(codesign.__file__).parent, copy, ignore=shutil.ignore_patterns("__pycache__"))
    before = source_digest(copy)
    assert before == source_digest(Path(codesign.__file__).parent)
    for rel in ("models/layers.py", "sharding/rules.py", "_compat.py"):
        f = copy / rel
        original = f.read_text()
        f.write_text(original + "\n# a change\n")
        assert source_digest(copy) != before, rel
        f.write_text(original)
    assert source_digest(copy) == before
    assert cache_key(_req(), code=source_digest(copy)) == cache_key(_req(), code=before)


def test_default_directory_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("CODESIGN_CACHE_DIR", str(tmp_path / "c"))
    assert CompileCache().directory == tmp_path / "c"
    monkeypatch.delenv("CODESIGN_CACHE_DIR")
    assert str(CompileCache().directory).endswith("codesign/compile")


def test_concurrent_writers_leave_a_valid_entry(tmp_path):
    caches = [CompileCache(tmp_path) for _ in range(8)]
    reports = [_report(flops=float(i)) for i in range(8)]
    threads = [
        threading.Thread(target=lambda c=c, r=r: [c.put("same" * 16, r) for _ in range(20)])
        for c, r in zip(caches, reports)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = CompileCache(tmp_path).get("same" * 16)
    assert got in reports
    assert not list(tmp_path.glob("*/*.tmp"))


def test_measure_serves_hits_and_reuse_without_starting_workers(tmp_path, monkeypatch):
    cache = CompileCache(tmp_path)
    reqs = [_req(s=Strategy.parse(s)) for s in ("data=2", "fsdp=2")]
    for r in reqs:
        cache.put(cache_key(r), _report(notes=(r.strategy.spec,)))
    fake = FakeWorker(monkeypatch)
    seen = []
    reuse = {"tensor=2,remat=full": _report(notes=("reused",))}
    out = M.measure(
        reqs + [_req(s=Strategy.parse("tensor=2"))],
        workers=2,
        cache=cache,
        reuse=reuse,
        progress=lambda i, rep: seen.append(i),
    )
    assert [r.notes for r in out] == [("data=2,remat=full",), ("fsdp=2,remat=full",), ("reused",)]
    assert sorted(seen) == [0, 1, 2] and cache.hits == 2 and fake.calls == 0


def test_analytic_target_is_answered_in_process_and_never_cached(tmp_path, monkeypatch):
    from codesign.closed_form import analytic_report

    cache = CompileCache(tmp_path)
    fake = FakeWorker(monkeypatch)
    r = M.measure([_req(target="analytic")], cache=cache)[0]
    assert fake.calls == 0 and not list(tmp_path.rglob("*.json"))
    want = analytic_report(CFG, W, S, platform=HW.platform)
    assert (r.target, r.flops, r.collectives) == ("analytic", want.flops, want.collectives)


def test_timeouts_are_rows_not_cached(tmp_path, monkeypatch):
    cache = CompileCache(tmp_path)
    fake = FakeWorker(monkeypatch, make=lambda *a: _report("timeout"))
    assert M.measure([_req()], cache=cache)[0].outcome == "timeout"
    assert M.measure([_req()], cache=cache)[0].outcome == "timeout" and fake.calls == 2


def test_interrupt_kills_running_compiles_and_keeps_finished_ones(tmp_path, monkeypatch):
    """Ctrl-C during a search: what finished is cached, the running workers are ended at once."""
    cache = CompileCache(tmp_path)
    killed = []
    monkeypatch.setattr(M, "kill_running_workers", lambda: killed.append(True))

    def make(cfg, workload, strategy, hardware, target):
        if strategy.spec.startswith("fsdp"):
            raise KeyboardInterrupt
        return _report(notes=(strategy.spec,))

    FakeWorker(monkeypatch, make=make)
    reqs = [_req(s=Strategy.parse("data=2")), _req(s=Strategy.parse("fsdp=2"))]
    with pytest.raises(KeyboardInterrupt):
        M.measure(reqs, workers=1, cache=cache)
    assert killed
    assert cache.get(cache_key(reqs[0])).notes == ("data=2,remat=full",)
    assert cache.get(cache_key(reqs[1])) is None


def test_unknown_executor_and_missing_ray_are_one_line_errors(monkeypatch):
    with pytest.raises(M.ExecutorError, match="unknown executor"):
        M.make_executor("slurm", 1)
    monkeypatch.setitem(__import__("sys").modules, "ray", None)
    with pytest.raises(M.ExecutorError, match=r"pip install"):
        M.make_executor("ray", 1)


def test_code_digest_is_stable():
    assert C._code_digest() == C._code_digest() and len(C._code_digest()) == 16


@pytest.mark.slow  # starts a local Ray instance (~1.5 min)
@pytest.mark.filterwarnings("ignore")
def test_ray_executor_gives_the_same_reports_as_local_workers(tmp_path):
    """The same request on a local Ray instance and in a local worker: the same numbers; a timeout is
    still a row."""
    ray = pytest.importorskip("ray")
    req = _req(cfg=CFG.replace(layers=1))
    local = M.measure([req], timeout_s=300)[0]
    try:
        out = M.measure([req, _req(s=Strategy.parse("fsdp=2"))], executor="ray", workers=2, timeout_s=300)
        late = M.measure([req], executor="ray", timeout_s=0.01)[0]
    finally:
        ray.shutdown()
    assert local.outcome == out[0].outcome == "ok", out[0].message
    assert (out[0].flops, out[0].collectives, out[0].memory) == (local.flops, local.collectives, local.memory)
    assert out[1].outcome == "ok" and dict(out[1].mesh)["fsdp"] == 2
    assert late.outcome == "timeout"


def test_an_executor_failure_is_a_row_not_a_crash(tmp_path, monkeypatch):
    def lost(*a):
        raise RuntimeError("worker node died")

    FakeWorker(monkeypatch, make=lost)
    out = M.measure([_req(), _req(s=Strategy.parse("fsdp=2"))], workers=2, cache=CompileCache(tmp_path))
    assert [r.outcome for r in out] == ["error", "error"]
    assert "worker node died" in out[0].message
    assert not list(tmp_path.rglob("*.json"))  # a lost worker says nothing about the candidate
