"""Capture must return exactly the routing the experts consumed, for every architecture."""

from __future__ import annotations

import pytest
import torch

from moescope.backends.hf.capture import capture_routing
from moescope.errors import MoescopeError
from moescope.models.base import top_k_route
from moescope.models.layout import text_config
from moescope.models.registry import find_moe_layers
from moescope.models.tiny import TINY, tiny_model

ARCHITECTURES = sorted(TINY)


def keep_first(store: dict, key: str, value) -> None:
    """Hook-friendly setdefault: returns None so the hooked module's output is left alone."""
    store.setdefault(key, value)


def run(model, ids, mask=None, **capture_options):
    with capture_routing(model, **capture_options) as rec, torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    return rec


def expert_outputs(layer, hidden: torch.Tensor) -> torch.Tensor:
    """[E, tokens, H]: every expert applied to every token with weight 1, one expert at a time."""
    tokens = hidden.shape[0]
    ones = torch.ones(tokens, 1, dtype=hidden.dtype)
    return torch.stack(
        [layer.experts(hidden, torch.full((tokens, 1), e, dtype=torch.long), ones).reshape(tokens, -1)
         for e in range(layer.num_experts)]
    )


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_captured_routing_reproduces_each_moe_layer_output(model_type, tiny):
    """Rebuild every experts-module output from the captured ids and weights alone."""
    model = tiny(model_type)
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    seen, router_in = {}, {}
    with capture_routing(model) as rec:
        probes = [
            layer.experts.register_forward_hook(
                lambda m, args, out, path=layer.path: keep_first(seen, path, (args[0].detach(), out.detach()))
            )
            for layer in rec.layers
        ] + [
            layer.router.register_forward_pre_hook(
                lambda m, args, path=layer.path: keep_first(router_in, path, args[0])
            )
            for layer in rec.layers
        ]
        with torch.no_grad():
            model(input_ids=ids)
        for probe in probes:
            probe.remove()
    assert len(rec.events) == len(rec.layers) > 0
    for layer, event in zip(rec.layers, rec.events):
        assert event.layer == layer.index
        assert event.expert_ids.shape == (18, layer.top_k) == event.weights.shape
        assert bool(((event.expert_ids >= 0) & (event.expert_ids < layer.num_experts)).all())
        hidden, actual = seen[layer.path]
        if layer.family.hook_points(layer) == "router":
            # Llama-4's experts consume every expert's copy of the input scaled by its score
            # (zero where not chosen): rebuild that input from the capture.
            scores = torch.zeros(18, layer.num_experts).scatter_(1, event.expert_ids, event.weights)
            token_in = router_in[layer.path].reshape(18, -1)
            rebuilt = (token_in.repeat(layer.num_experts, 1) * scores.T.reshape(-1, 1))
            torch.testing.assert_close(rebuilt, hidden, atol=1e-6, rtol=1e-5)
            continue
        with torch.no_grad():
            every = expert_outputs(layer, hidden.reshape(18, -1))  # [E, T, H]
            chosen = every[event.expert_ids, torch.arange(18)[:, None]]  # [T, k, H]
            rebuilt = (chosen * event.weights[..., None].to(chosen.dtype)).sum(1)
        torch.testing.assert_close(rebuilt, actual.reshape(18, -1), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_router_family_reproduces_the_selection(model_type, tiny):
    """The registered family re-derives ids and weights from the router logits (or is 'other')."""
    model = tiny(model_type)
    logits = {}
    with capture_routing(model) as rec:
        hooks = [
            layer.router.register_forward_hook(
                lambda m, a, out, layer=layer: keep_first(logits, layer.path, layer.family.router_logits(out))
            )
            for layer in rec.layers
        ]
        with torch.no_grad():
            model(input_ids=torch.randint(0, 100, (3, 7), generator=torch.Generator().manual_seed(2)))
        for hook in hooks:
            hook.remove()
    for layer, event in zip(rec.layers, rec.events):
        if layer.family.name == "other":
            pytest.skip(f"{model_type} has no registered router family; capture is still exact")
        ids, weights = layer.family.route(logits[layer.path], layer, text_config(model.config))
        ids_sorted, order = ids.sort(-1)
        captured_sorted, captured_order = event.expert_ids.sort(-1)
        assert torch.equal(ids_sorted, captured_sorted)
        torch.testing.assert_close(weights.gather(1, order).float(), event.weights.gather(1, captured_order),
                                   atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "deepseek_v3", "gpt_oss", "llama4_text", "jamba"])
def test_padding_is_excluded_and_real_tokens_unchanged(model_type, tiny):
    model = tiny(model_type)
    gen = torch.Generator().manual_seed(3)
    long, short = torch.randint(1, 100, (1, 8), generator=gen), torch.randint(1, 100, (1, 5), generator=gen)
    batch = torch.cat([long, torch.cat([short, torch.zeros(1, 3, dtype=torch.long)], 1)])
    mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    padded = run(model, batch, mask)
    alone = run(model, short, torch.ones(1, 5, dtype=torch.long))
    for event, single in zip(padded.events, alone.events):
        assert event.expert_ids.shape[0] == 13  # 8 + 5 real tokens, no padding
        row = event.rows == 1
        assert torch.equal(event.positions[row], torch.arange(5))
        assert torch.equal(event.expert_ids[row].sort(-1).values, single.expert_ids.sort(-1).values)


