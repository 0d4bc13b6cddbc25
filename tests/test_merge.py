"""Merging experts on real tiny checkpoints: folding identical experts gives back the model they were
copied from, alignment undoes a neuron permutation, merged checkpoints load with stock transformers,
and the grouping, assignment and plan pieces do what they say."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from moescope.analysis.merging import average_linkage, leader_groups, linear_assignment, make_merge_plan, ordered_groups
from moescope.checkpoints import read_metadata
from moescope.compress.merge import expert_similarity, fit_routers, merge_checkpoint
from moescope.compress.routing import agreement, capture_router_io, expert_targets
from moescope.errors import MoescopeError
from moescope.models.registry import find_moe_layers
from moescope.models.tiny import tiny_model
from moescope.plans import MergePlan, PrunePlan, load_plan

DUPLICATED = 3  # the expert copied into a ninth expert


def batch(seed: int = 1, rows: int = 8, width: int = 16):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, 100, (rows, width), generator=gen), torch.ones(rows, width, dtype=torch.long)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def with_a_copy(model_type: str, permute: bool = False, **overrides):
    """(M, O): a tiny model M with 8 experts and O, the same model with a ninth expert copying expert 3
    (its neurons permuted when `permute`; the same function either way). Where the router has a logit
    bias, both copies get log 2 less, so that together they hold the mass expert 3 held in M."""
    original = tiny_model(model_type, **overrides)
    key = "num_experts" if model_type == "qwen3_moe" else "num_local_experts"
    copied = tiny_model(model_type, **{key: 9, **overrides})
    state = original.state_dict()
    for name, tensor in copied.state_dict().items():
        source = state[name]
        if tensor.shape == source.shape:
            tensor.copy_(source)
            continue
        tensor[:8] = source
        tensor[8] = source[DUPLICATED]
    for layer in find_moe_layers(copied):
        if permute:
            perm = torch.randperm(layer.experts.down_proj.shape[-1], generator=torch.Generator().manual_seed(7))
            width = layer.experts.down_proj.shape[-1]
            gate_up = layer.experts.gate_up_proj.data[8]
            gate_up[:width], gate_up[width:] = gate_up[:width][perm].clone(), gate_up[width:][perm].clone()
            layer.experts.down_proj.data[8] = layer.experts.down_proj.data[8][:, perm].clone()
        bias = getattr(layer.router, "bias", None)
        if bias is not None:
            bias.data[[DUPLICATED, 8]] -= math.log(2)
    return original, copied.eval()


def copy_plan(model) -> MergePlan:
    """Fold the copy (expert 8) back into expert 3; every other expert stays alone."""
    layers = find_moe_layers(model)
    groups = [[e] for e in range(8)]
    groups[DUPLICATED] = [DUPLICATED, 8]
    weights = [[1.0] for _ in range(8)]
    weights[DUPLICATED] = [0.5, 0.5]
    return MergePlan(model={"model_type": model.config.model_type}, num_experts={x.index: 9 for x in layers},
                     top_k=layers[0].top_k, groups={x.index: groups for x in layers},
                     weights={x.index: weights for x in layers})


def merge(model, plan, source, out, rule="fit", align=True):
    routers = fit_routers(model, capture_router_io(model, batch()), plan) if rule == "fit" else None
    return merge_checkpoint(source, out, plan, routers, rule, align=align)


def test_merging_two_identical_experts_gives_back_the_original_outputs(tmp_path):
    """gpt-oss: fused experts on disk and a router logit bias, so the group's log-sum-exp (the copies'
    logits are each log 2 below expert 3's) is a row and a bias that least squares recovers exactly."""
    original, copied = with_a_copy("gpt_oss")
    copied.save_pretrained(tmp_path / "copied")
    ids = batch(seed=5)[0]
    assert not torch.allclose(logits(copied, ids), logits(original, ids), atol=1e-3)  # the copy changed routing
    out = merge(copied, copy_plan(copied), tmp_path / "copied", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert [layer.num_experts for layer in find_moe_layers(merged)] == [8, 8]
    torch.testing.assert_close(logits(merged, ids), logits(original, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("permute", [False, True])
def test_per_expert_checkpoints_merge_identical_experts_exactly_and_align_permuted_neurons(tmp_path, permute):
    """qwen3_moe keeps one tensor per expert on disk and has no router bias: with mean rows, folding a copy
    of expert 3 (identical row) gives back M exactly, even when the copy's neurons are permuted, because
    alignment undoes the permutation; without alignment the permuted copy spoils the average."""
    original, copied = with_a_copy("qwen3_moe", permute=permute)
    copied.save_pretrained(tmp_path / "copied")
    plan = copy_plan(copied)
    out = merge(copied, plan, tmp_path / "copied", tmp_path / "merged", rule="mean")
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = batch(seed=5)[0]
    torch.testing.assert_close(logits(merged, ids), logits(original, ids), atol=1e-5, rtol=1e-5)
    assert read_metadata(out)["aligned_layers"] == [0, 1]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "model.layers.0.mlp.experts.7.down_proj.weight" in names
    assert not any(".experts.8." in name for name in names)
    if permute:
        unaligned = merge(copied, plan, tmp_path / "copied", tmp_path / "unaligned", rule="mean", align=False)
        spoiled = AutoModelForCausalLM.from_pretrained(unaligned).eval()
        assert not torch.allclose(logits(spoiled, ids), logits(original, ids), atol=1e-3)


def test_a_real_grouping_loads_with_stock_transformers_and_keeps_its_word(tmp_path):
    """mixtral (per-expert keys under block_sparse_moe on disk): a grouping from measured similarity."""
    model = tiny_model("mixtral")
    model.save_pretrained(tmp_path / "source")
    captured = capture_router_io(model, batch())
    similarity = expert_similarity(model, captured)
    groups = {layer: average_linkage(s, 5) for layer, s in similarity.items()}
    usage = np.arange(8, 0, -1, dtype=float)
    ordered = {layer: ordered_groups(g, usage) for layer, g in groups.items()}
    plan = MergePlan(model={"model_type": "mixtral"}, num_experts={0: 8, 1: 8}, top_k=2,
                     groups={k: v[0] for k, v in ordered.items()}, weights={k: v[1] for k, v in ordered.items()})
    out = merge(model, plan, tmp_path / "source", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert [layer.num_experts for layer in find_moe_layers(merged)] == [5, 5]
    assert json.loads((out / "config.json").read_text())["num_local_experts"] == 5
    meta = read_metadata(out)
    assert MergePlan.from_json(meta["plan"]) == plan and set(meta["router_fit"]["0"]) == {"fit", "mean"}
    # A group's expert is the usage-weighted average of its (aligned) members: check a singleton exactly.
    layer = find_moe_layers(merged)[0]
    alone = next(i for i, g in enumerate(plan.groups[0]) if len(g) == 1)
    torch.testing.assert_close(layer.experts.down_proj[alone],
                               find_moe_layers(model)[0].experts.down_proj[plan.groups[0][alone][0]])
    with pytest.raises(MoescopeError, match="already exists"):
        merge(model, plan, tmp_path / "source", tmp_path / "merged")


def test_sigmoid_routers_refuse_folding_several_experts_into_one(tmp_path):
    model = tiny_model("deepseek_v3", n_group=1, topk_group=1)
    layer = find_moe_layers(model)[0]
    with pytest.raises(MoescopeError, match="own sigmoid: folding several experts"):
        layer.family.mapped_logits(torch.zeros(3, 8), torch.tensor([0, 0, 1, 2, 3, 4, 5, 6]), 7)
    kept = layer.family.mapped_logits(torch.arange(8.0).expand(2, 8), torch.tensor([-1, 0, 1, 2, 3, 4, 5, 6]), 7)
    assert torch.equal(kept, torch.arange(1.0, 8).expand(2, 7))


def test_softmax_mass_of_a_group_is_its_log_sum_exp():
    model = tiny_model("qwen3_moe")
    family = find_moe_layers(model)[0].family
    z = torch.randn(5, 8)
    targets = torch.tensor([0, 0, 1, -1, 2, 2, 2, 3])
    mapped = family.mapped_logits(z, targets, 5)
    probs = z.softmax(-1)
    expected = torch.stack([probs[:, [0, 1]].sum(1), probs[:, 2], probs[:, 4:7].sum(1), probs[:, 7]], 1)
    torch.testing.assert_close(mapped[:, :4].softmax(-1), expected / expected.sum(1, keepdim=True))
    assert torch.isinf(mapped[:, 4]).all()  # no original expert maps to new expert 4
    assert float(family.routing_divergence(mapped, mapped)) == pytest.approx(0, abs=1e-6)
    assert float(family.routing_divergence(torch.zeros(5, 5), mapped)) > 0


def test_linear_assignment_is_optimal():
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 6):
        for _ in range(5):
            cost = rng.normal(size=(n, n))
            best = min(sum(cost[i, p[i]] for i in range(n)) for p in itertools.permutations(range(n)))
            perm = linear_assignment(cost)
            assert sorted(perm) == list(range(n)) and cost[np.arange(n), perm].sum() == pytest.approx(best)


def test_groupings():
    similarity = np.eye(6)
    similarity[0, 1] = similarity[1, 0] = 0.9
    similarity[2, 3] = similarity[3, 2] = 0.8
    similarity[3, 4] = similarity[4, 3] = 0.7
    similarity[2, 4] = similarity[4, 2] = 0.6
    assert sorted(map(sorted, average_linkage(similarity, 4))) == [[0, 1], [2, 3], [4], [5]]
    assert sorted(map(sorted, average_linkage(similarity, 3))) == [[0, 1], [2, 3, 4], [5]]
    usage = np.array([1.0, 5, 2, 0, 9, 3])
    assert sorted(map(sorted, leader_groups(similarity, usage, 3))) == [[0, 1], [2, 3, 4], [5]]
    groups, weights = ordered_groups([[4, 2, 3], [0, 1], [5]], usage)
    assert groups == [[1, 0], [4, 2, 3], [5]]
    assert weights[0] == pytest.approx([5 / 6, 1 / 6]) and weights[1] == pytest.approx([9 / 11, 2 / 11, 0])
    assert ordered_groups([[0, 3]], np.zeros(6))[1] == [[0.5, 0.5]]  # no usage: a plain average


def test_agreement_counts_each_mapped_choice_once():
    targets = torch.tensor([0, 0, 1, -1, 2])
    original = torch.tensor([[0, 1], [2, 4], [3, 3], [0, 4]])
    candidate = torch.tensor([[0, 1], [1, 0], [0, 1], [1, 2]])
    # row 0: experts 0 and 1 both became 0, found; row 1: {1, 2}, half found; row 2: removed only, skipped;
    # row 3: {0, 2}, half found
    assert agreement(original, candidate, targets) == pytest.approx((1 + 0.5 + 0.5) / 3)
    prune = PrunePlan(model={}, num_experts={0: 5}, top_k=2, prune={0: [1, 3]})
    assert expert_targets(prune, "remove")[0].tolist() == [0, -1, 1, -1, 2]
    assert expert_targets(prune, "zero")[0].tolist() == [0, -1, 2, -1, 4]


def test_merge_plans_round_trip_validate_and_load_beside_prune_plans(tmp_path):
    plan = copy_plan(tiny_model("qwen3_moe", num_experts=9))
    plan.save(tmp_path / "merge.json")
    assert load_plan(tmp_path / "merge.json") == plan == MergePlan.load(tmp_path / "merge.json")
    prune = PrunePlan(model={"model_type": "qwen3_moe"}, num_experts={0: 8}, top_k=2, prune={0: [1]})
    prune.save(tmp_path / "prune.json")
    assert load_plan(tmp_path / "prune.json") == prune
    data = plan.to_json()
    data["layers"][0]["groups"][0] = [0, 8]  # expert 8 now sits in two groups
    with pytest.raises(MoescopeError, match="exactly once"):
        MergePlan.from_json(data)
    data = plan.to_json()
    data["layers"][0]["weights"][DUPLICATED] = [0.5, 0.6]
    with pytest.raises(MoescopeError, match="summing to 1"):
        MergePlan.from_json(data)
    with pytest.raises(MoescopeError, match="not a moescope merge plan"):
        MergePlan.from_json(prune.to_json())


def test_a_ratio_that_leaves_fewer_experts_than_top_k_is_refused(tmp_path):
    from helpers import tokenizer, write_calibration

    from moescope.profiling.run import ProfileOptions, profile_model

    model = tiny_model("qwen3_moe")
    profile = profile_model(model, tokenizer(), write_calibration(tmp_path / "cal.jsonl"), tmp_path / "profile",
                            ProfileOptions(progress=False))
    similarity = expert_similarity(model, capture_router_io(model, batch()))
    plan = make_merge_plan(profile, similarity, "m-smoe", 0.75)
    assert {plan.merged_count(layer) for layer in plan.num_experts} == {2}
    with pytest.raises(MoescopeError, match="down to 1 experts, fewer than top-k = 2"):
        make_merge_plan(profile, similarity, "hc-smoe", 0.9)
    plan.groups[0] = [sum(plan.groups[0], [])]
    plan.weights[0] = [[1 / 8] * 8]
    with pytest.raises(MoescopeError, match="leaves layer 0 with 1 experts, fewer than top-k = 2"):
        plan.check(plan.model, plan.num_experts, 2)


def test_evaluate_maps_the_baselines_experts_onto_merged_ones_for_drift(tmp_path):
    from helpers import WORDS, save_with_tokenizer, tokenizer

    from moescope.judge.evaluate import Protocol, baseline_id_map, compare_models, load_windows

    original, copied = with_a_copy("qwen3_moe")
    save_with_tokenizer(copied, tmp_path / "copied")
    out = merge(copied, copy_plan(copied), tmp_path / "copied", tmp_path / "merged", rule="mean")
    mapping = baseline_id_map(out)
    assert mapping[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 3]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"id": i, "domain": "prose", "lang": "en",
                                        "text": " ".join(WORDS[(i * 3 + j) % len(WORDS)] for j in range(48))}) + "\n"
                            for i in range(4)))
    windows = load_windows(data, tokenizer(), Protocol(seq_len=16, sequences=6))
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    mapped = compare_models(copied, merged, windows, baseline_map=mapping)["routing_drift"]
    # The merged model is the model the copy was made from: it routes as the copy's model did wherever
    # the copy and its twin were not both chosen (two slots then, one now: a moved token).
    against_source = compare_models(original, merged, windows)["routing_drift"]
    assert set(against_source.values()) == {0.0}
    assert all(0 < share < 1 for share in mapped.values())
    raw = compare_models(copied, merged, windows)["routing_drift"]
    assert all(mapped[layer] <= raw[layer] for layer in raw) and any(mapped[k] < raw[k] for k in raw)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_similarity_router_fit_and_repair_give_the_same_on_the_gpu(tmp_path):
    from moescope.compress.repair import repair_routers
    from moescope.compress.routing import routing_agreement

    _, copied = with_a_copy("qwen3_moe")
    copied.save_pretrained(tmp_path / "copied")
    plan = copy_plan(copied)
    on_cpu = capture_router_io(copied, batch())
    similarity_cpu, fitted_cpu = expert_similarity(copied, on_cpu), fit_routers(copied, on_cpu, plan)
    copied.to("cuda")  # in place: from here on the same model runs on the GPU
    on_gpu = capture_router_io(copied, batch())
    for layer, io in on_cpu.items():
        torch.testing.assert_close(on_gpu[layer].logits, io.logits, atol=1e-4, rtol=1e-4)
    for layer, similarity in expert_similarity(copied, on_gpu).items():
        np.testing.assert_allclose(similarity, similarity_cpu[layer], atol=1e-4)
    for layer, router in fit_routers(copied, on_gpu, plan).items():
        torch.testing.assert_close(router.weight, fitted_cpu[layer].weight, atol=1e-3, rtol=1e-3)
    out = merge_checkpoint(tmp_path / "copied", tmp_path / "merged", plan, fitted_cpu)
    merged = AutoModelForCausalLM.from_pretrained(out).eval().to("cuda")
    targets = expert_targets(plan, "merge")
    before = {name: p.detach().clone() for name, p in merged.named_parameters()}
    fitted = repair_routers(merged, on_cpu, batch(), targets, steps=30)
    assert all(f["divergence_after"] <= f["divergence_before"] for f in fitted.values())
    assert any(f["divergence_after"] < f["divergence_before"] for f in fitted.values())
    for name, p in merged.named_parameters():
        assert torch.equal(p, before[name]) or name.endswith("mlp.gate.weight"), name
    report = routing_agreement(merged, on_cpu, capture_router_io(merged, batch()), targets)
    assert all(0 <= r["agreement"] <= 1 for r in report.values())
