"""The MLX backend against the torch one on the same tiny checkpoints: profiles agree (selections
identical in float32, weights to float rounding), captured events sit where torch puts them, and
evaluate, gate and accuracy take an mlx-lm model on either side with the same numbers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import tiny_checkpoint, tokenizer, write_calibration
from safetensors.torch import load_file, save_file
from test_accuracy import write_items

from moescope.backends.hf.capture import capture_routing
from moescope.backends.select import open_model, routing_capture
from moescope.cli import main
from moescope.errors import MoescopeError
from moescope.profiling.run import ProfileOptions, profile_model
from moescope.profiling.store import FIXED_SCALE, Profile

pytest.importorskip("mlx_lm")

FAMILIES = ("qwen3_moe", "olmoe", "mixtral", "deepseek_v3")  # softmax (renormalised or not), top-k softmax, grouped
SELECTION_COUNTERS = ("tokens", "lang_tokens", "selections", "lang_selections", "presence", "prompt_counts",
                      "coactivation")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlx-backend")
    return {family: tiny_checkpoint(root / family, family) for family in FAMILIES}


def hub_llama4(source, out):
    """The hub's Llama-4 layout (a multimodal config around the text model's) of a tiny llama4_text save."""
    config = json.loads((source / "config.json").read_text())
    text = {**config, "attention_chunk_size": 8192, "use_qk_norm": True, "attention_bias": False}
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"model_type": "llama4", "text_config": text,
                                                 "architectures": ["Llama4ForConditionalGeneration"]}))
    weights = load_file(source / "model.safetensors")
    save_file({f"language_model.{k}": v for k, v in weights.items()}, out / "model.safetensors")
    return out


def mlx_gpt_oss(source, out):
    """A tiny gpt_oss save in mlx-lm's layout (what mlx-lm's sanitize makes of the hub's MXFP4 tensors)."""
    out.mkdir()
    (out / "config.json").write_text((source / "config.json").read_text())
    weights = {}
    for name, tensor in load_file(source / "model.safetensors").items():
        stem = name.rsplit(".", 1)[0]
        if name.endswith("experts.gate_up_proj"):  # [E, H, 2I], gate and up interleaved
            weights[f"{stem}.gate_proj.weight"] = tensor[..., ::2].transpose(1, 2).contiguous()
            weights[f"{stem}.up_proj.weight"] = tensor[..., 1::2].transpose(1, 2).contiguous()
        elif name.endswith("experts.gate_up_proj_bias"):
            weights[f"{stem}.gate_proj.bias"] = tensor[..., ::2].contiguous()
            weights[f"{stem}.up_proj.bias"] = tensor[..., 1::2].contiguous()
        elif name.endswith("experts.down_proj"):
            weights[f"{stem}.down_proj.weight"] = tensor.transpose(1, 2).contiguous()
        elif name.endswith("experts.down_proj_bias"):
            weights[f"{stem}.down_proj.bias"] = tensor
        else:
            weights[name] = tensor
    save_file(weights, out / "model.safetensors", metadata={"format": "mlx"})
    return out


# family -> (tiny overrides, rewrite into the layout mlx-lm reads or None). mlx-lm hard-codes Llama-4's qk-norm
# eps at 1e-6 and gpt-oss's YaRN differs from transformers': the tiny models use what both compute alike.
MORE_FAMILIES = {"glm4_moe": ({}, None), "qwen2_moe": ({}, None), "qwen3_next": ({}, None),
                 "llama4_text": ({"rms_norm_eps": 1e-6, "num_hidden_layers": 4}, hub_llama4),  # mlx-lm reads layer 3
                 "gpt_oss": ({"rope_parameters": {"rope_type": "default", "rope_theta": 150000.0}}, mlx_gpt_oss)}


