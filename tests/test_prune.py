"""Pruning methods on real tiny checkpoints: remove == run-time mask, replay proves it, -1e9 does not."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from helpers import tokenizer, write_calibration
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import moescope.commands.prune
from moescope.backends.hf.capture import capture_routing
from moescope.backends.hf.loading import load_model, model_identity
from moescope.calibration import CALIBRATION, DEMO_MODEL
from moescope.checkpoints import read_metadata
from moescope.cli import main
from moescope.compress.prune import (
    REMOVE_TOLERANCE,
    PruneCheck,
    ReplayResult,
    check_pruned,
    offsets_for,
    prune_checkpoint,
    replay,
    replay_batches,
    routing_offsets,
)
from moescope.errors import MoescopeError
from moescope.models.registry import find_moe_layers
from moescope.models.tiny import tiny_model
from moescope.plans import PrunePlan

FAMILIES = {  # model type -> tiny overrides; covers four router families and both on-disk layouts
    "qwen3_moe": {},
    "olmoe": {},  # norm_topk_prob=False
    "mixtral": {},  # per-expert keys under block_sparse_moe on disk
    "deepseek_v3": {"n_group": 1, "topk_group": 1},  # sigmoid + correction bias
    "gpt_oss": {},  # fused experts on disk, router logit bias
}


def make_checkpoint(tmp_path, model_type, **overrides):
    model = tiny_model(model_type, **{**FAMILIES.get(model_type, {}), **overrides})
    source = tmp_path / "source"
    model.save_pretrained(source)
    return model, source


def make_plan(model, per_layer: int = 2, token_batches=None) -> PrunePlan:
    """Prune the experts chosen most often on `token_batches` (default `batches()`), so the plan is sure to
    change the output."""
    layers = find_moe_layers(model)
    counts = {layer.index: torch.zeros(layer.num_experts) for layer in layers}
    with capture_routing(model) as rec, torch.no_grad():
        for ids, mask in token_batches or batches():
            model(input_ids=ids, attention_mask=mask)
    for event in rec.events:
        counts[event.layer] += torch.bincount(event.expert_ids.flatten(), minlength=len(counts[event.layer]))
    prune = {layer: sorted(count.topk(per_layer).indices.tolist()) for layer, count in counts.items()}
    return PrunePlan(model={"model_type": model.config.model_type}, top_k=layers[0].top_k,
                     num_experts={layer.index: layer.num_experts for layer in layers}, prune=prune)


def batches(seed: int = 0, count: int = 2):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randint(1, 100, (3, 12), generator=gen), torch.ones(3, 12, dtype=torch.long))
            for _ in range(count)]


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_remove_loads_with_stock_transformers_and_equals_the_runtime_mask(model_type, tmp_path):
    model, source = make_checkpoint(tmp_path, model_type)
    plan = make_plan(model)
    out = prune_checkpoint(source, tmp_path / "removed", plan, "remove")
    removed = AutoModelForCausalLM.from_pretrained(out).eval()
    assert {layer.num_experts for layer in find_moe_layers(removed)} == {6}
    ids = batches()[0][0]
    with routing_offsets(model, offsets_for(plan)):
        masked = logits(model, ids)
        assert replay(model, batches(), plan.prune).pruned_total == 0
    torch.testing.assert_close(logits(removed, ids), masked, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(logits(model, ids), masked)  # the plan changed something
    assert read_metadata(out)["plan"] == plan.to_json()
    assert json.loads((source / "config.json").read_text()) != json.loads((out / "config.json").read_text())


def test_removal_without_renormalisation_changes_weights_exactly_like_a_mask(tmp_path):
    """olmoe has norm_topk_prob=False: kept experts' weights grow after removal, identically to a -inf mask."""
    model, source = make_checkpoint(tmp_path, "olmoe")
    plan = make_plan(model, per_layer=3)
    removed = AutoModelForCausalLM.from_pretrained(prune_checkpoint(source, tmp_path / "out", plan, "remove")).eval()
    ids = batches()[0][0]
    with capture_routing(model) as original, torch.no_grad():
        model(input_ids=ids)
    with routing_offsets(model, offsets_for(plan)), capture_routing(model) as masked, torch.no_grad():
        model(input_ids=ids)
    with capture_routing(removed) as after, torch.no_grad():
        removed(input_ids=ids)
    for layer, base, mask_event, removed_event in zip(find_moe_layers(model), original.events, masked.events,
                                                      after.events):
        kept = torch.tensor(plan.kept(layer.index))
        torch.testing.assert_close(kept[removed_event.expert_ids], mask_event.expert_ids)
        torch.testing.assert_close(removed_event.weights, mask_event.weights, atol=1e-6, rtol=1e-5)
        unchanged_choice = (base.expert_ids == mask_event.expert_ids).all(-1)
        assert unchanged_choice.any()
        grew = mask_event.weights[unchanged_choice] - base.weights[unchanged_choice]
        assert (grew >= -1e-7).all() and (grew > 1e-6).any()


