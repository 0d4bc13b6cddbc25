"""Inputs under hostile use, one test per class of failure: every kind of corrupt checkpoint file,
every kind of malformed JSONL line, plans and profiles of the wrong shape, numbers out of range, and
plans, profiles and interrupted runs that meet another model. Each is refused in one line with exit
status 2 before any output exists, and the inputs hash the same afterwards."""

from __future__ import annotations

import json
import shutil
import struct

import numpy as np
import pytest
from helpers import interrupt_profiling, listing, refused, save_with_tokenizer, tree_hash

from moescope.cli import main
from moescope.models.tiny import tiny_model

SHARD = "model-00003-of-00012.safetensors"


def rewrite_header(directory, edit) -> None:
    """Apply `edit(header dict)` to the header of one shard, keeping its data."""
    path = directory / SHARD
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    edit(header, next(k for k in header if k != "__metadata__"))
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + length:])


def set_length(length: int):
    def edit(directory):
        data = (directory / SHARD).read_bytes()
        (directory / SHARD).write_bytes(struct.pack("<Q", length) + data[8:])
    return edit


def garble_header(directory) -> None:
    data = (directory / SHARD).read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    (directory / SHARD).write_bytes(data[:8] + b"{" + b"x" * (length - 1) + data[8 + length:])


def edit_config(**changes):
    def edit(directory):
        config = json.loads((directory / "config.json").read_text())
        (directory / "config.json").write_text(json.dumps({**config, **changes}))
    return edit


def write(name: str, content: str | bytes):
    def edit(directory):
        path = directory / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    return edit


def only_bin(directory):
    for path in directory.glob("*.safetensors*"):
        path.unlink()
    (directory / "pytorch_model.bin").write_bytes(b"PK\x03\x04 a pickle")


CORRUPT_CHECKPOINTS = {
    "truncated shard": (lambda d: (d / SHARD).write_bytes((d / SHARD).read_bytes()[:1000]), "corrupt safetensors"),
    "shorter than a header": (write(SHARD, b"\x01\x02"), "too short"),
    "header length 2^63": (set_length(2**63), "it claims 9223372036854775808 bytes"),
    "header length 2^40": (set_length(2**40), "it claims 1099511627776 bytes"),
    "header not JSON": (garble_header, "corrupt safetensors header: invalid JSON"),
    "offsets past the end": (lambda d: rewrite_header(d, lambda h, k: h[k].update(data_offsets=[0, 10**9])),
                             "offsets that do not fit"),
    "unknown dtype": (lambda d: rewrite_header(d, lambda h, k: h[k].update(dtype="Q9")), "unknown dtype"),
    "shape that is not the data's": (lambda d: rewrite_header(d, lambda h, k: h[k].update(shape=[3, 3])),
                                     "offsets that do not fit its size"),
    "metadata not strings": (lambda d: rewrite_header(d, lambda h, k: h.update(__metadata__={"a": 1})),
                             "corrupt safetensors header"),
    "a pickle checkpoint": (only_bin, "moescope reads safetensors only"),
    "config not JSON": (write("config.json", "{model_type: qwen3_moe"), "invalid JSON"),
    "config a list": (write("config.json", "[1]"), "is not a JSON object"),
    "config in UTF-16": (write("config.json", '{"a": 1}'.encode("utf-16")), "looks like UTF-16"),
    "config expert count a string": (edit_config(num_experts="8"), "num_experts is '8', not an integer"),
    "config hidden size a string": (edit_config(hidden_size="64"), "could not load the model"),
    "config top-k below 1": (edit_config(num_experts_per_tok=-1), "top-k -1 of 8 experts cannot be routed"),
    "config top-k above the experts": (edit_config(num_experts_per_tok=9), "top-k 9 of 8 experts"),
    "index a list": (write("model.safetensors.index.json", "[]"), "is not a safetensors index"),
    "index weight_map a list": (write("model.safetensors.index.json", '{"weight_map": []}'),
                                "is not a safetensors index"),
    "index shard a number": (write("model.safetensors.index.json", '{"weight_map": {"a": 1}}'), "names the shard 1"),
    "index nested deeply": (write("model.safetensors.index.json", "[" * 100_000), "nested too deeply"),
    "index NaN": (write("model.safetensors.index.json", '{"weight_map": NaN}'), "NaN is not a JSON number"),
}


NOT_READ_BY_INSPECT = {"config hidden size a string"}  # inspect reads only routing keys and headers


