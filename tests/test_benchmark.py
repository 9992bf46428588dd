"""``overlock benchmark`` runs on a tiny configuration and records what it measured (no timing assertions)."""
import json

import pytest

from overlock.benchmark import BenchConfig, official_method
from overlock.cli import main

FIELDS = {"model", "mode", "batch_size", "img_size", "label", "img_per_s", "latency_ms", "ms_per_img", "peak_mb",
          "times_ms", "backend_used", "channels_last", "reparam"}


@pytest.mark.slow
def test_benchmark_command_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["benchmark", "--model", "test_overlock", "--official", "--mode", "infer", "train", "-b", "2",
               "--img-size", "48", "--warmup", "1", "--repeats", "2", "--num-classes", "10", "--threads", "1",
               "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert {"command", "environment", "results"} <= set(data)
    assert {"cpu", "torch", "timm", "overlock"} <= set(data["environment"])
    results = data["results"]
    assert [(r["mode"], r["backend_used"], r["channels_last"]) for r in results] == [
        ("infer", "tiled", True), ("infer", "unfold", False), ("train", "tiled", True), ("train", "unfold", False)]
    for r in results:
        assert "error" not in r, r.get("error")
        assert FIELDS <= set(r)
        assert r["img_per_s"] > 0 and len(r["times_ms"]) == 2 and r["peak_mb"] is not None
    assert "official method" in results[1]["label"] and results[0]["speedup_vs_official"] > 0
    assert "| test_overlock infer b2 48px" in capsys.readouterr().out


def test_benchmark_compares_a_timm_model_in_process(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["benchmark", "--model", "test_overlock", "--compare", "resnet10t", "--in-process", "-b", "1",
                 "--img-size", "32", "--warmup", "1", "--repeats", "1", "--no-channels-last", "--backend", "unfold",
                 "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert [r["model"] for r in results] == ["test_overlock", "resnet10t"]
    assert results[0]["backend_used"] == "unfold" and not results[0]["channels_last"]


def test_official_method_config():
    cfg = official_method(BenchConfig("overlock_t", mode="train", batch_size=8))
    assert (cfg.backend, cfg.channels_last, cfg.reparam, cfg.batch_size) == ("unfold", False, False, 8)
    with pytest.raises(ValueError):
        BenchConfig("overlock_t", mode="eval")


def test_environment_records_isa_caps(monkeypatch):
    """With the kernels held to an older ISA, the record says so (cpu_isa then names the capped ISA)."""
    from overlock.benchmark import environment
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    monkeypatch.delenv("MKL_ENABLE_INSTRUCTIONS", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    assert "isa_caps" not in environment()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert environment()["isa_caps"] == {"ONEDNN_MAX_CPU_ISA": "AVX2"}


def test_rounds_report_the_median_round_and_ratio_ranges(tmp_path, capsys):
    """``--rounds``: every configuration measured in turn each round; the ratio to a --compare model is taken
    within each round, the record keeps its median and range and every round's throughput."""
    out = tmp_path / "bench.json"
    assert main(["benchmark", "--model", "test_overlock", "--compare", "resnet10t", "--in-process", "-b", "1",
                 "--img-size", "32", "--warmup", "1", "--repeats", "1", "--rounds", "3", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    ours, other = data["results"]
    assert data["rounds"] == 3 and len(ours["rounds_img_per_s"]) == len(other["rounds_img_per_s"]) == 3
    assert ours["img_per_s"] == sorted(ours["rounds_img_per_s"])[1]  # the median round's own figures
    assert len(ours["rounds_latency_min_ms"]) == 3
    lo, hi = other["speedup_of_ours_range"]
    assert lo <= other["speedup_of_ours"] <= hi and ours["speedup_vs_resnet10t"] == other["speedup_of_ours"]
    printed = capsys.readouterr().out
    assert "round 3 of 3" in printed and "median over 3 rounds" in printed
