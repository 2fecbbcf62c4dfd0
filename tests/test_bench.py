"""catp bench: FLOPs / KV-cache formulas by hand, arch shapes, memory refusal, a tiny end-to-end run.

No timed assertions: speed targets live in ``catp bench --check``.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

import catp
from catp.bench import flops
from catp.bench.archs import ARCHS, arch_config, build_arch, check_fits
from catp.models import dtype_bytes, model_class
from catp.bench.runner import Benchmark, BenchSettings, cases_for, evaluate_checks
from catp.cli.app import app
from tiny_models import FAMILIES, FRAMES, NUM_QUERY, tiny_model

GIB = 1024**3


def _meta_model(config):
    with torch.device("meta"):
        return model_class(config.model_type)(config)


#: The BLIP-2-family archs (the others: tests/test_family_bench.py).
BLIP2_ARCHS = tuple(arch for arch in ARCHS if arch.startswith(("blip2", "instructblip")))


@pytest.mark.parametrize("arch", BLIP2_ARCHS)
def test_parameter_count_matches_meta_model(arch):
    config = arch_config(arch)
    model = _meta_model(config)
    counted = flops.parameter_count(config)
    assert counted["total"] == sum(p.numel() for p in model.parameters())
    assert counted["vision"] == sum(p.numel() for p in model.vision_model.parameters())
    assert counted["llm"] == sum(p.numel() for p in model.language_model.parameters())


def test_published_parameter_counts():
    totals = {arch: flops.parameter_count(arch_config(arch))["total"] for arch in BLIP2_ARCHS}
    assert totals["blip2-opt-2.7b"] == pytest.approx(3.74e9, rel=0.005)
    assert totals["blip2-opt-6.7b"] == pytest.approx(7.75e9, rel=0.005)
    assert totals["blip2-flan-t5-xl"] == pytest.approx(3.94e9, rel=0.02)
    assert totals["instructblip-vicuna-7b"] == pytest.approx(7.91e9, rel=0.01)
    assert totals["instructblip-video-vicuna-7b"] == totals["instructblip-vicuna-7b"]  # the same weights, run per frame


def test_arch_shapes_are_published():
    c = arch_config("blip2-opt-2.7b")
    v, q, t = c.vision_config, c.qformer_config, c.text_config
    assert (v.num_hidden_layers, v.hidden_size, v.intermediate_size, v.image_size, v.patch_size) == (39, 1408, 6144, 224, 14)
    assert (q.num_hidden_layers, q.hidden_size, q.cross_attention_frequency, q.encoder_hidden_size) == (12, 768, 2, 1408)
    assert (t.num_hidden_layers, t.hidden_size, t.ffn_dim, t.num_attention_heads) == (32, 2560, 10240, 32)
    assert c.num_query_tokens == 32 and flops.image_tokens(c) == 257
    t = arch_config("blip2-opt-6.7b").text_config
    assert (t.num_hidden_layers, t.hidden_size, t.ffn_dim) == (32, 4096, 16384)
    t = arch_config("blip2-flan-t5-xl").text_config
    assert (t.num_layers, t.num_decoder_layers, t.d_model, t.d_ff, t.num_heads, t.d_kv, t.is_gated_act) == (24, 24, 2048, 5120, 32, 64, True)
    c = arch_config("instructblip-vicuna-7b")
    assert c.model_type == "instructblip"
    t = c.text_config
    assert (t.model_type, t.num_hidden_layers, t.hidden_size, t.intermediate_size) == ("llama", 32, 4096, 11008)
    with pytest.raises(ValueError, match="unknown arch"):
        arch_config("blip2-opt-13b")


def _opt_config(d=8, f=16, layers=2, vocab=10):
    text = SimpleNamespace(model_type="opt", hidden_size=d, word_embed_proj_dim=d, ffn_dim=f, vocab_size=vocab,
                           num_hidden_layers=layers)
    vision = SimpleNamespace(hidden_size=4, intermediate_size=6, num_hidden_layers=1, image_size=4, patch_size=2)
    qformer = SimpleNamespace(hidden_size=3, intermediate_size=5, num_hidden_layers=2, cross_attention_frequency=2,
                              encoder_hidden_size=4)
    return SimpleNamespace(model_type="blip-2", text_config=text, vision_config=vision, qformer_config=qformer, num_query_tokens=2)


def test_vision_and_connector_flops_by_hand():
    config = _opt_config()
    # N = (4/2)^2 + 1 = 5 tokens, D=4, F=6, p=2: patch 2*4*12*4 = 384; layer 8*5*16 + 4*25*4 + 4*5*4*6 = 640+400+480.
    assert flops.vision_flops(config, images=3) == 3 * (384 + 1520)
    # Q=2, d=3, F=5, N=5, Dv=4. Layer: 8*2*9 + 4*4*3 + 4*2*3*5 = 144+48+120 = 312; layer 0 adds
    # cross 4*2*9 + 4*5*4*3 + 4*2*5*3 = 72+240+120 = 432. Projection 2*2*3*8 = 96.
    assert flops.connector_flops(config, images=2) == 2 * (312 * 2 + 432 + 96)


def test_llm_flops_and_kv_cache_by_hand():
    config = _opt_config()
    work = flops.Workload(batch=2, keep=3, prompt_tokens=2, new_tokens=3, beams=2)
    # R = 4 rows, S = 5, D=8, F=16, V=10, 2 layers. Per token projections 2*8*24 + 2*64 = 512, MLP 2*2*8*16 = 512.
    per_layer = 5 * (512 + 512) + 4 * 25 * 8
    assert flops.llm_prefill_flops(config, work) == 4 * (2 * per_layer + 2 * 8 * 10)
    # Decode steps t=1,2 with contexts 6, 7: per layer 1024 + 4*c*8.
    steps = sum(2 * (1024 + 32 * c) + 160 for c in (6, 7))
    assert flops.llm_decode_flops(config, work) == 4 * steps
    # KV: R * L * 2 * kv * (S + n - 1) * bytes = 4*2*2*8*7*2.
    assert flops.kv_cache_bytes(config, work, 2) == 4 * 2 * 2 * 8 * 7 * 2
    fewer = flops.Workload(batch=2, keep=1, prompt_tokens=2, new_tokens=3, beams=2)
    assert flops.kv_cache_bytes(config, fewer, 2) < flops.kv_cache_bytes(config, work, 2)


def test_t5_kv_cache_and_paper_prefill_ratio():
    t5 = arch_config("blip2-flan-t5-xl")
    work = flops.Workload(batch=1, keep=8, prompt_tokens=16, new_tokens=10, beams=5)
    # 5 rows x 24 layers x 2 x 2048 x (10 + 24) x 2 bytes.
    assert flops.kv_cache_bytes(t5, work, 2) == 5 * 24 * 2 * 2048 * 34 * 2
    opt = arch_config("blip2-opt-2.7b")
    full = flops.stage_flops(opt, flops.Workload(1, 32, 16, 10, 5))
    pruned = flops.stage_flops(opt, flops.Workload(1, 8, 16, 10, 5))
    assert full.vision == pruned.vision and full.connector == pruned.connector
    assert 1.9 < full.prefill / pruned.prefill < 48 / 24 + 0.05  # linear layers dominate: about (32+16)/(8+16)
    # A ViT-g/14 forward is about 2 x 1 B params x 257 tokens.
    assert flops.vision_flops(opt, 1) == pytest.approx(2 * 0.985e9 * 257, rel=0.05)


def test_workload_rejects_bad_input():
    with pytest.raises(ValueError):
        flops.Workload(batch=0, keep=1, prompt_tokens=1, new_tokens=1)
    with pytest.raises(ValueError):
        flops.Workload(batch=True, keep=1, prompt_tokens=1, new_tokens=1)
    with pytest.raises(ValueError, match="dtype must be one of float32, float16, bfloat16, got 'int8'"):
        dtype_bytes("int8")


def test_memory_refused_before_allocating():
    config = arch_config("blip2-opt-6.7b")
    with pytest.raises(MemoryError, match=r"7\.75 B parameters: 28\.9 GiB"):
        check_fits(config, "float32", "cpu", available=24 * GIB)
    assert check_fits(config, "bfloat16", "cpu", available=24 * GIB) == pytest.approx(7.75e9 * 2, rel=0.01)


def test_cli_memory_error_is_clear(monkeypatch):
    monkeypatch.setattr("catp.bench.archs.available_memory_bytes", lambda device: 24 * GIB)
    result = CliRunner().invoke(app, ["bench", "--arch", "blip2-opt-6.7b", "--dtype", "float32"])
    assert result.exit_code == 2
    assert "28.9 GiB" in result.output and "bfloat16" in result.output


def test_cases_grid():
    cases = cases_for(["catp", "first"], [4, 2], [1, 2], 8, check=False)
    assert [(c.method, c.keep) for c in cases if c.batch == 1] == [("none", 8), ("catp", 4), ("first", 4), ("catp", 2), ("first", 2)]
    checked = {(c.method, c.keep) for c in cases_for(["catp"], [4], [1], 8, check=True)}
    # The selectors always join target (a), the scoring/selection overhead.
    assert checked == {("none", 8), ("catp", 8), ("first", 4), ("catp", 4), ("llm-only", 4), ("divprune", 4), ("dart", 4),
                       ("catp-diverse", 4)}
    with pytest.raises(ValueError, match="unknown method"):
        cases_for(["catpp"], [4], [1], 8)


@pytest.mark.parametrize("family", FAMILIES)
def test_benchmark_runs_every_family(family):
    model = tiny_model(family)
    settings = BenchSettings(prompt_tokens=4, new_tokens=3, beams=2, instruction_tokens=3, warmup=0, repeats=1)
    bench = Benchmark(model, "cpu", 4, settings)
    results = bench.run(cases_for(["catp"], [4], [2], 8, check=True))
    for r in results:
        assert r["decode_steps"] == 2
        assert r["tokens_into_llm"] == 2 * (r["keep"] + 4)
        assert all(r["seconds"][stage]["median"] >= 0 for stage in r["seconds"])
        if r["method"] != "llm-only":
            assert r["seconds"]["vision"]["median"] > 0 and r["flops"]["vision"] > 0
    checks = evaluate_checks(results, 8, paper_shape=False)
    assert {c["target"] for c in checks} == {"a", "b", "c"}
    overhead = {c["case"].split()[0]: c["detail"] for c in checks if c["target"] == "a"}
    assert set(overhead) == {"catp", "divprune", "dart", "catp-diverse"}
    assert "connector+selection" in overhead["divprune"] and "connector+scoring" in overhead["catp"]


def test_build_arch_materialises_without_meta(monkeypatch):
    """build_arch on a shrunk paper arch: every tensor real, finite, tied head kept tied."""
    import catp.bench.archs as archs

    small = dict(archs._VISION, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    monkeypatch.setattr(archs, "_VISION", small)
    monkeypatch.setitem(archs._SPECS, "blip2-opt-2.7b", ("blip-2", archs._opt(64) | {"num_hidden_layers": 2, "vocab_size": 50304},
                                                        {"image_token_index": 50265}))
    monkeypatch.setattr(archs, "_QFORMER", dict(archs._QFORMER, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                num_attention_heads=4, encoder_hidden_size=32))
    model = build_arch("blip2-opt-2.7b", dtype="bfloat16")
    assert all(p.device.type == "cpu" and p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(torch.isfinite(p.float()).all() for p in model.parameters())
    assert model.language_model.lm_head.weight is model.language_model.get_input_embeddings().weight
    assert flops.parameter_count(model.config)["total"] == sum(p.numel() for p in model.parameters())


def test_cli_writes_json_with_every_field(tmp_path):
    model_dir = tmp_path / "tiny"
    tiny_model("blip2-opt").save_pretrained(model_dir)
    out = tmp_path / "bench.json"
    args = ["bench", "--model", str(model_dir), "--keep", "0.5", "--prompt-tokens", "3", "--new-tokens", "2", "--beams", "2",
            "--warmup", "0", "--repeats", "2", "--check", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    report = json.loads(out.read_text())
    # --check exits 1 when a target fails (timings of a tiny model on a shared CPU may fail them), else 0.
    failed = [c for c in report["checks"] if c["passed"] is False]
    assert result.exit_code == (1 if failed else 0), result.output
    assert ("target check(s) failed" in result.output) == bool(failed)
    assert {"command", "date", "model", "device", "dtype", "machine", "settings", "results", "checks"} <= set(report)
    for r in report["results"]:
        assert {"method", "keep", "batch", "tokens_into_llm", "decode_steps", "seconds", "throughput_samples_per_s", "flops",
                "kv_cache_bytes", "peak_memory_bytes", "repeats"} <= set(r)
        assert set(r["seconds"]) == {"vision", "connector", "prefill", "decode", "decode_per_token", "outside", "end_to_end"}
        assert set(r["seconds"]["end_to_end"]) == {"median", "min", "max", "spread"}
        assert set(r["flops"]) == {"vision", "connector", "prefill", "decode", "total"}
    assert (tmp_path / "bench.png").stat().st_size > 0
    assert "(a)" in result.output and "(b)" in result.output and "(c)" in result.output


def test_video_flops_run_vision_and_qformer_per_frame():
    config = arch_config("instructblip-video-vicuna-7b")
    assert config.model_type == "instructblipvideo" and config.video_token_index == 32001
    image = flops.stage_flops(config, flops.Workload(1, 128, 16, 10, 5, instruction_tokens=12, frames=1))
    video = flops.stage_flops(config, flops.Workload(1, 128, 16, 10, 5, instruction_tokens=12, frames=4))
    assert video.vision == 4 * image.vision and video.connector == 4 * image.connector and video.prefill == image.prefill
    pruned = flops.stage_flops(config, flops.Workload(1, 16, 16, 10, 5, instruction_tokens=12, frames=4))
    assert video.total > 4e12 and pruned.prefill < video.prefill / 3  # several TFLOPs a call; 16 of 128 tokens


def test_benchmark_runs_a_video_model_and_budgets():
    model = tiny_model("instructblipvideo-llama")
    settings = BenchSettings(prompt_tokens=4, new_tokens=2, beams=1, instruction_tokens=3, warmup=0, repeats=1, frames=FRAMES)
    bench = Benchmark(model, "cpu", 4, settings)
    assert bench.num_query_tokens == FRAMES * NUM_QUERY
    budget = catp.Budget(mass=0.5)
    cases = cases_for(["catp", "first"], [6, budget], [2], bench.num_query_tokens)
    assert ("first", budget) not in {(c.method, c.keep) for c in cases}  # first cannot carry a budget
    results = {(r["method"], r["keep"]): r for r in bench.run(cases)}
    assert results[("none", FRAMES * NUM_QUERY)]["tokens_into_llm"] == 2 * (FRAMES * NUM_QUERY + 4)
    assert results[("catp", 6)]["kept"] == {"mean": 6, "min": 6, "max": 6, "per_sample": [6, 6]}
    row = results[("catp", "mass:0.5")]
    kept = row["kept"]["per_sample"]
    assert row["tokens_into_llm"] == sum(kept) + 2 * 4 and row["frames"] == FRAMES
    # FLOPs: the LLM runs both samples at the larger count (fillers are computed).
    work = flops.Workload(2, max(kept), 4, 2, 1, instruction_tokens=3, frames=FRAMES)
    assert row["flops"] == flops.stage_flops(model.config, work).as_dict()
    assert results[("none", FRAMES * NUM_QUERY)]["flops"]["vision"] == flops.vision_flops(model.config, 2 * FRAMES)


def cpu_runs_bf16_attention() -> bool:
    """Whether this torch runs bfloat16 SDPA at 64+ tokens here. torch 2.13 picks its packed
    bf16 kernel from what the CPU has, so on an AMX machine forced down to
    ``ATEN_CPU_CAPABILITY=default`` it raises "pack_vnni2 is only supported when avx512 is supported"."""
    q = torch.zeros(1, 1, 64, 8, dtype=torch.bfloat16)
    try:
        torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
    except RuntimeError:
        return False
    return True


def test_video_arch_builds_and_benchmarks_when_shrunk(monkeypatch):
    """The instructblip-video-vicuna-7b path end to end (meta build, random fill, video inputs, a budget) at toy size,
    in bfloat16 (the paper shape's dtype) where this CPU's torch can run it."""
    import catp.bench.archs as archs

    monkeypatch.setattr(archs, "_VISION", dict(archs._VISION, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                               num_attention_heads=4, image_size=28))
    monkeypatch.setattr(archs, "_QFORMER", dict(archs._QFORMER, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                num_attention_heads=4, encoder_hidden_size=32))
    small_llama = dict(archs._VICUNA_7B, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4)
    monkeypatch.setitem(archs._SPECS, "instructblip-video-vicuna-7b", ("instructblipvideo", small_llama, {"video_token_index": 32001}))
    model = build_arch("instructblip-video-vicuna-7b", dtype="bfloat16" if cpu_runs_bf16_attention() else "float32")
    assert type(model).__name__ == "InstructBlipVideoForConditionalGeneration"
    assert flops.parameter_count(model.config)["total"] == sum(p.numel() for p in model.parameters())
    settings = BenchSettings(prompt_tokens=3, new_tokens=2, beams=1, instruction_tokens=3, warmup=0, repeats=1, frames=2)
    bench = Benchmark(model, "cpu", 2, settings)
    results = bench.run(cases_for(["catp"], [16, catp.Budget(mass=0.8)], [1], bench.num_query_tokens))
    assert [(r["method"], r["keep"]) for r in results] == [("none", 64), ("catp", 16), ("catp", "mass:0.8")]
    assert all(r["frames"] == 2 and r["decode_steps"] == 1 for r in results)


def test_bench_keeps_counts_by_default_as_eval_does():
    """One default across the commands: counts of query tokens (the paper's 16, 8, 4), not fractions."""
    import inspect

    from catp.cli.bench import bench_command
    from catp.cli.eval import eval_command
    from catp.protocol import PAPER_KEEPS

    default = ",".join(map(str, PAPER_KEEPS))
    assert inspect.signature(bench_command).parameters["keep"].default == default
    assert "Default: " + default in inspect.signature(eval_command).parameters["keep"].default.help


def test_reports_written_before_the_connector_stage_still_read():
    """Reports from before the family layer call the connector stage ``qformer``."""
    from catp.bench.report import markdown_tables, stage_seconds

    summary = {"median": 0.5, "min": 0.4, "max": 0.6, "spread": 0.4}
    old = {"method": "none", "keep": 32, "batch": 1, "tokens_into_llm": 48, "flops": {"prefill": 1e9, "total": 2e9},
           "kv_cache_bytes": 0, "peak_memory_bytes": 0,
           "seconds": {stage: summary for stage in ("vision", "qformer", "prefill", "decode", "decode_per_token", "end_to_end")}}
    assert stage_seconds(old, "connector") == summary
    assert "| none | 32 | 1 | 48 | 500 (100%) | 500 (100%) |" in markdown_tables({"results": [old]})