@pytest.mark.parametrize("case", CORRUPT_CHECKPOINTS)
def test_every_kind_of_corrupt_checkpoint_is_one_line(inputs, tmp_path, capsys, case):
    model = tmp_path / "model"
    shutil.copytree(inputs.model, model)
    edit, message = CORRUPT_CHECKPOINTS[case]
    edit(model)
    before, names = tree_hash(tmp_path), listing(tmp_path)
    verbs = [["quantize", model, "--bits", "4", "--out", tmp_path / "q"],
             ["prune", model, "--plan", inputs.prune_plan, "--out", tmp_path / "p", "--replay-prompts", "0"]]
    if case not in NOT_READ_BY_INSPECT:
        verbs.append(["inspect", model])
    for argv in verbs:
        assert message in refused(capsys, *argv, after_work=True)
    assert tree_hash(tmp_path) == before and listing(tmp_path) == names


@pytest.mark.parametrize("content", ["{not json", '{"model": 5}'])
def test_a_damaged_tokenizer_is_one_line(inputs, tmp_path, capsys, content):
    shutil.copytree(inputs.model, tmp_path / "model")
    (tmp_path / "model" / "tokenizer.json").write_text(content)
    line = refused(capsys, "profile", tmp_path / "model", "--calibration", inputs.calibration, "--out",
                   tmp_path / "p", after_work=True)
    assert "could not load the tokenizer in" in line and not (tmp_path / "p").exists()


GOOD = '{"id": "a", "domain": "d", "lang": "en", "text": "the cat sat"}'
BAD_JSONL = {
    "latin-1 text": (GOOD.replace("cat", "c\xe4t").encode("latin-1"), ":1: not UTF-8 text (byte 0xe4"),
    "UTF-16": (GOOD.encode("utf-16"), ":1: not UTF-8 text (it looks like UTF-16)"),
    "nested 100,000 deep": (b"[" * 100_000, ":1: invalid JSON (nested too deeply)"),
    "a 5,000-digit integer": (GOOD.replace('"a"', "9" * 5000).encode(), ":1: invalid JSON (Exceeds the limit"),
    "a lone surrogate": (GOOD.replace("the cat", "\\ud800").encode(), ":1: a string holds a lone surrogate"),
    "NaN": (GOOD.replace('"a"', "NaN").encode(), ":1: invalid JSON (NaN is not a JSON number)"),
    "text a number": (GOOD.replace('"the cat sat"', "123").encode(), ":1: 'text' must be a string, not int"),
    "a line that is not an object": (b'["a"]\n', ":1: expected a JSON object"),
    "second line broken": ((GOOD + "\n{").encode(), ":2: invalid JSON"),
    "empty": (b"\n\n", "has no prompts"),
}


@pytest.mark.parametrize("case", BAD_JSONL)
def test_every_kind_of_bad_jsonl_line_names_file_and_line(inputs, tmp_path, capsys, case):
    content, message = BAD_JSONL[case]
    (tmp_path / "bad.jsonl").write_bytes(content)
    names = listing(tmp_path)
    argv = ["profile", inputs.model, "--calibration", tmp_path / "bad.jsonl", "--out", tmp_path / "p"]
    assert message in refused(capsys, *argv)
    assert listing(tmp_path) == names


def test_every_reader_of_jsonl_refuses_alike(inputs, tmp_path, capsys):
    """Calibration, evaluation data, probes and items share one reader: each verb names file and line."""
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(BAD_JSONL["UTF-16"][0])
    (tmp_path / "dir.jsonl").mkdir()
    for argv in (["evaluate", inputs.model, "--data", bad, "--seq-len", "8", "--sequences", "1"],
                 ["gate", inputs.model, inputs.model, "--probes", bad, "--out", tmp_path / "g.html"],
                 ["accuracy", inputs.model, "--items", bad, "--out", tmp_path / "a.json"]):
        assert f"{bad}:1: not UTF-8 text" in refused(capsys, *argv, after_work=True)
    assert "no such calibration file" in refused(capsys, "profile", inputs.model, "--calibration",
                                                 tmp_path / "dir.jsonl", "--out", tmp_path / "p")
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + GOOD.encode() + b"\n")  # a UTF-8 byte-order mark is fine
    assert main(["profile", str(inputs.model), "--calibration", str(tmp_path / "bom.jsonl"), "--out",
                 str(tmp_path / "p")]) == 0


