"""Backbone adapters (msa_core/lora.py): exact merging, and a router file that carries them."""

from __future__ import annotations

import copy

import pytest
import torch

from msa_core import BankMismatchError, MSAModel, RouterProjectors
from msa_core.decoder.lora import NAME_RE, adapter_tensors, attach, combine, fold, merge, remove
from msa_core.errors import ModelLoadError


@pytest.fixture
def model(tiny_model_dir) -> MSAModel:
    return MSAModel.from_pretrained(tiny_model_dir("qwen3"), device="cpu")


def _states(m) -> torch.Tensor:
    """Final hidden states of a model's backbone (or of a backbone) on a fixed input."""
    ids = torch.tensor([[3, 9, 4, 7, 11, 2]])
    return getattr(m, "backbone", m)(ids, torch.arange(6)[None])


def _trained_adapters(backbone, layers, rank=2, seed=0) -> None:
    """Attach adapters and give them non-zero B (as training would)."""
    attach(backbone, layers, rank)
    gen = torch.Generator().manual_seed(seed)
    for name, p in backbone.named_parameters():
        if name.endswith(".b"):
            p.data = torch.randn(p.shape, generator=gen) * 0.1


def test_fresh_adapters_change_nothing_and_merging_is_exact(model):
    before = _states(model)
    attach(model.backbone, [1, 2], rank=3)
    torch.testing.assert_close(_states(model), before, rtol=0, atol=0)  # B = 0 at the start
    _trained_adapters(model.backbone, [3], rank=2)
    wrapped = _states(model)
    assert not torch.allclose(wrapped, before)
    tensors = adapter_tensors(model.backbone)
    assert len(tensors) == 3 * 7 * 2 and all(NAME_RE.match(n) for n in tensors)
    base = copy.deepcopy(model.backbone)
    fold(model.backbone)
    assert not any(".a" in n or ".b" in n for n, _ in model.backbone.named_parameters())
    torch.testing.assert_close(_states(model), wrapped, rtol=1e-5, atol=1e-5)
    # the same tensors merged into an untouched copy give the same weights
    for layer in base.layers:
        for parent in (layer.self_attn, layer.mlp):
            for attr, child in list(parent.named_children()):
                if hasattr(child, "base"):
                    setattr(parent, attr, child.base)
    merge(base, tensors, scale=2.0)
    for (n1, p1), (n2, p2) in zip(model.backbone.state_dict().items(), base.state_dict().items()):
        assert n1 == n2
        torch.testing.assert_close(p1, p2, rtol=1e-6, atol=1e-6)


def test_combined_adapters_merge_to_the_sum_of_both(model):
    """combine stacks ranks: merging the result equals merging one set, then the other (other scale too)."""
    _trained_adapters(model.backbone, [1, 2], rank=2, seed=1)
    first = adapter_tensors(model.backbone)
    remove(model.backbone)
    _trained_adapters(model.backbone, [2, 3], rank=3, seed=2)
    second = adapter_tensors(model.backbone)
    remove(model.backbone)
    one_by_one = copy.deepcopy(model.backbone)
    merge(one_by_one, first, scale=0.5)
    merge(one_by_one, second, scale=2.0)
    together = combine(first, 0.5, second, 2.0)
    assert together["model.layers.2.mlp.up_proj.lora_a"].shape[0] == 5  # ranks 2 + 3 where both adapt
    assert together["model.layers.1.mlp.up_proj.lora_a"].shape[0] == 2
    merge(model.backbone, together, scale=2.0)
    for (name, p1), p2 in zip(one_by_one.state_dict().items(), model.backbone.state_dict().values()):
        torch.testing.assert_close(p2, p1, rtol=1e-6, atol=1e-6, msg=name)


def test_merge_refuses_bad_adapters(model):
    good = {"model.layers.1.mlp.up_proj.lora_a": torch.zeros(2, model.backbone.args.hidden_size),
            "model.layers.1.mlp.up_proj.lora_b": torch.zeros(model.backbone.args.intermediate_size, 2)}
    merge(model.backbone, good, 1.0)
    cases = {
        "not a backbone adapter": {"model.layers.1.mlp.nope.lora_a": torch.zeros(1, 1)},
        "lacks its lora_a or lora_b": {"model.layers.1.mlp.up_proj.lora_a": good["model.layers.1.mlp.up_proj.lora_a"]},
        "do not fit the weight": {**good, "model.layers.1.mlp.up_proj.lora_b": torch.zeros(3, 2)},
        "the backbone has": {k.replace("layers.1.", "layers.99."): v for k, v in good.items()},
    }
    for message, tensors in cases.items():
        with pytest.raises(ModelLoadError, match=message):
            merge(model.backbone, tensors, 1.0)


def _router_with_delta(model: MSAModel, tiny_model_dir) -> RouterProjectors:
    donor = MSAModel.from_pretrained(tiny_model_dir("qwen3"), device="cpu")
    _trained_adapters(donor.backbone, [2, 3], rank=2, seed=1)
    router = model.router.copy()
    router.backbone_delta, router.delta_scale = adapter_tensors(donor.backbone), 2.0
    return router


