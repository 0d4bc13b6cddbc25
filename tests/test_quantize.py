"""Per-expert fake quantisation, bit plans, allocation under a budget and the packed-size estimate."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from moescope.compress.quant.allocation import allocate_bits, budget_plan
from moescope.compress.quant.apply import apply_bit_plan, check_plan_file, expert_params, uniform_plan
from moescope.compress.quant.distortion import fisher_distortion, output_distortion, weight_distortion
from moescope.compress.quant.kernels import fake_quantize
from moescope.compress.quant.memory import memory_estimate
from moescope.errors import MoescopeError
from moescope.models.layout import expert_matrices
from moescope.models.registry import find_moe_layers
from moescope.plans import BitPlan, QuantOptions, save_bit_plan

FAMILIES = ["qwen3_moe", "gpt_oss", "mixtral"]


def group_scales(w: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> torch.Tensor:
    """The scale of the group each weight of `w` [rows, n] belongs to, computed independently."""
    scales = torch.empty_like(w)
    for start in range(0, w.shape[1], group_size):
        g = w[:, start : start + group_size]
        scale = g.abs().amax(1) / ((2**bits - 1) / 2) if symmetric else (g.amax(1) - g.amin(1)) / (2**bits - 1)
        scales[:, start : start + group_size] = scale[:, None]
    return scales


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [16, 24, 128])  # 24 does not divide 64: a short last group
def test_error_within_half_a_step_and_shrinking_with_bits(symmetric, group_size):
    w = torch.randn(3, 40, 64) * torch.rand(3, 40, 1)
    errors = []
    for bits in (2, 3, 4, 8):
        q = fake_quantize(w, bits, group_size, symmetric)
        assert q.shape == w.shape and q.dtype == w.dtype
        scales = group_scales(w.reshape(-1, 64), bits, group_size, symmetric).reshape(w.shape)
        assert ((q - w).abs() <= scales / 2 + 1e-6).all()
        for start in range(0, 64, group_size):  # at most 2^bits distinct levels per group
            group = q[0, 0, start : start + group_size]
            assert len(group.unique()) <= 2**bits
        errors.append((q - w).norm().item())
    assert errors == sorted(errors, reverse=True) and errors[-1] < errors[0] / 20
    assert fake_quantize(w, 16) is w


def group_errors(w: torch.Tensor, q: torch.Tensor, group_size: int) -> torch.Tensor:
    """Squared error of every group of `w` [rows, n] quantised as `q`."""
    return torch.stack([(q - w)[:, s : s + group_size].square().sum(1) for s in range(0, w.shape[1], group_size)])


@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_scales_never_lose_to_minmax_and_win_at_low_bits(symmetric):
    # Gaussian groups: their extremes are rare, so clipping them pays off at low widths
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(0))
    for bits in (2, 3, 4, 8):
        minmax = fake_quantize(w, bits, 32, symmetric)
        mse = fake_quantize(w, bits, 32, symmetric, scales="mse")
        assert mse.shape == w.shape and all(len(g.unique()) <= 2**bits for g in mse.reshape(-1, 32))
        assert (group_errors(w, mse, 32) <= group_errors(w, minmax, 32) + 1e-6).all()
        if bits <= 3:
            assert group_errors(w, mse, 32).sum() < {2: 0.7, 3: 0.93}[bits] * group_errors(w, minmax, 32).sum()
    # clipped: some weight moves further than minmax lets any weight move (half a step)
    worst = {scales: (fake_quantize(w, 2, 32, symmetric, scales) - w).abs().max() for scales in ("minmax", "mse")}
    assert worst["mse"] > worst["minmax"] * 1.2


def test_mse_scales_travel_with_the_plan(tiny):
    model = copy.deepcopy(tiny("qwen3_moe"))
    plan = uniform_plan(model, 2, QuantOptions(group_size=32, scales="mse"))
    again = BitPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again.scales == "mse" and again.options == QuantOptions(group_size=32, scales="mse")
    layer = find_moe_layers(model)[0]
    weight = expert_matrices(layer)[0]
    expected = fake_quantize(weight.view[3], 2, 32, True, "mse")
    apply_bit_plan(model, again)
    assert torch.equal(weight.view[3], expected)
    older = plan.to_dict()
    del older["scales"]  # plans written before scales existed
    assert BitPlan.from_dict(older).scales == "minmax"
    with pytest.raises(MoescopeError, match="scales must be one of minmax, mse, mlx"):
        BitPlan.from_dict({**older, "scales": "hqq"})
    with pytest.raises(MoescopeError, match="scales must be one of"):
        QuantOptions(scales="percentile")


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_mlx_scales_keep_the_larger_extreme_and_zero_exact(bits):
    """MLX's affine rule (checked bit for bit against mlx 0.32.4 on the demo model: docs/quantization.md):
    per group, the weight of largest magnitude comes back exactly, zero lies on the grid (up to float
    rounding, as in MLX), at most 2^b
    levels are used, and no weight moves by more than one of its group's steps."""
    torch.manual_seed(bits)
    w = torch.randn(64, 32) * torch.rand(64, 1) * 3
    w[::2] += 0.5  # groups that do not straddle zero symmetrically, or at all
    w[::3, 5] = 0.0
    q = fake_quantize(w, bits, 32, symmetric=False, scales="mlx")
    biggest = w.abs().argmax(1)
    assert torch.equal(q.gather(1, biggest[:, None]), w.gather(1, biggest[:, None]))
    assert (q[::3, 5].abs() <= 1e-6 * w[::3].abs().amax(1)).all()  # zero, up to float32 rounding
    assert all(len(g.unique()) <= 2**bits for g in q)
    step = (w.amax(1) - w.amin(1)) / (2**bits - 1)
    assert ((q - w).abs() <= step[:, None] * 1.0001).all()
    assert not torch.equal(q, fake_quantize(w, bits, 32, symmetric=False))  # not the minmax grid
    with pytest.raises(MoescopeError, match="needs asymmetric quantisation"):
        QuantOptions(scales="mlx")
    plan = {"format_version": 1, "kind": "bit_plan", "method": "uniform", "layers": {"0": [4]}, "scales": "mlx"}
    with pytest.raises(MoescopeError, match="bit plan: scales .mlx. .* needs asymmetric"):
        BitPlan.from_dict(plan)
    assert BitPlan.from_dict({**plan, "symmetric": False}).options.scales == "mlx"


