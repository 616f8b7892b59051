"""`goat bench --smoke` runs inside the suite so the benchmark cannot rot. Nothing here is timed:
the assertions are about what the benchmark measures and reports, never about how fast anything is."""

from __future__ import annotations

import argparse
import json

import pytest

from goat_lora import bench


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_bench_arguments(parser)
    return parser.parse_args(argv)


def test_options_register_on_a_subcommand_parser():
    """The CLI registers the options on its `bench` subparser and calls run_bench with the result."""
    parser = argparse.ArgumentParser(prog="goat")
    sub = parser.add_subparsers(dest="command")
    bench.add_bench_arguments(sub.add_parser("bench"))
    args = parser.parse_args(["bench", "--models", "minilm", "--steps", "3", "--rank", "16", "--experts", "4",
                              "--top-k", "1", "--json", "x.json", "--smoke"])
    assert (args.models, args.steps, args.rank, args.experts, args.top_k, args.json, args.smoke) == (
        ["minilm"], 3, 16, 4, 1, "x.json", True)
    defaults = parse([])
    assert defaults.models == ["minilm", "smollm2"] and (defaults.rank, defaults.experts, defaults.top_k) == (8, 8, 2)
    assert not defaults.init and defaults.json is None


def test_smoke_step_benchmark_prints_the_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "figures.json"
    assert bench.run_bench(parse(["--smoke", "--json", str(out)])) == 0
    printed = capsys.readouterr().out
    for text in ("head", "lora", "goat_loop", "x LoRA", "GOAT step time / LoRA", "target <= 1.10x",
                 "GOAT peak memory / LoRA", "GOAT eval throughput / LoRA", "loop reference step time / GOAT"):
        assert text in printed
    figures = json.loads(out.read_text())
    assert figures["meta"]["smoke"] is True and figures["meta"]["torch"]
    assert set(figures["models"]) == {"tiny-bert", "tiny-llama"}
    for model in figures["models"].values():
        assert set(model["methods"]) == set(bench.METHODS)
        for entry in model["methods"].values():
            assert entry["step_s"]["n"] >= 1 and entry["step_s"]["min"] <= entry["step_s"]["median"] <= entry["step_s"]["max"]
            assert entry["peak_memory_bytes"] > 0 and entry["eval_tokens_per_s"] > 0
        methods = model["methods"]
        # equal total rank: GOAT trains LoRA's adapters plus E routers (n x E each)
        assert methods["goat"]["trainable_params"] > methods["lora"]["trainable_params"] > methods["head"]["trainable_params"]
        assert methods["goat"]["trainable_params"] == methods["goat_loop"]["trainable_params"]
        ratios = model["ratios"]
        assert set(ratios["met"]) == {"step", "memory", "eval", "loop_speedup"}
        assert all(isinstance(v, bool) for v in ratios["met"].values())


def test_smoke_init_benchmark_reports_speed_and_subspace_quality(tmp_path, capsys):
    out = tmp_path / "init.json"
    assert bench.run_bench(parse(["--smoke", "--init", "--json", str(out)])) == 0
    printed = capsys.readouterr().out
    assert "exact float32 SVD per matrix" in printed and "target >= 4.0x" in printed
    init = json.loads(out.read_text())["init"]
    assert init["fast_method"].startswith("gram")
    quality = init["quality"]
    assert quality["experts_compared"] == 7 * 8
    assert quality["max_angle_deg"] < 0.1 and quality["max_rel_error"] < 1e-3  # accuracy, not speed
    assert quality["max_alignment_error"] < 1e-6  # W0 - W_res + c s sum_j B_j A_j == W0
    assert init["exact_s"]["median"] > 0 and init["fast_s"]["median"] > 0


def test_json_is_written_atomically(tmp_path, monkeypatch):
    """A failing run leaves no half-written file (temp file + os.replace)."""
    out = tmp_path / "figures.json"
    out.write_text("old")

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(bench.json, "dumps", boom)
    with pytest.raises(RuntimeError):
        bench.run_bench(parse(["--smoke", "--init", "--json", str(out)]))
    assert out.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["figures.json"]
