"""``catp bench`` on the families beyond BLIP-2 (Idefics2, Kosmos-2, Aria): a timed run on a tiny saved checkpoint of
each, the analytic FLOPs of every stage against torch's count of the stock model's matrix products, parameter counts
against models built on the meta device, the paper-shaped archs, the Aria refusal and ``--flops-only``.

No timed assertions beyond "each stage took some time"."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from test_eval import said
from tiny_families import needs_family_transformers, save_tiny_checkpoint, tiny_config, tiny_model
from torch.utils.flop_counter import FlopCounterMode
from typer.testing import CliRunner

from catp.bench import flops
from catp.bench.archs import arch_config, check_fits
from catp.bench.runner import BenchCase, Benchmark, BenchSettings, query_tokens, workload_for
from catp.cli.app import app
from catp.families import family_of, family_of_type
from catp.models import model_class

pytestmark = needs_family_transformers

FAMILIES: tuple[str, ...] = ("idefics2", "kosmos2", "aria")
#: Paper-shaped archs of the families (``catp.bench.archs``).
FAMILY_ARCHS: tuple[str, ...] = ("idefics2-8b", "kosmos-2", "aria")
GIB = 1024**3


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request, tmp_path_factory) -> Path:
    return save_tiny_checkpoint(request.param, tmp_path_factory.mktemp(f"bench-{request.param}"))


def test_bench_runs_on_a_saved_checkpoint(checkpoint, tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", "--model", str(checkpoint), "--methods", "catp", "--keep", "2", "--batch", "2",
                                      "--prompt-tokens", "4", "--new-tokens", "2", "--beams", "1", "--warmup", "0",
                                      "--repeats", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    report = json.loads(out.read_text())
    model_config = _config(checkpoint)
    q = report["num_query_tokens"]
    assert q == family_of_type(model_config.model_type).num_queries(model_config)
    assert [(r["method"], r["keep"]) for r in report["results"]] == [("none", q), ("catp", 2)]
    for r in report["results"]:
        assert r["tokens_into_llm"] == 2 * (r["keep"] + 4) and r["decode_steps"] == 1
        for stage in ("vision", "connector", "prefill"):
            assert r["flops"][stage] > 0 and r["seconds"][stage]["median"] > 0, stage
        work = flops.Workload(batch=2, keep=r["keep"], prompt_tokens=4, new_tokens=2, beams=1)
        assert r["flops"] == flops.stage_flops(model_config, work).as_dict()


def _config(folder: Path) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder)


def _counted(fn) -> tuple[int, dict[str, int]]:
    """Total FLOPs torch counts in ``fn()`` (matrix products and convolutions), and per module path."""
    with FlopCounterMode(display=False) as counter:
        fn()
    per_module = {name: sum(counts.values()) for name, counts in counter.get_flop_counts().items()}
    return counter.get_total_flops(), per_module


@pytest.mark.parametrize("family_name", FAMILIES)
def test_stage_flops_equal_a_count_of_the_stock_model(family_name):
    """Each stage's formula against torch's count of one eager run of the tiny model: the vision tower alone, then
    ``generate`` with 1 and 3 new tokens (vision + connector + prefill, then 2 decode steps more)."""
    model = tiny_model(family_name).requires_grad_(False)  # torch's module tracker hooks tensors that need grads
    model.set_attn_implementation("eager")  # torch's counter sees eager attention's matrix products
    if family_name == "aria":
        model.set_experts_implementation("eager")  # each expert on its routed tokens only: the active FLOPs
    family, config = family_of(model), model.config
    settings = BenchSettings(prompt_tokens=5, new_tokens=3, beams=1)
    inputs = family.synthetic_inputs(model, 1, settings.prompt_tokens, torch.Generator().manual_seed(0))
    tower = family.vision_tower(model)
    encoder_inputs = {name: inputs[name] for name in family.model_inputs if name in inputs}

    _, per_module = _counted(lambda: family.encode(model, inputs["pixel_values"], **encoder_inputs))
    assert per_module[type(tower).__name__] == flops.vision_flops(config, 1) > 0

    def generate(new_tokens: int) -> None:
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, num_beams=1)

    def without_rotary(counted: tuple[int, dict[str, int]]) -> int:
        # Rotary position tables are a small matrix product per call, not a layer's work: the formulas leave them out.
        total, modules = counted
        return total - sum(v for name, v in modules.items() if name.endswith("rotary_emb"))

    expected = flops.stage_flops(config, workload_for(config, settings, 1, query_tokens(config, settings)))
    one = without_rotary(_counted(lambda: generate(1)))
    assert one == expected.vision + expected.connector + flops.llm_prefill_flops(
        config, flops.Workload(1, query_tokens(config, settings), settings.prompt_tokens, 1))
    assert without_rotary(_counted(lambda: generate(3))) - one == expected.decode > 0


def _llm_parameters(model, family) -> int:
    """The language model's parameters and the LM head's where it sits outside it (untied), each counted once."""
    params = {id(p): p for p in family.language_model(model).parameters()}
    params.update({id(p): p for p in model.get_output_embeddings().parameters()})
    return sum(p.numel() for p in params.values())


@pytest.mark.parametrize("config", [*FAMILY_ARCHS, *FAMILIES])
def test_parameter_count_matches_meta_model(config):
    config = arch_config(config) if config in FAMILY_ARCHS else tiny_config(config)
    with torch.device("meta"):
        model = model_class(config.model_type)(config)
    family = family_of(model)
    counted = flops.parameter_count(config)
    assert counted["total"] == sum(p.numel() for p in model.parameters())
    assert counted["vision"] == sum(p.numel() for p in family.vision_tower(model).parameters())
    assert counted["llm"] == _llm_parameters(model, family)


def test_paper_shapes():
    totals = {arch: flops.parameter_count(arch_config(arch))["total"] for arch in FAMILY_ARCHS}
    assert totals["idefics2-8b"] == pytest.approx(8.40e9, rel=0.01)
    assert totals["kosmos-2"] == pytest.approx(1.66e9, rel=0.01)
    assert totals["aria"] == pytest.approx(25.3e9, rel=0.01)  # rhymes-ai: "24.9B" LLM + vision + projector
    idefics2, kosmos2, aria = (arch_config(arch) for arch in FAMILY_ARCHS)
    assert [flops.image_tokens(c) for c in (idefics2, kosmos2, aria)] == [4900, 257, 4900]
    assert [family_of_type(c.model_type).num_queries(c) for c in (idefics2, kosmos2, aria)] == [64, 64, 256]
    shape = flops.llm_shape(idefics2.text_config)  # Mistral: grouped-query attention
    assert (shape.attn, shape.kv, shape.mlp_mats) == (4096, 1024, 3)
    shape = flops.llm_shape(aria.text_config)  # 6 routed + 2 shared experts of 1664 and a router over 64, per token
    assert shape.mlp_macs == 3 * 2560 * 1664 * 8 + 2560 * 64
    # Aria's active parameters per token (LLM): about 3.5 B of 24.9 B; a prefill token costs about 2 x that.
    active = shape.decoder_layers * (4 * 2560 * 2560 + shape.mlp_macs) + 2560 * 100352
    assert active == pytest.approx(3.9e9, rel=0.05)


def test_aria_is_refused_before_allocating(monkeypatch):
    config = arch_config("aria")
    with pytest.raises(MemoryError, match=r"25\.\d\d B parameters: 4\d\.\d GiB of weights in bfloat16"):
        check_fits(config, "bfloat16", "cpu", available=24 * GIB)
    monkeypatch.setattr("catp.bench.archs.available_memory_bytes", lambda device: 24 * GIB)
    monkeypatch.setattr("catp.bench.archs._fill_random", lambda *a: pytest.fail("the model was built"))
    result = CliRunner().invoke(app, ["bench", "--arch", "aria"])
    assert result.exit_code == 2
    assert said(result.output, "25.") and said(result.output, "--flops-only gives its FLOPs without building it")
    assert "Traceback" not in result.output


def test_flops_only_at_paper_shape(tmp_path):
    out = tmp_path / "flops.json"
    result = CliRunner().invoke(app, ["bench", "--arch", "idefics2-8b", "--flops-only", "--keep", "16,8", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    config, settings = arch_config("idefics2-8b"), BenchSettings()
    assert [(r["batch"], r["keep"]) for r in report["flops"]] == [(1, 64), (1, 16), (1, 8)]
    for row in report["flops"]:
        assert row["flops"] == flops.stage_flops(config, workload_for(config, settings, 1, row["keep"])).as_dict()
    full, eight = report["flops"][0]["flops"], report["flops"][2]["flops"]
    assert full["vision"] == eight["vision"] and full["connector"] == eight["connector"] and eight["prefill"] < full["prefill"]
    assert out.with_suffix(".md").read_text().startswith("| batch | keep | vision | connector |")
    refused = CliRunner().invoke(app, ["bench", "--arch", "kosmos-2", "--flops-only", "--methods", "catp"])
    assert refused.exit_code == 2 and said(refused.output, "--methods: not used by --flops-only")


@pytest.mark.parametrize("family_name", FAMILIES)
def test_llm_only_reference_runs_the_language_model_alone(family_name):
    bench = Benchmark(tiny_model(family_name), "cpu", 4, BenchSettings(prompt_tokens=4, new_tokens=2, beams=1, warmup=0, repeats=1))
    (result,) = bench.run([BenchCase("llm-only", 2, 1)])
    assert result["decode_steps"] == 1 and result["seconds"]["prefill"]["median"] > 0
    assert result["flops"]["vision"] == result["flops"]["connector"] == 0 < result["flops"]["prefill"]


def test_too_few_prompt_tokens_for_the_image_delimiters_is_one_line(checkpoint, tmp_path):
    if checkpoint.name.startswith("bench-aria"):
        pytest.skip("Aria's prompt has no image delimiters: one token (BOS) suffices")
    result = CliRunner().invoke(app, ["bench", "--model", str(checkpoint), "--prompt-tokens", "2", "--out", str(tmp_path / "b.json")])
    assert result.exit_code == 2 and said(result.output, "Invalid value for --prompt-tokens")
    assert "Traceback" not in result.output and not (tmp_path / "b.json").exists()


def test_the_vllm_engine_refuses_another_family_in_one_line():
    result = CliRunner().invoke(app, ["bench", "--engine", "vllm", "--arch", "kosmos-2"])
    assert result.exit_code == 2 and said(result.output, "catp bench --engine vllm runs blip2 models only so far")
    assert "Traceback" not in result.output