def test_router_file_carries_the_delta_and_the_model_merges_it(model, tiny_model_dir, tmp_path):
    router = _router_with_delta(model, tiny_model_dir)
    assert router.fingerprint() != model.router.fingerprint()  # the delta is part of the router's identity
    path = tmp_path / "tuned.safetensors"
    router.save(path, backbone_fingerprint=model.backbone_fingerprint)
    loaded = RouterProjectors.load(path)
    assert loaded.fingerprint() == router.fingerprint() and loaded.delta_scale == 2.0
    assert set(loaded.backbone_delta) == set(router.backbone_delta)

    tuned = MSAModel.from_pretrained(tiny_model_dir("qwen3"), router=path, device="cpu")
    assert tuned.backbone_fingerprint != model.backbone_fingerprint
    expected = copy.deepcopy(model.backbone)
    merge(expected, router.backbone_delta, 2.0)
    for (name, p), q in zip(tuned.backbone.state_dict().items(), expected.state_dict().values()):
        torch.testing.assert_close(p, q, msg=name)
    bank = model.index(["the lighthouse was built in 1887", "ferries leave at seven"], ids=["a", "b"])
    with pytest.raises(BankMismatchError, match="another model"):  # a bank of the base model is refused
        tuned.retrieve("when was the lighthouse built?", bank)


def test_hybrid_answers_generate_with_the_base_weights(model, tiny_model_dir, tmp_path):
    """The delta serves routing; hybrid answers keep the base model's weights (shared where the delta changes
    nothing, copied where it does), and every answer mode still runs."""
    router = _router_with_delta(model, tiny_model_dir)
    path = tmp_path / "tuned.safetensors"
    router.save(path, backbone_fingerprint=model.backbone_fingerprint)
    tuned = MSAModel.from_pretrained(tiny_model_dir("qwen3"), router=path, device="cpu")
    changed = sorted({int(n.split(".")[2]) for n in router.backbone_delta})
    assert model.generator is model.backbone and tuned.generator is not tuned.backbone
    torch.testing.assert_close(_states(tuned.generator), _states(model), rtol=0, atol=0)
    assert not torch.allclose(_states(tuned), _states(model))
    assert tuned.generator.embed_tokens is tuned.backbone.embed_tokens
    for i, layer in enumerate(tuned.generator.layers):
        assert (layer is tuned.backbone.layers[i]) == (i not in changed), i
    # one document, so both models put the same prompt together: the hybrid answers must then be the same
    docs, question = ["the lighthouse was built in 1887"], "when was the lighthouse built?"
    tuned_bank, base_bank = tuned.index(docs, ids=["a"]), model.index(docs, ids=["a"])
    hybrid = tuned.answer(question, tuned_bank, mode="hybrid", k=1, max_new_tokens=6)
    assert hybrid.text == model.answer(question, base_bank, mode="hybrid", k=1, max_new_tokens=6).text
    assert tuned.answer(question, tuned_bank, mode="latent", k=1, max_new_tokens=6).mode == "latent"


def test_a_tuned_model_round_trips_in_msa_format(model, tiny_model_dir, tmp_path):
    """The MSA folder holds the merged weights (what any MSA loader should run) and the delta beside them, so
    our loader gives back the same fingerprints and the base weights for hybrid answers."""
    router = _router_with_delta(model, tiny_model_dir)
    path = tmp_path / "tuned.safetensors"
    router.save(path, backbone_fingerprint=model.backbone_fingerprint)
    tuned = MSAModel.from_pretrained(tiny_model_dir("qwen3"), router=path, device="cpu")
    out = tuned.save_pretrained(tmp_path / "msa")
    assert (out / "msa_router_delta.safetensors").is_file()
    again = MSAModel.from_pretrained(out, device="cpu", profile="default")
    assert again.backbone_fingerprint == tuned.backbone_fingerprint
    assert again.router_fingerprint == tuned.router_fingerprint
    torch.testing.assert_close(_states(again.generator), _states(model), rtol=1e-5, atol=1e-5)
    bank = tuned.index(["the lighthouse was built in 1887"], ids=["a"])
    assert again.retrieve("when was the lighthouse built?", bank, k=1)[0].id == "a"  # accepts the bank
    model.save_pretrained(tmp_path / "msa")  # saving a model without a delta over it removes the stale file
    assert not (out / "msa_router_delta.safetensors").exists()


def test_a_router_file_without_a_delta_keeps_format_and_fingerprint(model, tmp_path):
    path = tmp_path / "plain.safetensors"
    model.router.save(path, backbone_fingerprint=model.backbone_fingerprint)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["version"] == "1" and all(not NAME_RE.match(k) for k in f.keys())
    assert RouterProjectors.load(path).fingerprint() == model.router.fingerprint()


def test_corrupt_or_mislabelled_delta_is_refused(model, tiny_model_dir, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    router = _router_with_delta(model, tiny_model_dir)
    path = tmp_path / "tuned.safetensors"
    router.save(path, backbone_fingerprint=model.backbone_fingerprint)
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    name = next(n for n in tensors if n.endswith("lora_b"))
    save_file({**tensors, name: tensors[name] + 1.0}, str(tmp_path / "corrupt.safetensors"), metadata=meta)
    with pytest.raises(ModelLoadError, match="corrupt"):
        RouterProjectors.load(tmp_path / "corrupt.safetensors")
    save_file(tensors, str(tmp_path / "v1.safetensors"), metadata={**meta, "version": "1"})
    with pytest.raises(ModelLoadError, match="holds backbone adapters"):
        RouterProjectors.load(tmp_path / "v1.safetensors")