def test_prune_checks_its_replay_set_before_writing(inputs, tmp_path, capsys):
    for calibration, message in ((tmp_path / "missing.jsonl", "replay set"), (tmp_path / "bad.jsonl", ":1:")):
        (tmp_path / "bad.jsonl").write_text("{")
        line = refused(capsys, "prune", inputs.model, "--plan", inputs.prune_plan, "--out", tmp_path / "o",
                       "--calibration", calibration, after_work=True)
        assert message in line and not (tmp_path / "o").exists()


def changed(path, **changes) -> dict:
    return {**json.loads(path.read_text()), **changes}


def prune_plans(plan: dict) -> dict:
    layers = plan["layers"]
    return {
        "top_k 0": ({**plan, "top_k": 0}, "top_k: expected an integer >= 1, got 0"),
        "top_k negative": ({**plan, "top_k": -2}, "top_k: expected an integer >= 1, got -2"),
        "top_k a string": ({**plan, "top_k": "8"}, "top_k: expected an integer >= 1, got '8'"),
        "layers a string": ({**plan, "layers": "x"}, "layers: expected a list"),
        "a layer a list": ({**plan, "layers": [[1]]}, "layers[0]: expected an object"),
        "an expert a float": ({**plan, "layers": [{**layers[0], "prune": [1.5]}]}, "prune[0]: expected an integer"),
        "a layer twice": ({**plan, "layers": layers + layers}, "a layer is listed twice"),
        "source a string": ({**plan, "source": "x"}, "source: expected an object"),
        "model a string": ({**plan, "model": "x"}, "the recorded model 'x' is not an object"),
        "an expert out of range": ({**plan, "layers": [{**x, "prune": [10**30]} for x in layers]},
                                   "prunes an expert outside 0..7"),
        "another model of the same shape": ({**plan, "model": {**plan["model"], "config_hash": "0" * 16}},
                                            "the prune plan is for another model: config_hash"),
        "not a plan": ([], "is not a moescope prune plan"),
    }


def test_prune_plans_of_the_wrong_shape(inputs, tmp_path, capsys):
    before = tree_hash(inputs.model)
    for name, (plan, message) in prune_plans(json.loads(inputs.prune_plan.read_text())).items():
        (tmp_path / "plan.json").write_text(json.dumps(plan))
        line = refused(capsys, "prune", inputs.model, "--plan", tmp_path / "plan.json", "--out", tmp_path / "o",
                       "--replay-prompts", "0", after_work=True)
        assert message in line, name
        assert not (tmp_path / "o").exists()
    assert tree_hash(inputs.model) == before


BIT_PLANS = {
    "a layer key that is a digit but not ASCII": ({"layers": {"²": [4] * 8}}, "expected a layer index"),
    "a negative layer": ({"layers": {"-1": [4] * 8}}, "expected a layer index"),
    "bits 5": ({"layers": {"0": [5] * 8, "1": [4] * 8}}, "bits = 5 is not supported"),
    "group size 0": ({"group_size": 0}, "group size must be a positive integer"),
    "non-expert bits 5": ({"non_expert_bits": 5}, "non_expert_bits = 5 is not supported"),
    "source a list": ({"source": [1]}, "source must be an object"),
    "too few experts": ({"layers": {"0": [4] * 3, "1": [4] * 8}}, "bit plan is for another model"),
    "another model": ({"model": {"model_type": "qwen3_moe", "config_hash": "0" * 16}}, "is for another model"),
}