@pytest.mark.parametrize("model_type", ["gpt_oss", "deepseek_v3"])
def test_mask_is_written_as_a_router_bias_where_there_is_one(model_type, tmp_path):
    model, source = make_checkpoint(tmp_path, model_type)
    plan = make_plan(model)
    masked = AutoModelForCausalLM.from_pretrained(prune_checkpoint(source, tmp_path / "out", plan, "mask")).eval()
    assert replay(masked, batches(), plan.prune).pruned_total == 0
    ids = batches()[0][0]
    with routing_offsets(model, offsets_for(plan)):
        expected = logits(model, ids)
    torch.testing.assert_close(logits(masked, ids), expected, atol=1e-5, rtol=1e-4)


def test_mask_without_a_router_bias_is_refused_with_alternatives(tmp_path):
    model, source = make_checkpoint(tmp_path, "qwen3_moe")
    with pytest.raises(MoescopeError, match="no router bias. Use --method remove"):
        prune_checkpoint(source, tmp_path / "out", make_plan(model), "mask")
    assert not (tmp_path / "out").exists()


def test_row_1e9_does_not_prune_and_zero_keeps_the_slot(tmp_path):
    model, source = make_checkpoint(tmp_path, "qwen3_moe")
    plan = make_plan(model)
    row = AutoModelForCausalLM.from_pretrained(prune_checkpoint(source, tmp_path / "row", plan, "row-1e9")).eval()
    result = replay(row, batches(count=3), plan.prune)
    assert result.pruned_total > 0  # the seeds' flaw: the "pruned" experts are still chosen
    zero = AutoModelForCausalLM.from_pretrained(prune_checkpoint(source, tmp_path / "zero", plan, "zero")).eval()
    first = find_moe_layers(model)[0].index  # later layers see changed inputs, so compare the first one
    still_chosen = replay(zero, batches(), plan.prune).pruned_selections[first]
    assert still_chosen == replay(model, batches(), plan.prune).pruned_selections[first] > 0
    for layer in find_moe_layers(zero):
        assert not layer.experts.gate_up_proj[plan.prune[layer.index]].any()


def test_soft_lowers_the_logit_and_reduces_selections(tmp_path):
    model, source = make_checkpoint(tmp_path, "gpt_oss")
    plan = make_plan(model)
    soft = AutoModelForCausalLM.from_pretrained(
        prune_checkpoint(source, tmp_path / "soft", plan, "soft", offset=0.05)).eval()
    before = replay(model, batches(count=3), plan.prune).pruned_total
    after = replay(soft, batches(count=3), plan.prune).pruned_total
    with routing_offsets(model, offsets_for(plan, -0.05)):
        runtime = replay(model, batches(count=3), plan.prune).pruned_total
    assert 0 < after < before and after == runtime


def test_untouched_tensors_are_bit_exact_in_bf16(tmp_path):
    model = tiny_model("qwen3_moe").to(torch.bfloat16)
    source = tmp_path / "source"
    model.save_pretrained(source)
    out = prune_checkpoint(source, tmp_path / "out", make_plan(model), "zero")
    with safe_open(str(source / "model.safetensors"), "pt") as a, safe_open(str(out / "model.safetensors"), "pt") as b:
        untouched = [name for name in a.keys() if ".experts." not in name]
        assert untouched and all(b.get_tensor(n).dtype == torch.bfloat16 for n in untouched)
        assert all(torch.equal(a.get_tensor(n).view(torch.int16), b.get_tensor(n).view(torch.int16))
                   for n in untouched)