def test_sigmoid_bias_router_logits_are_not_the_selection(tiny):
    """For DeepSeek-V3-style routers, top-k of `output_router_logits` differs from the real choice."""
    model = tiny("deepseek_v3")
    ids = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(4))
    with capture_routing(model) as rec, torch.no_grad():
        out = model(input_ids=ids, output_router_logits=True)
    router_logits = [logit for logit in out.router_logits if logit is not None]
    assert len(router_logits) == len(rec.events)
    disagree = 0
    for logit, event in zip(router_logits, rec.events):
        naive = logit.reshape(-1, logit.shape[-1]).topk(event.expert_ids.shape[1], -1).indices.sort(-1).values
        disagree += int((naive != event.expert_ids.sort(-1).values).any(-1).sum())
    assert disagree > 0.3 * ids.numel()


def test_distributions_are_available_on_request(tiny):
    model = tiny("qwen3_moe")
    ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(5))
    assert all(event.probs is None for event in run(model, ids).events)
    for event in run(model, ids, distributions=True).events:
        torch.testing.assert_close(event.probs.sum(-1), torch.ones(12))
        chosen = event.probs.gather(1, event.expert_ids)
        torch.testing.assert_close(chosen / chosen.sum(-1, keepdim=True), event.weights, atol=1e-5, rtol=1e-4)
    assert all(event.probs is None for event in run(tiny("gpt_oss"), ids, distributions=True).events)


@pytest.mark.parametrize("model_type", ["olmoe", "qwen3_moe", "deepseek_v3"])
def test_saliency_norms_match_each_expert_output(model_type, tiny):
    """One extra experts call (tokens repeated k times) gives the norms that k single-rank passes and
    brute force over every expert give."""
    model = tiny(model_type)
    ids = torch.randint(0, 100, (2, 5), generator=torch.Generator().manual_seed(6))
    hidden_in, calls = {}, {}

    def record(path):
        def hook(module, args):
            hidden_in.setdefault(path, args[0])
            calls[path] = calls.get(path, 0) + 1
        return hook

    # Registered before capture's own hooks, so they see the model's call before saliency's extra one.
    hooks = [layer.experts.register_forward_pre_hook(record(layer.path)) for layer in find_moe_layers(model)]
    with capture_routing(model, saliency=True) as rec, torch.no_grad():
        model(input_ids=ids)
    for hook in hooks:
        hook.remove()
    assert len(rec.events) == len(rec.layers)  # the extra expert passes record nothing
    assert all(calls[layer.path] == 2 for layer in rec.layers)  # one extra experts call per layer call, not k
    for layer, event in zip(rec.layers, rec.events):
        hidden = hidden_in[layer.path].reshape(10, -1)
        with torch.no_grad():
            every = expert_outputs(layer, hidden)
            one = torch.ones(10, 1, dtype=hidden.dtype)
            k_passes = torch.stack([layer.experts(hidden, event.expert_ids[:, r:r + 1], one).norm(dim=-1)
                                    for r in range(layer.top_k)], dim=1)
        expected = every[event.expert_ids, torch.arange(10)[:, None]].norm(dim=-1)
        torch.testing.assert_close(event.output_norms, expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(event.output_norms, k_passes, atol=1e-6, rtol=1e-5)


def test_generation_steps_are_captured_one_token_per_row(tiny):
    model = tiny("qwen3_moe")
    ids = torch.randint(1, 100, (2, 4), generator=torch.Generator().manual_seed(7))
    with capture_routing(model) as rec, torch.no_grad():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                       pad_token_id=0)
    per_call = [event.expert_ids.shape[0] for event in rec.events[:: len(rec.layers)]]
    assert per_call == [8, 2, 2]


def test_streaming_callback_keeps_nothing(tiny):
    seen = []
    model = tiny("mixtral")
    with capture_routing(model, on_event=seen.append) as rec, torch.no_grad():
        model(input_ids=torch.ones(1, 3, dtype=torch.long))
    assert rec.events == [] and len(seen) == len(rec.layers)


def test_hooks_are_removed_even_after_an_exception(tiny):
    model = tiny("qwen2_moe")
    before = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    with pytest.raises(RuntimeError, match="boom"), capture_routing(model, distributions=True):
        raise RuntimeError("boom")
    after = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    assert before == after


def test_dense_model_is_refused_with_its_type():
    from transformers import AutoModelForCausalLM, LlamaConfig

    dense = AutoModelForCausalLM.from_config(LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                         intermediate_size=64, vocab_size=64))
    with pytest.raises(MoescopeError, match="no MoE layers found in llama"):
        with capture_routing(dense):
            pass


def test_unknown_architecture_falls_back_to_duck_typing():
    """A model type missing from the registry is still found, as family 'other', and captured."""
    model = tiny_model("qwen3_moe")
    model.config.model_type = "my_private_moe"
    rec = run(model, torch.ones(1, 4, dtype=torch.long))
    assert [layer.family.name for layer in rec.layers] == ["other", "other"]
    assert rec.events[0].expert_ids.shape == (4, 2)


def test_top_k_route_by_hand():
    """The shared routing arithmetic on hand-made scores: a blocked expert is never chosen even where its
    biased score is the best, and groups are ranked by their best two experts ("top2") or best one ("max")."""
    scores = torch.tensor([[0.9, 0.5, 0.1]])
    ids, weights = top_k_route(scores, 1, False, blocked=torch.tensor([[True, False, False]]))
    assert ids.tolist() == [[1]] and weights.tolist() == [[0.5]]
    biased = top_k_route(torch.tensor([[0.0, 0.5, 0.4]]), 1, False, choice_bias=torch.tensor([1.0, 0.0, 0.0]),
                         blocked=torch.tensor([[True, False, False]]))[0]
    assert biased.tolist() == [[1]]
    grouped = torch.tensor([[0.9, 0.0, 0.6, 0.55]])  # group 0 has the best expert, group 1 the best pair
    assert top_k_route(grouped, 1, False, groups=2, top_groups=1, group_score="top2")[0].tolist() == [[2]]
    assert top_k_route(grouped, 1, False, groups=2, top_groups=1, group_score="max")[0].tolist() == [[0]]