def test_zero_and_constant_groups_are_exact():
    w = torch.zeros(2, 8)
    assert torch.equal(fake_quantize(w, 2, 4, symmetric=True), w)
    w[1] = 0.25  # asymmetric: a constant group is its own offset
    assert torch.equal(fake_quantize(w, 2, 4, symmetric=False), w)


def test_bf16_weights_stay_bf16():
    w = torch.randn(4, 64, dtype=torch.bfloat16)
    q = fake_quantize(w, 4, 32)
    assert q.dtype == torch.bfloat16 and (q.float() - w.float()).abs().max() < w.float().abs().max() / 7 + 0.01


@pytest.mark.parametrize("model_type", FAMILIES)
def test_uniform_plan_equals_quantising_every_expert(tiny, model_type):
    model = copy.deepcopy(tiny(model_type))
    expected = {}
    for layer in find_moe_layers(model):
        for weight in expert_matrices(layer):
            for e in range(layer.num_experts):
                w = weight.view[e].T if weight.transposed else weight.view[e]  # [out, in]
                q = fake_quantize(w, 4, 32, True)
                expected[layer.index, weight.name, e] = q.T if weight.transposed else q
    biases = {n: p.clone() for n, p in model.named_parameters() if n.endswith("bias")}
    apply_bit_plan(model, uniform_plan(model, 4, QuantOptions(group_size=32)))
    for layer in find_moe_layers(model):
        for weight in expert_matrices(layer):
            for e in range(layer.num_experts):
                assert torch.equal(weight.view[e], expected[layer.index, weight.name, e])
    assert all(torch.equal(p, biases[n]) for n, p in model.named_parameters() if n.endswith("bias"))


@pytest.mark.parametrize("model_type, down", [("qwen3_moe", "down_proj"), ("mixtral", "down_proj"),
                                               ("gpt_oss", "down_proj"), ("llama4_text", "down_proj"),
                                               ("dbrx", "mlp.w2")])