def test_bad_plans_and_outputs(tmp_path):
    model, source = make_checkpoint(tmp_path, "qwen3_moe")
    layers = find_moe_layers(model)
    counts = {layer.index: layer.num_experts for layer in layers}
    identity = model_identity(model)
    plan = make_plan(model, per_layer=7)
    with pytest.raises(MoescopeError, match="fewer than top-k = 2"):
        plan.check(identity, counts, 2)
    recorded = make_plan(model)
    recorded.model = identity
    recorded.check(identity, counts, 2)
    with pytest.raises(MoescopeError, match="plan is for another model: model_type qwen3_moe vs mixtral"):
        recorded.check(replace(identity, model_type="mixtral"), counts, 2)
    with pytest.raises(MoescopeError, match="plan is for another model: config_hash"):  # same type and shape
        recorded.check(replace(identity, config_hash="0" * 16), counts, 2)
    with pytest.raises(MoescopeError, match="says top-k 2, the model routes to 4"):
        recorded.check(identity, counts, 4)
    other = make_plan(tiny_model("qwen3_moe", num_experts=16))
    with pytest.raises(MoescopeError, match="plan is for another model"):
        other.check(identity, counts, 2)
    uneven = make_plan(model)
    uneven.prune[layers[0].index] = [0]
    with pytest.raises(MoescopeError, match="same number of experts kept in every MoE layer"):
        prune_checkpoint(source, tmp_path / "out", uneven, "remove")
    (tmp_path / "exists").mkdir()
    with pytest.raises(MoescopeError, match="already exists"):
        prune_checkpoint(source, tmp_path / "exists", make_plan(model), "remove")


