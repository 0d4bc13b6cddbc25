"""Engine dumps in, profiles out: files written in each engine's layout from a real moescope capture of
the demo model must ingest to the captured counts; dense layers are dropped by the model's own MoE
layers; broken or foreign dumps are refused in one line."""

from __future__ import annotations

import json
from fractions import Fraction

import numpy as np
import pytest
import torch
from engine_dumps import (
    all_ids,
    layer_counts,
    megatron_tpe,
    routing_from_trace,
    sglang_chat,
    sglang_generate,
    sglang_per_pass,
    sglang_per_token,
    sglang_stat,
    vllm_lists,
    vllm_npy,
    write_jsonl,
)
from helpers import save_with_tokenizer, tokenizer, write_calibration

import moescope.profiling.ingest as ingest_module
from moescope.analysis.analyse import analyse
from moescope.analysis.criteria import profile_scores
from moescope.backends.hf.loading import load_model, load_tokenizer
from moescope.calibration import CALIBRATION, DEMO_MODEL, load_calibration
from moescope.cli import main
from moescope.errors import MoescopeError
from moescope.models.tiny import tiny_model
from moescope.profiling.ingest import IngestOptions, ingest
from moescope.profiling.run import ProfileOptions, profile_model
from moescope.profiling.store import Profile

PER_REQUEST_COUNTERS = ("selections", "lang_selections", "tokens", "lang_tokens", "prompt_tokens", "presence",
                        "prompt_counts", "coactivation")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo model profiled over a few calibration prompts (3 generated tokens each), with its trace
    turned back into per-prompt routing, and a tags file naming each prompt's domain and language."""
    tmp = tmp_path_factory.mktemp("demo")
    prompts = load_calibration(CALIBRATION)[::40]
    model = load_model(DEMO_MODEL)
    profile = profile_model(model, load_tokenizer(DEMO_MODEL), prompts, tmp / "captured",
                            ProfileOptions(generate=3, batch_size=3, max_tokens=24, coactivation=True,
                                           trace=str(tmp / "trace.parquet"), progress=False))
    routing = routing_from_trace(tmp / "trace.parquet", profile, model.config.num_hidden_layers)
    tags = write_jsonl(tmp / "tags.jsonl", [{"id": p.id, "domain": p.domain, "lang": p.lang} for p in prompts])
    return {"dir": tmp, "profile": profile, "routing": routing, "tags": tags, "experts": model.config.num_experts}


def ingested(demo, fmt: str, bodies: list[dict], name: str, **options) -> Profile:
    path = write_jsonl(demo["dir"] / f"{name}.jsonl", bodies)
    return ingest(fmt, [path], DEMO_MODEL, demo["dir"] / name,
                  IngestOptions(tags=str(demo["tags"]), coactivation=True, **options), overwrite=True)


def assert_counters_equal(a: Profile, b: Profile, names=PER_REQUEST_COUNTERS) -> None:
    assert a.domains == b.domains and a.langs == b.langs
    assert [p["id"] for p in a.prompts] == [p["id"] for p in b.prompts]
    for name in names:
        np.testing.assert_array_equal(a.counters[name], b.counters[name], err_msg=name)


@pytest.mark.parametrize("fmt, writer", [("sglang", sglang_generate), ("sglang", sglang_chat),
                                         ("vllm", "npy"), ("vllm", "lists")])
def test_per_request_dumps_ingest_to_the_captured_counters(demo, fmt, writer, monkeypatch):
    monkeypatch.setattr(ingest_module, "REQUESTS_PER_CHUNK", 2)  # chunks of the stream, merged in order
    routing, layers = demo["routing"], list(range(len(demo["profile"].layers)))
    write = {"npy": lambda i, r: vllm_npy(i, r, demo["experts"]), "lists": lambda i, r: vllm_lists(i, r, layers)}
    write = write.get(writer, writer)
    profile = ingested(demo, fmt, [write(i, r) for i, r in routing.items()], f"{fmt}-{len(str(writer))}")
    assert_counters_equal(profile, demo["profile"])
    assert set(profile.absent) == {"weight_sum", "weight_sq", "weight_hist", "entropy_sum"}
    assert Profile.load(demo["dir"] / f"{fmt}-{len(str(writer))}").absent == profile.absent


