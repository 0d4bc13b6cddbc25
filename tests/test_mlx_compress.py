"""Really quantised and pruned mlx-lm models: stock mlx-lm loads and generates them, the packed experts
equal `quantize --plan` with MLX's scales bit for bit (float32), the size on disk is the plan's
arithmetic, pruning works in the HF and the converted layouts (quantised too) with replays that prove
it, and bfloat16 goes through every write bit for bit."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import save_with_tokenizer, tiny_checkpoint, write_calibration
from safetensors.torch import load_file

from moescope.backends.hf.loading import model_identity, model_on_meta
from moescope.backends.select import open_model, routing_capture
from moescope.cli import main
from moescope.compress.mlx_quantize import quantize_mlx
from moescope.compress.quant.apply import uniform_plan
from moescope.models.tiny import tiny_model
from moescope.plans import PrunePlan, load_bit_plan, save_bit_plan

mlx_lm = pytest.importorskip("mlx_lm")
mx = pytest.importorskip("mlx.core")
from mlx.utils import tree_flatten  # noqa: E402  (after the importorskip that guards it)

FAMILIES = ("qwen3_moe", "mixtral", "deepseek_v3")
EXTREMES = torch.tensor([7e4, 1e6, -2e-8, 1e-40, -3e38])  # beyond float16's range, and bfloat16 subnormals


def mixed_plan(source, tmp_path):
    plan = uniform_plan(model_on_meta(source), 4)
    first, *rest = sorted(plan.layers)
    plan.layers[first] = [2, 3] * (len(plan.layers[first]) // 2)  # coarsened to 3 bits (mean 2.5, rounded up)
    for index in rest:
        plan.layers[index] = [8] * len(plan.layers[index])
    plan.method = "budget"
    save_bit_plan(plan, tmp_path / "plan.json")
    return tmp_path / "plan.json"


def parameters(model) -> dict:
    return dict(tree_flatten(model.parameters()))


def greedy(model, tokens: list[int], count: int) -> list[int]:
    from mlx_lm.generate import generate_step

    steps = generate_step(mx.array(tokens), model, max_tokens=count)
    return [int(token) for token, _ in steps]


@pytest.mark.parametrize("family", FAMILIES)
def test_quantised_model_loads_with_stock_mlx_lm_and_equals_quantize_plan(family, tmp_path):
    source = tiny_checkpoint(tmp_path / "source", family)
    assert main(["quantize", str(source), "--plan", str(mixed_plan(source, tmp_path)), "--backend", "mlx",
                 "--out", str(tmp_path / "q")]) == 0
    served = load_bit_plan(tmp_path / "q" / "bit_plan.json")
    assert served.scales == "mlx" and not served.symmetric and {len(set(b)) for b in served.layers.values()} == {1}
    model, tokenizer = mlx_lm.load(str(tmp_path / "q"))  # stock mlx-lm, nothing of moescope's
    assert isinstance(mlx_lm.generate(model, tokenizer, prompt="the cat sat", max_tokens=4), str)
    prompt = [3, 4, 5, 6, 7]
    ours = open_model(tmp_path / "q").generate(torch.tensor([prompt]), max_new_tokens=4)[0, len(prompt):].tolist()
    assert greedy(model, prompt, 4) == ours
    # the same plan in torch, fake-quantised with MLX's rule: the same weights, bit for bit
    assert main(["quantize", str(source), "--plan", str(tmp_path / "q" / "bit_plan.json"), "--out",
                 str(tmp_path / "fq")]) == 0
    packed = parameters(model)
    fake = parameters(open_model(tmp_path / "fq", "mlx").module)  # the HF layout, stacked by mlx-lm
    quantisation = json.loads((tmp_path / "q" / "config.json").read_text())["quantization"]
    experts = [path for path in quantisation if ".switch_mlp." in path]
    assert len(experts) == 3 * len(served.layers)
    for path in experts:
        bits = served.layers[int(path.split(".")[2])][0]
        assert quantisation[path]["bits"] == bits
        dequantised = mx.dequantize(packed[f"{path}.weight"], packed[f"{path}.scales"], packed[f"{path}.biases"],
                                    group_size=quantisation[path]["group_size"], bits=bits)
        np.testing.assert_array_equal(np.array(dequantised), np.array(fake[f"{path}.weight"]), err_msg=path)


def test_bfloat16_sizes_on_disk_equal_the_arithmetic_and_kept_tensors_are_bit_exact(tmp_path):
    model = tiny_model("qwen3_moe").to(torch.bfloat16)
    with torch.no_grad():
        model.model.embed_tokens.weight[5, : len(EXTREMES)] = EXTREMES.to(torch.bfloat16)
    save_with_tokenizer(model, tmp_path / "source")
    result = quantize_mlx(tmp_path / "source", tmp_path / "q", uniform_plan(model, 4))
    assert result.disk.expert_bytes == result.estimate.expert_bytes  # codes, bf16 scales and offsets: exact
    before = load_file(tmp_path / "source" / "model.safetensors")
    after = load_file(tmp_path / "q" / "model.safetensors")
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.self_attn.q_proj.weight"):
        assert after[name].dtype == torch.bfloat16
        assert torch.equal(after[name].view(torch.int16), before[name].view(torch.int16)), name


def test_prune_in_both_layouts_quantised_too_with_replays(tmp_path):
    """deepseek_v3 (a correction bias): remove and mask, from the HF layout and from a 4-bit converted
    model. Removal routes exactly as the mask does, and the replay counts no selection of a masked expert."""
    source = tiny_checkpoint(tmp_path / "source", "deepseek_v3", n_group=1, topk_group=1)
    write_calibration(tmp_path / "cal.jsonl", 12)
    plan = PrunePlan(model_identity(model_on_meta(source)), {1: 8}, 2, {1: [1, 6]})
    plan.save(tmp_path / "prune.json")
    assert main(["quantize", str(source), "--bits", "4", "--backend", "mlx", "--out", str(tmp_path / "q")]) == 0
    ids = torch.randint(3, 32, (4, 10), generator=torch.Generator().manual_seed(0))
    for layout in ("source", "q"):
        routed = {}
        for method in ("remove", "mask"):
            out = tmp_path / f"{layout}-{method}"
            assert main(["prune", str(tmp_path / layout), "--plan", str(tmp_path / "prune.json"), "--method", method,
                         "--backend", "mlx", "--calibration", str(tmp_path / "cal.jsonl"), "--out", str(out)]) == 0
            mlx_lm.load(str(out))
            model = open_model(out, "mlx")
            with routing_capture(model) as rec:
                routed[method] = model(input_ids=ids).logits
            chosen = rec.events[0].expert_ids
            if method == "remove":
                chosen = torch.tensor(plan.kept(1))[chosen]
            assert not torch.isin(chosen, torch.tensor(plan.prune[1])).any()
            routed[f"{method} ids"] = chosen.sort(-1).values
        assert torch.equal(routed["remove ids"], routed["mask ids"])
        torch.testing.assert_close(routed["remove"], routed["mask"], rtol=0, atol=1e-5)


def test_pruning_and_converting_keep_bfloat16_bit_exact(tmp_path):
    model = tiny_model("qwen3_moe").to(torch.bfloat16)
    with torch.no_grad():
        model.model.layers[0].mlp.experts.gate_up_proj[3, 0, : len(EXTREMES)] = EXTREMES.to(torch.bfloat16)
        model.model.embed_tokens.weight[5, : len(EXTREMES)] = EXTREMES.to(torch.bfloat16)
    save_with_tokenizer(model, tmp_path / "source")
    plan = uniform_plan(model, 4)
    plan.layers = {index: [16] * len(bits) for index, bits in plan.layers.items()}  # the layout, unquantised
    quantize_mlx(tmp_path / "source", tmp_path / "converted", plan)
    prune = PrunePlan(model_identity(model), {0: 8, 1: 8}, 2, {0: [0, 6], 1: [2, 5]})
    prune.save(tmp_path / "prune.json")
    assert main(["prune", str(tmp_path / "converted"), "--plan", str(tmp_path / "prune.json"), "--replay-prompts",
                 "0", "--out", str(tmp_path / "pruned")]) == 0
    before = load_file(tmp_path / "source" / "model.safetensors")
    after = load_file(tmp_path / "pruned" / "model.safetensors")
    assert after["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert torch.equal(after["model.embed_tokens.weight"].view(torch.int16),
                       before["model.embed_tokens.weight"].view(torch.int16))
    for layer, kept in ((0, prune.kept(0)), (1, prune.kept(1))):
        stacked = after[f"model.layers.{layer}.mlp.switch_mlp.gate_proj.weight"]
        original = torch.stack([before[f"model.layers.{layer}.mlp.experts.{e}.gate_proj.weight"] for e in kept])
        assert stacked.shape[0] == 6 and torch.equal(stacked.view(torch.int16), original.view(torch.int16))
    assert main(["quantize", str(tmp_path / "pruned"), "--bits", "4", "--backend", "mlx", "--out",
                 str(tmp_path / "again")]) == 2  # already mlx-lm's layout: quantise from the HF checkpoint