@pytest.mark.parametrize("family", sorted(MORE_FAMILIES))
def test_capture_equals_torch_in_more_families(family, tmp_path):
    """Config fixes only (glm4_moe, qwen2_moe, qwen3_next), the experts' input scaled instead of their output
    (llama4) and an expert layer with biases multiplied through `expand_dims` (gpt_oss)."""
    overrides, rewrite = MORE_FAMILIES[family]
    source = tiny_checkpoint(tmp_path / "source", family, **overrides)
    target = rewrite(source, tmp_path / "mlx") if rewrite else source
    hf, mlx = open_model(source, "hf", dtype="float32"), open_model(target, "mlx", dtype="float32")
    ids, mask = padded_batch(3)
    with capture_routing(hf) as torch_rec:
        hf(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    with routing_capture(mlx) as mlx_rec:
        mlx(input_ids=ids, attention_mask=mask)
    assert [e.layer for e in mlx_rec.events] == [e.layer for e in torch_rec.events] != []
    for t, m in zip(torch_rec.events, mlx_rec.events):
        by_id_torch, by_id_mlx = t.expert_ids.sort(-1), m.expert_ids.sort(-1)
        assert torch.equal(by_id_mlx.values, by_id_torch.values)
        torch.testing.assert_close(m.weights.gather(1, by_id_mlx.indices), t.weights.gather(1, by_id_torch.indices),
                                   rtol=0, atol=1e-5)


def padded_batch(seed: int = 0):
    """Three rows, two of them left-padded."""
    ids = torch.randint(3, 128, (3, 12), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[0, :4] = mask[1, :2] = 0
    return ids, mask


@pytest.mark.parametrize("family", FAMILIES)
def test_mlx_profile_equals_the_torch_profile(checkpoints, family, tmp_path):
    prompts = write_calibration(tmp_path / "cal.jsonl", 10)
    profiles = {}
    for backend in ("hf", "mlx"):
        model = open_model(checkpoints[family], backend, dtype="float32")
        options = ProfileOptions(generate=3, batch_size=4, saliency=True, coactivation=True, progress=False)
        profiles[backend] = profile_model(model, tokenizer(), prompts, tmp_path / backend, options)
    torch_profile, mlx_profile = profiles["hf"], profiles["mlx"]
    assert mlx_profile.model == torch_profile.model and mlx_profile.layers == torch_profile.layers
    assert mlx_profile.settings == torch_profile.settings and mlx_profile.prompts == torch_profile.prompts
    assert torch_profile.counters["selections"][1].sum() > 0  # generation was profiled, padding and all
    for name in SELECTION_COUNTERS:
        np.testing.assert_array_equal(mlx_profile.counters[name], torch_profile.counters[name], err_msg=name)
    for name in ("weight_sum", "weight_sq", "entropy_sum", "saliency_sum"):  # fixed point, units of 2^-24
        np.testing.assert_allclose(mlx_profile.counters[name], torch_profile.counters[name], rtol=1e-5,
                                   atol=1e-5 * FIXED_SCALE, err_msg=name)


def test_shards_profiled_under_torch_and_mlx_merge_into_the_whole(checkpoints, tmp_path):
    prompts = write_calibration(tmp_path / "cal.jsonl", 10)
    options = ProfileOptions(generate=2, batch_size=4, progress=False)

    def run(backend, part, name):
        return profile_model(open_model(checkpoints["mixtral"], backend, dtype="float32"), tokenizer(), part,
                             tmp_path / name, options)

    whole = run("hf", prompts, "whole")
    merged = run("hf", prompts[:6], "torch-shard").merge(run("mlx", prompts[6:], "mlx-shard"))
    assert merged.prompts == whole.prompts
    for name in ("selections", "presence", "prompt_counts", "tokens"):
        np.testing.assert_array_equal(merged.counters[name], whole.counters[name], err_msg=name)


def test_the_cli_profiles_a_converted_model_as_the_model_it_was_made_from(checkpoints, tmp_path):
    source = checkpoints["deepseek_v3"]
    write_calibration(tmp_path / "cal.jsonl", 6)
    assert main(["quantize", str(source), "--bits", "8", "--backend", "mlx", "--out", str(tmp_path / "q8")]) == 0
    for name, model in (("torch", source), ("mlx", tmp_path / "q8")):  # the converted layout: mlx by itself
        assert main(["profile", str(model), "--calibration", str(tmp_path / "cal.jsonl"), "--out",
                     str(tmp_path / name), "--generate", "2"]) == 0
    torch_profile, mlx_profile = Profile.load(tmp_path / "torch"), Profile.load(tmp_path / "mlx")
    assert mlx_profile.model.mismatch(torch_profile.model) is None and mlx_profile.layers == torch_profile.layers
    selections = mlx_profile.counters["selections"]
    assert selections.sum() == mlx_profile.counters["tokens"].sum() * mlx_profile.layers[0]["top_k"]
    assert np.abs(selections - torch_profile.counters["selections"]).sum() < 0.1 * selections.sum()  # 8 bits


def test_events_sit_where_torch_puts_them_with_ids_by_weight(checkpoints):
    ids, mask = padded_batch()
    hf, mlx = (open_model(checkpoints["qwen3_moe"], backend, dtype="float32") for backend in ("hf", "mlx"))
    with capture_routing(hf) as torch_rec:
        torch_logits = hf(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    with routing_capture(mlx) as mlx_rec:
        mlx_logits = mlx(input_ids=ids, attention_mask=mask).logits
    assert len(mlx_rec.events) == len(torch_rec.events) == 2
    for t, m in zip(torch_rec.events, mlx_rec.events):
        assert m.layer == t.layer and len(m.rows) == int(mask.sum())  # padding dropped
        assert torch.equal(m.rows, t.rows) and torch.equal(m.positions, t.positions)
        assert torch.equal(m.expert_ids, t.expert_ids)  # torch.topk order: by weight, highest first
        assert (m.weights[:, :-1] >= m.weights[:, 1:]).all()
        torch.testing.assert_close(m.weights, t.weights, rtol=0, atol=1e-6)
    real = mask.bool()
    torch.testing.assert_close(mlx_logits[real], torch_logits[real].float(), rtol=0, atol=1e-5)
    assert [type(b.switch).__name__ for b in mlx.blocks] == ["SwitchGLU", "SwitchGLU"]  # swapped back


def test_capture_is_undone_after_an_error_and_refuses_distributions(checkpoints):
    model = open_model(checkpoints["mixtral"], "mlx")
    classes = [type(b.switch) for b in model.blocks]
    with pytest.raises(RuntimeError, match="boom"), routing_capture(model):
        raise RuntimeError("boom")
    assert [type(b.switch) for b in model.blocks] == classes and model.recorders == []
    with pytest.raises(MoescopeError, match="not the full router distribution"), routing_capture(
            model, distributions=True):
        pass


def test_bfloat16_choices_differ_about_as_much_as_bfloat16_itself(checkpoints):
    """In bf16 torch and mlx round differently; the share of tokens whose experts differ stays small (the
    measured shares are in docs/mlx.md; a capture that mixed up tokens would differ almost everywhere)."""
    ids = torch.randint(3, 128, (6, 24), generator=torch.Generator().manual_seed(1))
    differ = total = 0
    for family in ("qwen3_moe", "olmoe"):
        hf, mlx = (open_model(checkpoints[family], backend, dtype="bfloat16") for backend in ("hf", "mlx"))
        with capture_routing(hf) as t, routing_capture(mlx) as m:
            hf(input_ids=ids)
            mlx(input_ids=ids)
        for a, b in zip(t.events, m.events):
            moved = (a.expert_ids.sort(-1).values != b.expert_ids.sort(-1).values).any(-1)
            differ, total = differ + int(moved.sum()), total + len(moved)
    assert total == 2 * 2 * 6 * 24 and differ / total < 0.1


def test_greedy_generation_matches_transformers(checkpoints):
    ids, mask = padded_batch(2)
    hf, mlx = (open_model(checkpoints["olmoe"], backend, dtype="float32") for backend in ("hf", "mlx"))
    expected = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                           eos_token_id=[2])
    got = mlx.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, pad_token_id=0, eos_token_id=[2])
    assert torch.equal(got, expected)


def test_evaluate_gate_and_accuracy_take_mlx_on_either_side(checkpoints, tmp_path, capsys):
    source = checkpoints["qwen3_moe"]
    write_calibration(tmp_path / "data.jsonl", 30)
    protocol = ["--data", str(tmp_path / "data.jsonl"), "--seq-len", "8", "--dtype", "float32", "--json"]
    reports = {}
    for backends in (("hf", "hf"), ("mlx", "hf"), ("hf", "mlx")):
        assert main(["evaluate", str(source), "--baseline", str(source), "--backend", backends[0],
                     "--baseline-backend", backends[1], *protocol]) == 0
        reports[backends] = json.loads(capsys.readouterr().out)
    for backends, report in reports.items():
        assert report["protocol"]["backend"] == backends[0]
        assert report["perplexity_geomean"] == pytest.approx(reports[("hf", "hf")]["perplexity_geomean"], rel=1e-5)
        assert all(v == 0 for v in report["routing_drift"].values())
        assert all(abs(g["kl"]) < 1e-6 and g["top1_agreement"] == 1 for g in report["groups"].values())
    probes = tmp_path / "probes.jsonl"
    probes.write_text("".join(json.dumps({"id": f"q{i}", "domain": "prose", "lang": "en",
                                          "text": "the cat sat on a mat " * (i + 1)}) + "\n" for i in range(4)))
    assert main(["gate", str(source), str(source), "--backend", "mlx", "--probes", str(probes), "--out",
                 str(tmp_path / "gate.html"), "--max-new-tokens", "6", "--dtype", "float32", "--json",
                 str(tmp_path / "gate.json")]) == 0
    gate = json.loads((tmp_path / "gate.json").read_text())
    assert gate["verdict"] == "pass" and all(p["candidate"] == p["baseline"] for p in gate["prompts"])
    write_items(tmp_path / "items.jsonl", 12)
    for backend in ("hf", "mlx"):
        assert main(["accuracy", str(source), "--backend", backend, "--dtype", "float32", "--items",
                     str(tmp_path / "items.jsonl"), "--out", str(tmp_path / f"{backend}.json")]) == 0
    assert json.loads((tmp_path / "mlx.json").read_text()) == json.loads((tmp_path / "hf.json").read_text())