def test_a_full_disk_leaves_nothing_under_the_final_name(tmp_path, monkeypatch):
    import moescope.compress.checkpoint

    model, source = make_checkpoint(tmp_path, "qwen3_moe")

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(moescope.compress.checkpoint, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        prune_checkpoint(source, tmp_path / "out", make_plan(model), "remove")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source"]


def test_plan_round_trip_and_errors(tmp_path):
    plan = make_plan(tiny_model("qwen3_moe"))
    plan.save(tmp_path / "plan.json")
    assert PrunePlan.load(tmp_path / "plan.json") == plan
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(MoescopeError, match="invalid JSON"):
        PrunePlan.load(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text('{"kind": "bit_plan"}')
    with pytest.raises(MoescopeError, match="not a moescope prune plan"):
        PrunePlan.load(tmp_path / "other.json")


@pytest.mark.parametrize("model_type, dtype", [("qwen3_moe", torch.float32), ("deepseek_v3", torch.float32),
                                               ("gpt_oss", torch.float32), ("qwen3_moe", torch.bfloat16)])
def test_removal_routes_exactly_like_the_masked_original(model_type, dtype, tmp_path):
    """Also in bf16, where the sliced router's own rounding would flip near ties: routers are compared in
    float32 on the same inputs."""
    model, source = tiny_model(model_type, **FAMILIES[model_type]).to(dtype), tmp_path / "source"
    model.save_pretrained(source)
    plan = make_plan(model)
    removed = AutoModelForCausalLM.from_pretrained(prune_checkpoint(source, tmp_path / "out", plan, "remove"),
                                                   dtype=dtype).eval()
    check = check_pruned(model, removed, batches(), plan, "remove")
    assert check.exact and set(check.remove_vs_mask) == set(plan.prune)
    assert max(check.remove_vs_mask.values()) <= REMOVE_TOLERANCE and check.failure() is None
    assert check.before.pruned_total > 0  # the plan's experts were in use, so removing them mattered
    assert check.after.pruned_selections == {}  # new ids are not the plan's ids: nothing to count after removal


@pytest.mark.skipif(not (DEMO_MODEL / "model.safetensors").is_file(), reason="demo model not built")
def test_removal_of_a_trained_bf16_model_passes_the_replay(tmp_path):
    """A trained model in bf16: the removed router's own rounding flips about 1 % of near ties when the
    routers run in bf16, so the check runs them in float32, where removal and mask agree exactly."""
    model = load_model(DEMO_MODEL, dtype="bfloat16")
    batches = replay_batches(DEMO_MODEL, str(CALIBRATION), 16, 128)
    plan = make_plan(model, per_layer=4, token_batches=batches)
    removed = load_model(prune_checkpoint(DEMO_MODEL, tmp_path / "out", plan, "remove"), dtype="bfloat16")
    check = check_pruned(model, removed, batches, plan, "remove")
    assert check.exact and check.failure() is None and max(check.remove_vs_mask.values()) == 0


def test_which_replays_fail_and_where():
    """The verdict of a replay on its own figures: a mask with any selection left fails; a removal fails
    on its worst layer above the tolerance (up to it is float rounding), and only where the router family
    makes removal equal to a mask."""
    clean, leaky = ReplayResult(100, {0: 200}, {0: 0}), ReplayResult(100, {0: 200}, {0: 3})
    assert PruneCheck("mask", clean, clean, None, False).failure() is None
    assert PruneCheck("mask", clean, leaky, None, False).failure() == "replay found 3 selections of masked experts"
    assert PruneCheck("zero", clean, leaky, None, False).failure() is None
    assert PruneCheck("remove", clean, leaky, {0: REMOVE_TOLERANCE, 1: 0.0}, True).failure() is None
    failed = PruneCheck("remove", clean, clean, {0: 0.0, 1: 0.5, 2: 2 * REMOVE_TOLERANCE}, True).failure()
    assert failed.startswith("after removal, the router of layer 1 sends 50.00% of tokens")
    assert PruneCheck("remove", clean, clean, {0: 0.0, 1: 0.5}, False).failure() is None


def test_wrongly_sliced_removal_fails_the_replay(tmp_path):
    """A checkpoint whose router rows and experts belong to another plan: every id still exists, only the
    comparison with the masked original can tell."""
    model, source = make_checkpoint(tmp_path, "qwen3_moe")
    plan = make_plan(model)
    other = replace(plan, prune={layer: [e for e in range(8) if e not in experts][:2]
                                 for layer, experts in plan.prune.items()})
    removed = AutoModelForCausalLM.from_pretrained(prune_checkpoint(source, tmp_path / "out", other, "remove")).eval()
    check = check_pruned(model, removed, batches(), plan, "remove")
    assert max(check.remove_vs_mask.values()) > 0.2
    assert "to other experts than the original router with the same experts masked" in check.failure()


def test_group_limited_removal_is_shown_not_enforced(tmp_path):
    model, source = make_checkpoint(tmp_path, "deepseek_v3", n_group=2, topk_group=1)
    plan = make_plan(model)
    removed = AutoModelForCausalLM.from_pretrained(prune_checkpoint(source, tmp_path / "out", plan, "remove")).eval()
    check = check_pruned(model, removed, batches(), plan, "remove")
    assert not check.exact and check.failure() is None
    assert set(check.remove_vs_mask) == set(plan.prune)


def test_a_mask_that_does_not_mask_fails_the_replay(tmp_path):
    model, source = make_checkpoint(tmp_path, "qwen3_moe")
    plan = make_plan(model)
    row = AutoModelForCausalLM.from_pretrained(prune_checkpoint(source, tmp_path / "row", plan, "row-1e9")).eval()
    check = check_pruned(model, row, batches(count=3), plan, "mask")
    assert check.after.pruned_total > 0 and check.remove_vs_mask is None and not check.exact
    assert check.failure() == f"replay found {check.after.pruned_total} selections of masked experts"
    assert check_pruned(model, row, batches(count=3), plan, "row-1e9").failure() is None  # it never claimed to mask


@pytest.mark.parametrize("method", ["mask", "remove"])
def test_cli_stops_when_the_replay_contradicts_the_method(method, tmp_path, monkeypatch, capsys):
    """The command's guard, with a checkpoint writer that writes the wrong thing (the seeds' -1e9 rows for
    a mask; another plan's experts for a removal): exit status 2 and the reason."""
    model, source = make_checkpoint(tmp_path, "gpt_oss")
    tokenizer().save_pretrained(source)
    write_calibration(tmp_path / "cal.jsonl", 12)
    plan = make_plan(model)
    plan.model = model_identity(model)
    plan.save(tmp_path / "plan.json")
    write = moescope.commands.prune.prune_checkpoint

    def faulty(src, out, plan, method, *args, **kwargs):
        if method == "mask":
            return write(src, out, plan, "row-1e9", *args, **kwargs)
        kept = {layer: [e for e in range(8) if e not in experts][:2] for layer, experts in plan.prune.items()}
        return write(src, out, replace(plan, prune=kept), method, *args, **kwargs)

    monkeypatch.setattr(moescope.commands.prune, "prune_checkpoint", faulty)
    args = ["prune", str(source), "--plan", str(tmp_path / "plan.json"), "--method", method,
            "--out", str(tmp_path / "out"), "--calibration", str(tmp_path / "cal.jsonl"), "--replay-prompts", "12"]
    assert main(args) == 2
    assert "please report this" in capsys.readouterr().err