def test_layouts_put_groups_along_the_input_dimension(tiny, model_type, down):
    """The down projection maps the expert width I to the hidden size 64: (out, in) must be (64, I)."""
    layer = find_moe_layers(tiny(model_type))[0]
    weights = {w.name: w for w in expert_matrices(layer)}
    assert weights[down].shape == (64, weights[down].view[0].numel() // 64)
    assert weights[down].view[0].numel() // 64 in (32, 64) and not any(n.endswith("bias") for n in weights)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_only_planned_experts_change(tiny, model_type):
    original = tiny(model_type)
    model = copy.deepcopy(original)
    plan = uniform_plan(model, 16)
    first = min(plan.layers)
    plan.layers[first][1], plan.layers[first][5] = 3, 8
    apply_bit_plan(model, plan)
    changed = set()
    for before, after in zip(find_moe_layers(original), find_moe_layers(model), strict=True):
        for wb, wa in zip(expert_matrices(before), expert_matrices(after), strict=True):
            for e in range(before.num_experts):
                if not torch.equal(wb.view[e], wa.view[e]):
                    changed.add((before.index, e))
    assert changed == {(first, 1), (first, 5)}
    others = {n: p for n, p in original.named_parameters() if ".experts." not in n}
    assert all(torch.equal(p, others[n]) for n, p in model.named_parameters() if n in others)


def test_non_expert_bits_quantise_attention_but_not_routers_or_head(tiny):
    original = tiny("qwen2_moe")  # has a shared expert
    model = copy.deepcopy(original)
    plan = uniform_plan(model, 16, QuantOptions(non_expert_bits=4))
    apply_bit_plan(model, plan)
    before = dict(original.named_parameters())
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any("self_attn.q_proj" in n for n in changed) and any("shared_expert." in n for n in changed)
    assert not any(".experts." in n or n.endswith("mlp.gate.weight") or "lm_head" in n or "embed" in n
                   for n in changed)


def test_quantised_model_still_runs_close_to_the_original(tiny):
    original = tiny("qwen3_moe")
    model = apply_bit_plan(copy.deepcopy(original), uniform_plan(original, 8))
    tokens = torch.randint(3, 100, (2, 12))
    with torch.no_grad():
        a, b = original(tokens).logits, model(tokens).logits
    assert (a - b).abs().max() < 0.05 * a.abs().max()


def test_plan_round_trip_and_validation(tiny, tmp_path):
    model = tiny("qwen3_moe")
    plan = uniform_plan(model, 3, QuantOptions(group_size=64, symmetric=False))
    path = tmp_path / "bits.json"
    save_bit_plan(plan, path)
    data = json.loads(path.read_text())
    assert data["kind"] == "bit_plan" and data["format_version"] == 1 and data["layers"]["0"] == [3] * 8
    loaded = check_plan_file(path, model)
    assert loaded.to_dict() == plan.to_dict() and not list(tmp_path.glob("*.tmp"))

    def error(change, model=None) -> str:
        bad = plan.to_dict()
        change(bad)
        path.write_text(json.dumps(bad))
        with pytest.raises(MoescopeError) as info:
            check_plan_file(path, model)
        assert "\n" not in str(info.value)
        return str(info.value)

    assert "5 is not supported" in error(lambda d: d["layers"]["1"].__setitem__(2, 5))
    assert "prune" in error(lambda d: d["layers"]["1"].__setitem__(2, 0))
    assert "layers" in error(lambda d: d["layers"].pop("1"), model)
    assert "7 experts" in error(lambda d: d["layers"]["0"].pop(), model)
    assert "another model" in error(lambda d: d["model"].__setitem__("model_type", "mixtral"), model)
    assert "kind" in error(lambda d: d.pop("kind"))
    with pytest.raises(MoescopeError, match="another model"):
        apply_bit_plan(tiny("mixtral"), plan)


def test_memory_estimate_counts_codes_and_scales(tiny):
    model = tiny("qwen3_moe")
    layers = find_moe_layers(model)
    weights = sum(expert_params(model)) * layers[0].num_experts
    est16 = memory_estimate(model, uniform_plan(model, 16))
    assert est16.total_bytes == est16.bf16_bytes == 2 * sum(p.numel() for p in model.parameters())
    est4 = memory_estimate(model, uniform_plan(model, 4, QuantOptions(group_size=32)))
    rows = sum(w.shape[0] * (w.shape[1] // 32) for layer in layers for w in expert_matrices(layer))
    assert est4.expert_bytes == weights // 2 + rows * layers[0].num_experts * 2
    assert est4.expert_bits == 4 and est4.other_bytes == est16.other_bytes and "KB" in est4.format()


def random_problem(rng, layers=4, experts=16):
    bits = np.array([2, 3, 4, 8])
    importance = rng.gamma(0.5, size=(layers, experts))  # skewed, like real routing frequencies
    distortion = rng.uniform(0.5, 2, size=(layers, experts, 1)) * 4.0 ** -bits * rng.uniform(0.8, 1.2, (1, 1, 4))
    params = rng.integers(1, 4, size=(layers, 1, 1)) * 1000
    return bits, importance, np.sort(distortion, -1)[..., ::-1], params * bits


def test_allocation_stays_within_budget_and_beats_uniform():
    for seed in range(50):
        rng = np.random.default_rng(seed)
        bits, importance, distortion, cost = random_problem(rng)
        cost = np.broadcast_to(cost, distortion.shape)
        for k in range(3):
            budget = cost[..., k].sum()  # what uniform bits[k] costs
            choice = allocate_bits(importance, distortion, cost, budget)
            spent = np.take_along_axis(cost, choice[..., None], -1).sum()
            assert spent <= budget
            loss = (importance * np.take_along_axis(distortion, choice[..., None], -1)[..., 0]).sum()
            assert loss <= (importance * distortion[..., k]).sum()
        odd = rng.uniform(cost[..., 0].sum(), cost[..., 3].sum())
        choice = allocate_bits(importance, distortion, cost, odd)
        assert np.take_along_axis(cost, choice[..., None], -1).sum() <= odd
    everything = allocate_bits(importance, distortion, cost, cost[..., 3].sum())
    assert (everything == 3).all()


@pytest.mark.parametrize("model_type", FAMILIES)
def test_output_distortion_measures_routed_tokens_and_restores_weights(tiny, model_type):
    model = tiny(model_type)
    before = {n: p.clone() for n, p in model.named_parameters()}
    tokens = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    options = QuantOptions(group_size=32)
    distortion = output_distortion(model, tokens, options=options)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert distortion.shape == (2, 8, 4) and (np.diff(distortion, axis=-1) < 0).all()
    assert (distortion[..., -1] < 1e-3).all() and (distortion[..., 0] > 0.05).all()
    for relative in (True, False):
        few = output_distortion(model, tokens[:1, :3], options=options, relative=relative)  # < 8 experts chosen
        ratio = few / weight_distortion(model, options=options, relative=relative)
        for layer in ratio:  # unchosen experts (>= 2 of 8): their weight distortion times one factor per width
            counts = np.unique(layer.round(9), axis=0, return_counts=True)[1]
            assert 2 <= counts.max() < 8


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss"])  # gpt-oss stores experts [E, in, out]
def test_fisher_distortion_equals_a_hand_computation(tiny, model_type):
    model = copy.deepcopy(tiny(model_type))
    tokens = torch.randint(3, 100, (3, 8), generator=torch.Generator().manual_seed(1))
    options = QuantOptions(group_size=32)
    before = {n: p.clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    distortion = fisher_distortion(model, tokens, (2, 4, 8), options)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert distortion.shape == (2, 8, 3) and (distortion >= 0).all() and (np.diff(distortion, axis=-1) <= 0).all()
    layer = find_moe_layers(model)[1]
    params = {n: p for n, p in layer.experts.named_parameters() if p.dim() == 3}
    squares = {n: torch.zeros_like(p) for n, p in params.items()}
    for row in tokens:
        model.zero_grad()
        model(input_ids=row[None], labels=row[None]).loss.backward()
        for n, p in params.items():
            squares[n] += p.grad.square()
    model.zero_grad(set_to_none=True)
    expert = 5
    expected = {}
    for bits in (2, 4):
        total = 0.0
        for n, p in params.items():
            w, f = p.data[expert], squares[n][expert]
            if model_type == "gpt_oss":  # [in, out]: quantise rows of [out, in]
                w, f = w.T, f.T
            total += 0.5 * float(((fake_quantize(w, bits, 32) - w).square() * f).sum())
        expected[bits] = total
    assert distortion[1, expert, 0] == pytest.approx(expected[2], rel=1e-4)
    assert distortion[1, expert, 1] == pytest.approx(expected[4], rel=1e-4)


def test_allocation_takes_the_upgrade_that_saves_most_per_unit_of_cost():
    """Two experts, one upgrade affordable: by loss saved per unit of extra cost, not by loss or cost alone."""
    one = np.ones((1, 2))
    # A saves 1 for 1 unit, B saves 3 for 1 unit, although A's losses are larger
    assert allocate_bits(one, [[[10.0, 9.0], [3.0, 0.0]]], [[[1.0, 2.0], [1.0, 2.0]]], 3).tolist() == [[0, 1]]
    # A saves 1 for 1 unit, B saves 3 for 2 units: B's rate (1.5) wins although its options cost far more
    assert allocate_bits(one, [[[5.0, 4.0], [5.0, 2.0]]], [[[1.0, 2.0], [10.0, 12.0]]], 13).tolist() == [[0, 1]]


def test_allocation_walks_each_experts_hull_in_order():
    """Equal rates: the smaller step first, so a tight budget still gets it (options listed out of cost
    order). A step that does not fit closes its expert, whose later steps are skipped, while other experts'
    cheaper steps are still taken."""
    assert allocate_bits([[1.0]], [[[4.0, 2.0, 3.0]]], [[[1.0, 3.0, 2.0]]], 2).tolist() == [[2]]
    assert allocate_bits([[1.0]], [[[4.0, 2.0, 3.0]]], [[[1.0, 3.0, 2.0]]], 3).tolist() == [[1]]
    loss = [[[10.0, 8.0, 1.0, 0.9], [1.0, 0.95, 0.95, 0.95]]]
    cost = [[[1.0, 2.0, 30.0, 31.0], [1.0, 2.0, 50.0, 50.0]]]
    assert allocate_bits(np.ones((1, 2)), loss, cost, 4).tolist() == [[1, 1]]


def test_allocation_below_minimum_is_an_error():
    bits, importance, distortion, cost = random_problem(np.random.default_rng(0))
    cost = np.broadcast_to(cost, distortion.shape)
    with pytest.raises(MoescopeError, match="below the minimum"):
        allocate_bits(importance, distortion, cost, cost[..., 0].sum() - 1)
    with pytest.raises(MoescopeError, match=r"importance \(3, 5\) does not match distortion \(3, 4\)"):
        allocate_bits(np.ones((3, 5)), np.ones((3, 4, 2)), np.ones((3, 4, 2)), 100)
    for bad_importance, bad_distortion in ((-1.0, 1.0), (np.nan, 1.0), (1.0, np.inf)):
        imp, dist = importance.copy(), distortion.copy()
        imp[0, 0], dist[0, 0, 0] = bad_importance, bad_distortion
        with pytest.raises(MoescopeError, match="^importance must be finite and non-negative, and distortion finite$"):
            allocate_bits(imp, dist, cost, cost[..., 3].sum())


def test_budget_plan_on_a_model(tiny):
    model = tiny("mixtral")
    options = QuantOptions(group_size=32)
    distortion = weight_distortion(model, options=options)
    assert distortion.shape == (2, 8, 4) and (np.diff(distortion, axis=-1) < 0).all()
    importance = np.random.default_rng(0).gamma(0.5, size=(2, 8))
    plan = budget_plan(model, importance, distortion, avg_bits=3.0, options=options)
    assert isinstance(plan, BitPlan) and plan.method == "budget"
    assert memory_estimate(model, plan).expert_bits <= 3.0
    top = np.unravel_index(importance.argmax(), importance.shape)
    bottom = np.unravel_index(importance.argmin(), importance.shape)
    assert plan.layers[top[0]][top[1]] >= plan.layers[bottom[0]][bottom[1]]
    coarse = budget_plan(model, importance, distortion, avg_bits=3.0, options=options, per_layer=True)
    assert all(len(set(bits)) == 1 for bits in coarse.layers.values())
    assert memory_estimate(model, coarse).expert_bits <= 3.0

    def loss(plan):
        chosen = [[[2, 3, 4, 8].index(b) for b in plan.layers[i]] for i in sorted(plan.layers)]
        return (importance * np.take_along_axis(distortion, np.array(chosen)[..., None], -1)[..., 0]).sum()

    assert loss(plan) <= loss(coarse) <= loss(uniform_plan(model, 3))
    size = memory_estimate(model, uniform_plan(model, 3, options)).total_bytes
    by_size = budget_plan(model, importance, distortion, max_bytes=size, options=options)
    assert memory_estimate(model, by_size).total_bytes <= size
    with pytest.raises(MoescopeError, match="below the minimum possible 2 average bits"):
        budget_plan(model, importance, distortion, avg_bits=1.5, options=options)
    with pytest.raises(MoescopeError, match="below the minimum possible"):
        budget_plan(model, importance, distortion, max_bytes=size // 3, options=options)