@pytest.mark.parametrize("case", BIT_PLANS)
def test_bit_plans_of_the_wrong_shape(inputs, tmp_path, capsys, case):
    change, message = BIT_PLANS[case]
    (tmp_path / "bits.json").write_text(json.dumps(changed(inputs.bit_plan, **change)))
    for argv in (["quantize", inputs.model, "--plan", tmp_path / "bits.json", "--out", tmp_path / "q"],
                 ["export", tmp_path / "bits.json", "--format", "llama-cpp", "--out", tmp_path / "t.txt", "--model",
                  inputs.model]):
        assert message in refused(capsys, *argv, after_work=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bits.json"]


def profile_variants(meta: dict) -> dict:
    layers = meta["layers"]
    return {
        "no model": ({k: v for k, v in meta.items() if k != "model"}, "model: missing"),
        "layers a string": ({**meta, "layers": "x"}, "layers: expected a list"),
        "no layers": ({**meta, "layers": []}, "layers: expected a non-empty list"),
        "a layer without top_k": ({**meta, "layers": [{k: v for k, v in x.items() if k != "top_k"} for x in layers]},
                                  "layers[0].top_k: missing"),
        "no experts": ({**meta, "layers": [{**x, "num_experts": 0} for x in layers]}, "expected an integer >= 1"),
        "top_k above the experts": ({**meta, "layers": [{**x, "top_k": 99} for x in layers]}, "top_k exceeds"),
        "domains a number": ({**meta, "domains": 3}, "domains: expected a list"),
        "a prompt without hash": ({**meta, "prompts": [{"id": "a", "domain": "math", "lang": "en"}]},
                                  "prompts[0].hash: missing"),
        "a prompt of an unknown domain": ({**meta, "prompts": [{**meta["prompts"][0], "domain": "law"}]},
                                          "not in the lists of domains"),
        "settings a list": ({**meta, "settings": []}, "settings: expected an object"),
        "format 2": ({**meta, "format_version": 2}, "has profile format 2"),
        "not an object": ([], "expected an object"),
    }


def test_profiles_of_the_wrong_shape(inputs, tmp_path, capsys):
    meta = json.loads((inputs.profile / "profile.json").read_text())
    for name, (variant, message) in profile_variants(meta).items():
        shutil.rmtree(tmp_path / "p", ignore_errors=True)
        shutil.copytree(inputs.profile, tmp_path / "p")
        (tmp_path / "p" / "profile.json").write_text(json.dumps(variant))
        for argv in (["stats", tmp_path / "p"], ["plan", "prune", tmp_path / "p", "--ratio", "0.1", "--out",
                                                 tmp_path / "x.json"], ["merge", tmp_path / "p", inputs.profile,
                                                                        "--out", tmp_path / "m"]):
            assert message in refused(capsys, *argv), name
    assert not (tmp_path / "x.json").exists() and not (tmp_path / "m").exists()


def test_corrupt_counters_are_refused(inputs, tmp_path, capsys):
    from safetensors.numpy import load_file, save_file

    shutil.copytree(inputs.profile, tmp_path / "p")
    stats = tmp_path / "p" / "stats.safetensors"
    counters = load_file(str(stats))
    save_file({**counters, "tokens": counters["tokens"].astype(np.float64)}, str(stats))
    assert "counter 'tokens' is missing or unexpected, or has the wrong shape or type" in refused(capsys, "stats",
                                                                                                 tmp_path / "p")
    stats.write_bytes(stats.read_bytes()[:100])
    assert "corrupt safetensors header" in refused(capsys, "stats", tmp_path / "p")


def test_accuracy_files_of_the_wrong_shape_or_model(inputs, tmp_path, capsys):
    meta = json.loads((inputs.profile / "profile.json").read_text())
    good = {"format_version": 1, "kind": "expert_accuracy", "items": 4, "correct": 2, "accuracy": 0.5,
            "few_items": 10, "model": {"model_type": "qwen3_moe", "config_hash": meta["model"]["config_hash"]},
            "layers": [{"layer": 0, "experts": [{"expert": 0, "items": 4, "correct": 2, "accuracy": 0.5,
                                                 "ci": [0.1, 0.9], "few": True}]}]}
    expert = good["layers"][0]["experts"][0]
    variants = {"an accuracy of NaN": ({**expert, "accuracy": float("nan")}, "invalid JSON (NaN"),
                "no interval": ({**expert, "ci": None}, "accuracy and ci must be given exactly when items > 0"),
                "items negative": ({**expert, "items": -1}, "items: expected an integer >= 0")}
    argv = ["report", inputs.profile, "--out", tmp_path / "r.html", "--accuracy", tmp_path / "acc.json"]
    for name, (variant, message) in variants.items():
        (tmp_path / "acc.json").write_text(json.dumps({**good, "layers": [{"layer": 0, "experts": [variant]}]}))
        assert message in refused(capsys, *argv), name
    (tmp_path / "acc.json").write_text(json.dumps({**good, "model": {**good["model"], "config_hash": "0" * 16}}))
    assert "the accuracy file" in refused(capsys, *argv) and not (tmp_path / "r.html").exists()


BAD_NUMBERS = {
    "quantize --group-size 0": (["quantize", "{model}", "--bits", "4", "--group-size", "0", "--out", "{tmp}/q"],
                                "0 is out of range: give an integer >= 1"),
    "quantize --budget nan": (["quantize", "{model}", "--budget", "nan", "--profile", "{profile}", "--out", "{tmp}/q"],
                              "--budget 'nan'"),
    "quantize --budget -3": (["quantize", "{model}", "--budget", "-3", "--profile", "{profile}", "--out", "{tmp}/q"],
                             "above zero"),
    "quantize --dtype foo": (["quantize", "{model}", "--bits", "4", "--dtype", "foo", "--out", "{tmp}/q"],
                             "invalid choice: 'foo'"),
    "profile --dtype foo": (["profile", "{model}", "--calibration", "{cal}", "--dtype", "foo", "--out", "{tmp}/p"],
                            "invalid choice: 'foo'"),
    "profile --device cuda without one": (["profile", "{model}", "--calibration", "{cal}", "--device", "cuda:7",
                                           "--out", "{tmp}/p"], "--device cuda:7"),
    "profile --device nonsense": (["profile", "{model}", "--calibration", "{cal}", "--device", "gpu", "--out",
                                   "{tmp}/p"], "--device gpu: give cpu, cuda, cuda:N or auto"),
    "profile --max-tokens -5": (["profile", "{model}", "--calibration", "{cal}", "--max-tokens", "-5", "--out",
                                 "{tmp}/p"], "-5 is out of range: give an integer >= 0"),
    "profile --batch-size 1e3": (["profile", "{model}", "--calibration", "{cal}", "--batch-size", "1e3", "--out",
                                  "{tmp}/p"], "'1e3' is not an integer"),
    "evaluate --sequences 0": (["evaluate", "{model}", "--sequences", "0"], "0 is out of range"),
    "evaluate --seq-len 1": (["evaluate", "{model}", "--seq-len", "1"], "give an integer >= 2"),
    "gate --threshold kl_fail=nan": (["gate", "{model}", "{model}", "--threshold", "kl_fail=nan"],
                                     "nan is out of range: give a number >= 0"),
    "gate --threshold kl_fail=inf": (["gate", "{model}", "{model}", "--threshold", "kl_fail=inf"], "inf is out"),
    "gate --threshold repeat_n=2.5": (["gate", "{model}", "{model}", "--threshold", "repeat_n=2.5"],
                                      "'2.5' is not an integer"),
    "gate --max-new-tokens 0": (["gate", "{model}", "{model}", "--max-new-tokens", "0"], "0 is out of range"),
    "plan --layer-ratios 99:0.5": (["plan", "prune", "{profile}", "--layer-ratios", "99:0.5", "--out", "{tmp}/x"],
                                   "names layer 99, which is not an MoE layer"),
    "plan --ratio nan": (["plan", "prune", "{profile}", "--ratio", "nan", "--out", "{tmp}/x"], "ratio nan"),
    "plan --threshold nan": (["plan", "prune", "{profile}", "--threshold", "nan", "--out", "{tmp}/x"],
                             "--threshold nan"),
    "plan --ablation-windows 0": (["plan", "prune", "{profile}", "--criterion", "ablation", "--calibration", "{cal}",
                                   "--ablation-windows", "0", "--out", "{tmp}/x"], "0 is out of range"),
    "prune --offset nan": (["prune", "{model}", "--plan", "{plan}", "--method", "soft", "--offset", "nan", "--out",
                            "{tmp}/o"], "give a finite number"),
    "prune --replay-prompts -1": (["prune", "{model}", "--plan", "{plan}", "--replay-prompts", "-1", "--out",
                                   "{tmp}/o"], "give an integer >= 0"),
    "stats --coverage 2": (["stats", "{profile}", "--coverage", "2"], "--coverage 2.0 is out of range"),
    "stats --critical nan": (["stats", "{profile}", "--critical", "nan"], "tier thresholds out of range"),
    "sweep --ratios nan": (["sweep", "prune", "{model}", "--profile", "{profile}", "--ratios", "nan", "--out",
                            "{tmp}/s"], "nan is out of range: give a number in [0, 1)"),
    "sweep --bits 9": (["sweep", "quant", "{model}", "--profile", "{profile}", "--bits", "3,9", "--out", "{tmp}/s"],
                       "9 is out of range: give a number in [2, 8]"),
    "bench --limit 0": (["bench", "{model}", "--tasks", "x", "--limit", "0"], "0 is out of range"),
    "demo --threads 0": (["demo", "--threads", "0", "--out", "{tmp}/d"], "0 is out of range"),
}


@pytest.mark.parametrize("case", BAD_NUMBERS)
def test_every_kind_of_bad_number_is_one_line(inputs, tmp_path, capsys, case):
    argv, message = BAD_NUMBERS[case]
    names = {"model": inputs.model, "profile": inputs.profile, "cal": inputs.calibration, "plan": inputs.prune_plan,
             "tmp": tmp_path}
    assert message in refused(capsys, *(a.format(**names) for a in argv), after_work=True)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def other_model(inputs, tmp_path):
    """The same architecture and shape as the inputs' model, another config (so another config hash)."""
    other = tmp_path / "other"
    shutil.copytree(inputs.model, other)
    edit_config(rms_norm_eps=1e-3)(other)
    return other


def test_plans_and_profiles_meet_only_their_model(inputs, other_model, tmp_path, capsys):
    out = tmp_path / "out"
    cases = [["prune", other_model, "--plan", inputs.prune_plan, "--out", out, "--replay-prompts", "0"],
             ["quantize", other_model, "--plan", inputs.bit_plan, "--out", out],
             ["quantize", other_model, "--budget", "3", "--profile", inputs.profile, "--out", out],
             ["export", inputs.bit_plan, "--format", "mlx", "--out", tmp_path / "x.py", "--model", other_model],
             ["sweep", "prune", other_model, "--profile", inputs.profile, "--ratios", "0.1", "--criteria",
              "frequency", "--data", inputs.calibration, "--seq-len", "4", "--out", out],
             ["plan", "prune", inputs.profile, "--criterion", "ablation", "--model", other_model, "--calibration",
              inputs.calibration, "--ratio", "0.1", "--out", tmp_path / "x.json"]]
    before = tree_hash(other_model)
    for argv in cases:
        assert "is for another model: config_hash" in refused(capsys, *argv, after_work=True), argv
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other"] and tree_hash(other_model) == before


def test_a_pruned_candidate_meets_only_the_baseline_it_was_pruned_from(inputs, other_model, tmp_path, capsys):
    """evaluate maps a removed checkpoint's experts back through the plan it records: only onto its own model."""
    assert main(["prune", str(inputs.model), "--plan", str(inputs.prune_plan), "--out", str(tmp_path / "pruned"),
                 "--replay-prompts", "0"]) == 0
    line = refused(capsys, "evaluate", tmp_path / "pruned", "--baseline", other_model, "--seq-len", "8",
                   "--sequences", "1", after_work=True)
    assert "the prune plan recorded in" in line and "is for another model: config_hash" in line


def test_a_run_of_one_model_never_resumes_with_another(inputs, other_model, tmp_path, capsys, monkeypatch):
    run_whole = interrupt_profiling(monkeypatch, after_batches=2)
    argv = ["profile", inputs.model, "--calibration", inputs.calibration, "--out", tmp_path / "p", "--batch-size",
            "2", "--checkpoint-every", "1"]
    assert main([str(a) for a in argv]) == 130  # interrupted, as by Ctrl-C
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == "moescope profile: error: interrupted; rerun with --resume to continue from the last checkpoint"
    run_whole()
    before = tree_hash(tmp_path / "p.partial")
    line = refused(capsys, "profile", other_model, *argv[2:], "--resume", after_work=True)
    assert "the interrupted run in" in line and "is for another model: config_hash" in line
    assert tree_hash(tmp_path / "p.partial") == before and not (tmp_path / "p").exists()
    assert main([str(a) for a in argv] + ["--resume"]) == 0  # its own model resumes it


def test_a_baseline_of_another_architecture_is_refused(inputs, tmp_path, capsys):
    """Same tokenizer, another architecture: KL and routing drift would compare unrelated models."""
    save_with_tokenizer(tiny_model("mixtral"), tmp_path / "mixtral")
    for argv in (["evaluate", inputs.model, "--baseline", tmp_path / "mixtral", "--seq-len", "8", "--sequences", "1"],
                 ["gate", tmp_path / "mixtral", inputs.model, "--probes", inputs.calibration, "--out",
                  tmp_path / "g.html", "--max-new-tokens", "2"]):
        assert "is not a compressed form of the baseline: its model type differs" in refused(capsys, *argv,
                                                                                            after_work=True)
    assert not (tmp_path / "g.html").exists()