def test_count_dumps_ingest_to_the_captured_selections(demo, tmp_path):
    counts = layer_counts(demo["routing"], demo["experts"])
    captured = demo["profile"].counters["selections"].sum((0, 1))
    np.testing.assert_array_equal(counts, captured)  # the fixture itself is right
    dumps = {"stat": sglang_stat(tmp_path / "stat.pt", counts),
             "per_pass": sglang_per_pass(tmp_path / "pass.pt", counts, redundant=[0, 5]),
             "per_token": sglang_per_token(tmp_path / "token.pt", all_ids(demo["routing"]), demo["experts"])}
    for mode, path in dumps.items():
        profile = ingest("sglang-recorder", [path], DEMO_MODEL, tmp_path / mode)
        np.testing.assert_array_equal(profile.counters["selections"].sum((0, 1)), captured, err_msg=mode)
        assert profile.counters["tokens"].sum() == demo["profile"].counters["tokens"].sum()
        assert "prompt_counts" in profile.absent and profile.prompts == []
    layers = list(range(len(demo["profile"].layers)))
    for ep, tp in ((1, 1), (4, 1), (2, 2)):
        files = megatron_tpe(tmp_path / f"tpe-{ep}-{tp}", counts, layers, ep, tp)
        profile = ingest("megatron", files, DEMO_MODEL, tmp_path / f"megatron-{ep}-{tp}",
                         IngestOptions(tensor_parallel=tp))
        np.testing.assert_array_equal(profile.counters["selections"].sum((0, 1)), captured, err_msg=f"{ep} {tp}")


def test_dense_layers_are_dropped_by_the_model_not_the_data(tmp_path):
    """DeepSeek-V3 with its first layer dense: engines send zero rows there; zero is also a valid expert."""
    model = tiny_model("deepseek_v3")
    save_with_tokenizer(model, tmp_path / "model")
    prompts = write_calibration(tmp_path / "cal.jsonl", count=5)
    captured = profile_model(model, tokenizer(), prompts, tmp_path / "captured",
                             ProfileOptions(generate=2, batch_size=2, trace=str(tmp_path / "t.parquet"),
                                            progress=False))
    assert [x["layer"] for x in captured.layers] == [1]
    routing = routing_from_trace(tmp_path / "t.parquet", captured, model.config.num_hidden_layers)
    tags = write_jsonl(tmp_path / "tags.jsonl", [{"id": p.id, "domain": p.domain, "lang": p.lang} for p in prompts])
    dump = write_jsonl(tmp_path / "dump.jsonl", [sglang_generate(i, r) for i, r in routing.items()])
    profile = ingest("sglang", [dump], tmp_path / "model", tmp_path / "p", IngestOptions(tags=str(tags)))
    assert_counters_equal(profile, captured, PER_REQUEST_COUNTERS[:-1])
    routing[prompts[0].id]["prefill"][0, 0] = 3  # the dense layer routed: not this model's dump
    dump = write_jsonl(tmp_path / "bad.jsonl", [sglang_generate(i, r) for i, r in routing.items()])
    with pytest.raises(MoescopeError, match="layer 0 is dense in this model"):
        ingest("sglang", [dump], tmp_path / "model", tmp_path / "q", IngestOptions(tags=str(tags)))


def test_what_needs_weights_says_so_and_the_rest_works(demo, tmp_path, capsys):
    counts = layer_counts(demo["routing"], demo["experts"])
    profile = ingest("sglang-recorder", [sglang_stat(tmp_path / "stat.pt", counts)], DEMO_MODEL, tmp_path / "p")
    with pytest.raises(MoescopeError, match="gate-mass.*needs weight_sum.*record"):
        profile_scores(profile, "gate-mass")
    np.testing.assert_array_equal(profile_scores(profile, "frequency"), counts)
    analysis = analyse(profile)
    assert any("weight_hist" in line for line in analysis.missing)
    assert any("prefill and generation" in line for line in analysis.missing)
    assert analysis.summary["weight_p50"] is None and analysis.layers[0]["topk_entropy"] is None
    assert main(["plan", "tiers", str(tmp_path / "p"), "--criterion", "gate-energy", "--out",
                 str(tmp_path / "plan.json")]) == 2
    capsys.readouterr()
    assert main(["stats", str(tmp_path / "p")]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "Not shown: routing-weight percentiles: needs weight_hist" in printed
    assert "Routing weights:" not in printed and "already reveal" not in printed  # nothing to show them from


def cli_error(capsys, *argv) -> str:
    assert main(list(map(str, argv))) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def test_broken_and_foreign_dumps_are_refused_in_one_line(demo, tmp_path, capsys):
    routing = dict(list(demo["routing"].items())[:2])
    body = sglang_generate(*next(iter(routing.items())))
    encoded = body["meta_info"]["routed_experts"]
    cases = {
        "truncated": {**body, "meta_info": {**body["meta_info"], "routed_experts": encoded[: len(encoded) // 2]}},
        "not base64": {**body, "meta_info": {**body["meta_info"], "routed_experts": "%%" + encoded[2:]}},
    }
    for name, bad in cases.items():
        err = cli_error(capsys, "ingest", "sglang", write_jsonl(tmp_path / "bad.jsonl", [bad]), "--model", DEMO_MODEL,
                        "--out", tmp_path / name)
        assert ("base64" in err or "truncated" in err) and not (tmp_path / name).exists(), name
    phases = next(iter(routing.values()))
    extra_layer = {k: np.concatenate([v, v[:, :1]], axis=1) for k, v in phases.items()}
    err = cli_error(capsys, "ingest", "sglang", write_jsonl(tmp_path / "l.jsonl", [sglang_generate("r", extra_layer)]),
                    "--model", DEMO_MODEL, "--out", tmp_path / "l")
    assert "another model" in err or "truncated" in err
    wide = {k: v + demo["experts"] for k, v in phases.items()}
    err = cli_error(capsys, "ingest", "vllm", write_jsonl(tmp_path / "e.jsonl", [vllm_npy("r", wide, 256)]),
                    "--model", DEMO_MODEL, "--out", tmp_path / "e")
    assert f"outside this model's {demo['experts']} experts" in err
    counts = layer_counts(routing, demo["experts"])
    stat = sglang_stat(tmp_path / "wide.pt", np.concatenate([counts, counts], axis=1))
    assert "do not fit this model" in cli_error(capsys, "ingest", "sglang-recorder", stat, "--model", DEMO_MODEL,
                                               "--out", tmp_path / "w")
    cut = tmp_path / "cut.pt"
    cut.write_bytes(sglang_stat(tmp_path / "whole.pt", counts).read_bytes()[:300])
    assert "truncated" in cli_error(capsys, "ingest", "sglang-recorder", cut, "--model", DEMO_MODEL, "--out",
                                    tmp_path / "c")
    lines = write_jsonl(tmp_path / "two.jsonl", [body, sglang_generate("second", phases)]).read_text()
    (tmp_path / "cut.jsonl").write_text(lines[: len(lines) - 40])
    assert "invalid JSON" in cli_error(capsys, "ingest", "sglang", tmp_path / "cut.jsonl", "--model", DEMO_MODEL,
                                       "--out", tmp_path / "j")
    (tmp_path / "indented.json").write_text(json.dumps([body], indent=1))  # one document, not JSON Lines
    assert len(ingest("sglang", [tmp_path / "indented.json"], DEMO_MODEL, tmp_path / "i").prompts) == 1
    tags = write_jsonl(tmp_path / "t.jsonl", [{"id": "someone-else", "domain": "x", "lang": "en"}])
    assert "has no line in" in cli_error(capsys, "ingest", "sglang", write_jsonl(tmp_path / "ok.jsonl", [body]),
                                         "--model", DEMO_MODEL, "--out", tmp_path / "t", "--tags", tags)


def test_pt_dumps_load_without_running_code(tmp_path):
    """A .pt holding an arbitrary object is refused: dumps load with weights_only."""
    torch.save({"logical_count": Fraction(1, 3)}, tmp_path / "evil.pt")  # any class: refused by weights_only
    with pytest.raises(MoescopeError, match="not a readable torch.save dump"):
        ingest("sglang-recorder", [tmp_path / "evil.pt"], DEMO_MODEL, tmp_path / "p")


def test_ingested_parts_merge_like_one_ingest_and_old_profiles_still_load(demo, tmp_path):
    bodies = [sglang_generate(i, r) for i, r in demo["routing"].items()]
    whole = ingested(demo, "sglang", bodies, "whole")
    first, second = ingested(demo, "sglang", bodies[:2], "first"), ingested(demo, "sglang", bodies[2:], "second")
    assert_counters_equal(first.merge(second), whole)
    assert first.merge(second).absent == whole.absent
    with pytest.raises(MoescopeError, match="settings"):
        whole.merge(demo["profile"])
    meta = json.loads((demo["dir"] / "captured" / "profile.json").read_text())
    meta.pop("absent")  # as every profile before absent counters were recorded
    old = tmp_path / "old"
    old.mkdir()
    (old / "profile.json").write_text(json.dumps(meta))
    (old / "stats.safetensors").write_bytes((demo["dir"] / "captured" / "stats.safetensors").read_bytes())
    assert Profile.load(old).absent == {}
    meta["counters"].pop("weight_sum")
    (old / "profile.json").write_text(json.dumps(meta))
    (old / "stats.safetensors").unlink()
    from safetensors.numpy import save_file

    save_file({k: v for k, v in demo["profile"].counters.items() if k != "weight_sum"}, str(old / "stats.safetensors"))
    with pytest.raises(MoescopeError, match="weight_sum"):  # missing without being declared absent: corrupt
        Profile.load(old)
