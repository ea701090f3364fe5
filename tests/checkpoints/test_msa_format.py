"""MSA-format checkpoints (spec §1): msa_config defaults, routers, loading, saving, exact round trips."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from msa_core import InvalidInputError, ModelLoadError, MSAConfig, MSAModel
from msa_core.checkpoints.msa_format import (
    MSA_CONFIG_DEFAULTS,
    AttentionRouter,
    engine_config,
    is_msa_checkpoint,
    normalization_for,
    parse_router_layers,
    read_msa_config,
)

DOCS = ["The lighthouse of Velmora was built in 1887 by the engineer Ada Quist.",
        "Ferries leave the harbour every morning at seven and return at dusk.",
        "Paris is the capital of France.",
        "x"]
QUESTION = "Who built the lighthouse?"
VARIANTS = [  # (decouple_router, aux_loss_method, normalisation the reference computes)
    (True, "INFONCE_DECOUPLE", "scaled_dot"),
    (True, "INFONCE", "cosine"),
    (False, "INFONCE_DECOUPLE", "scaled_dot"),
    (False, "INFONCE", "scaled_cosine"),
]


def _load(path, **kw) -> MSAModel:
    return MSAModel.from_pretrained(path, device="cpu", **kw)


# ---- msa_config ------------------------------------------------------------------------------


def test_missing_keys_take_the_reference_defaults():
    cfg = read_msa_config({"router_layer_idx": "2,3", "decouple_router": None})
    assert cfg["doc_top_k"] == 16 and cfg["pooling_kernel_size"] == 2 and cfg["head_reduce_method"] == "max"
    assert cfg["decouple_router"] is False and cfg["aux_loss_method"] == "INFONCE"
    assert read_msa_config(None) == MSA_CONFIG_DEFAULTS
    assert read_msa_config({"custom_key": 7})["custom_key"] == 7  # unknown keys survive a re-save
    assert read_msa_config({"decouple_router": "true"})["decouple_router"] is True


@pytest.mark.parametrize("bad", [{"head_reduce_method": "sum"}, {"aux_loss_method": "infonce"},
                                 {"pooling_kernel_size": 0}, {"doc_top_k": "many"}, {"decouple_router": "maybe"}])
def test_bad_msa_config_values_are_named(bad):
    key = next(iter(bad))
    with pytest.raises(ModelLoadError, match=key):
        read_msa_config(bad)


def test_router_layers_parse_like_the_reference():
    assert parse_router_layers("all", 4) == [0, 1, 2, 3]
    assert parse_router_layers("18,19,20", 36) == [18, 19, 20]
    assert parse_router_layers(" 3, 2 ,", 4) == [2, 3]
    assert parse_router_layers([3, 2], 4) == [2, 3] and parse_router_layers(1, 4) == [1]
    with pytest.raises(ModelLoadError, match="outside"):
        parse_router_layers("2,9", 4)
    with pytest.raises(ModelLoadError, match="no layer"):
        parse_router_layers("", 4)
    with pytest.raises(ModelLoadError, match="comma list"):
        parse_router_layers("2;3", 4)


@pytest.mark.parametrize("decouple,aux,expected", VARIANTS + [(True, "BCE", "scaled_dot"),
                                                            (True, "INFONCE_FOCAL", "scaled_dot")])
def test_normalisation_follows_the_exact_aux_loss_string(decouple, aux, expected):
    assert normalization_for(aux, decouple) == expected


def test_engine_config_maps_every_setting():
    msa = read_msa_config({"router_layer_idx": "18,19", "decouple_router": True, "pooling_kernel_size": 64,
                           "head_reduce_method": "mean", "aux_loss_method": "INFONCE_DECOUPLE"})
    cfg = engine_config(msa, 36, max_doc_tokens=262144)
    r = cfg.routing
    assert (r.layers, r.top_k, r.head_reduce, r.query_reduce, r.chunk_reduce, r.normalization) == (
        [18, 19], 16, "mean", "max", "max", "scaled_dot")
    assert cfg.encode.chunk_size == 64 and cfg.encode.max_doc_tokens == 262144 and cfg.profile == "reference"


# ---- loading -----------------------------------------------------------------------------------


@pytest.mark.parametrize("decouple,aux,normalization", VARIANTS)
def test_load_encode_route_generate(tiny_msa_dir, decouple, aux, normalization):
    path = tiny_msa_dir(decouple=decouple, aux=aux)
    assert is_msa_checkpoint(path)
    model = _load(path)
    assert model.profile == "reference" and model.layers == [2, 3]
    assert model.config.routing.top_k == 2 and model.config.encode.chunk_size == 4
    assert model.config.routing.normalization == normalization
    assert isinstance(model.router, AttentionRouter) != decouple
    bank = model.index(DOCS, ids=["a", "b", "c", "d"])
    hits = model.retrieve(QUESTION, bank, k=4, layer_scores=True)
    assert sorted(h.id for h in hits) == ["a", "b", "c", "d"]
    assert all(0.0 <= h.relevance_score <= 1.0 for h in hits)
    answer = model.answer(QUESTION, bank, max_new_tokens=4)
    assert answer.finish_reason in {"length", "eos"}
    assert all(len(ids) == 2 for ids in answer.layer_selections.values())
    if not decouple:  # routing keys are the pooled attention keys themselves
        assert torch.equal(bank.kr_bar, bank.k_bar)


def test_router_tensors_load_under_the_reference_names(tiny_msa_dir):
    path = tiny_msa_dir()
    model = _load(path)
    stored = load_file(str(path / "model.safetensors"))
    for name, t in model.router.state_dict_msa().items():
        assert torch.equal(t, stored[name])
    assert model.router.layers == [2, 3] and "temperature" in stored  # the root scalar is ignored


def test_attention_router_queries_are_the_rotated_attention_queries(tiny_msa_dir):
    model = _load(tiny_msa_dir(decouple=False))
    bb = model.backbone
    x = torch.randn(2, 5, bb.args.hidden_size)
    pos = torch.arange(7, 12).expand(2, 5)
    cos, sin = bb.rotary(pos, x.dtype)
    q_attention = bb.layers[3].self_attn.project(x, cos, sin)[0].transpose(1, 2)
    assert torch.allclose(model.router.project_queries(3, x, pos), q_attention, atol=1e-6)


def test_scaled_cosine_is_cosine_over_sqrt_head_dim(tiny_msa_dir):
    path = tiny_msa_dir(decouple=False, aux="INFONCE")
    ref = _load(path)
    cos = _load(path, config={"routing": {"normalization": "cosine"}})
    bank = ref.index(DOCS, ids=["a", "b", "c", "d"])
    bank2 = cos.index(DOCS, ids=["a", "b", "c", "d"])
    s_ref = {h.id: h.score for h in ref.retrieve(QUESTION, bank, k=4)}
    s_cos = {h.id: h.score for h in cos.retrieve(QUESTION, bank2, k=4)}
    d = ref.backbone.args.head_dim
    for doc, s in s_cos.items():
        assert s_ref[doc] == pytest.approx(s / math.sqrt(d), abs=1e-5)


def test_dropped_keys_default_and_doc_top_k_is_16(tiny_msa_dir):
    model = _load(tiny_msa_dir(drop=("doc_top_k", "head_reduce_method", "query_reduce_method")))
    assert model.config.routing.top_k == 16 and model.config.routing.head_reduce == "max"
    assert model.msa_config["doc_top_k"] == 16


def test_user_config_and_profile_override_the_checkpoint(tiny_msa_dir):
    path = tiny_msa_dir()
    model = _load(path, config={"routing": {"top_k": 3}}, profile="default")
    assert model.config.routing.top_k == 3 and model.config.encode.chunk_size == 4
    assert model.profile == "default" and model.reference is None
    with pytest.raises(ModelLoadError, match="cover layers"):
        _load(path, config={"routing": {"layers": [1, 3]}})
    with pytest.raises(InvalidInputError, match="profile"):
        _load(path, profile="paper")


def test_decoupled_checkpoint_without_router_tensors_is_refused(tiny_msa_dir, tmp_path):
    import shutil

    folder = tmp_path / "broken"
    shutil.copytree(tiny_msa_dir(decouple=False), folder)
    raw = json.loads((folder / "config.json").read_text())
    raw["msa_config"]["decouple_router"] = True
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ModelLoadError, match="no router projector"):
        _load(folder)


def test_hub_id_offline_says_to_pass_a_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match="local folder"):
        MSAModel.from_pretrained("EverMind-AI/MSA-4B", device="cpu")


def test_bank_of_one_profile_is_refused_by_the_other(tiny_msa_dir):
    path = tiny_msa_dir()
    bank = _load(path).index(DOCS[:2], ids=["a", "b"])
    with pytest.raises(InvalidInputError, match="profile"):
        _load(path, profile="default").retrieve(QUESTION, bank)


# ---- saving ----------------------------------------------------------------------------------


def _state(model: MSAModel) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.backbone.state_dict().items() if not k.startswith("rotary")}


def _assert_same_model(a: MSAModel, b: MSAModel) -> None:
    assert b.backbone.args == a.backbone.args
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert b.backbone_fingerprint == a.backbone_fingerprint and b.router_fingerprint == a.router_fingerprint
    assert b.config == a.config and b.layers == a.layers and b.eos_ids == a.eos_ids
    assert b.tokenizer("[3]. <|im_start|>x<|object_ref_end|>")["input_ids"] == \
        a.tokenizer("[3]. <|im_start|>x<|object_ref_end|>")["input_ids"]


@pytest.mark.parametrize("decouple,aux", [(True, "INFONCE_DECOUPLE"), (False, "INFONCE")])
def test_msa_checkpoint_round_trip_is_exact(tiny_msa_dir, tmp_path, decouple, aux):
    model = _load(tiny_msa_dir(decouple=decouple, aux=aux))
    out = model.save_pretrained(tmp_path / "saved")
    again = _load(out)
    _assert_same_model(model, again)
    assert again.msa_config == model.msa_config and again.profile == "reference"
    raw = json.loads((out / "config.json").read_text())
    assert raw["model_type"] == "msa" and raw["architectures"] == ["MSAForCausalLM"]
    assert raw["msa_config"]["router_layer_idx"] == "2,3" and raw["msa_config"]["decouple_router"] is decouple
    assert set(MSA_CONFIG_DEFAULTS) <= set(raw["msa_config"]) and "base_model_type" not in raw
    assert raw["rope_theta"] == model.backbone.args.rope.theta  # transformers 4.51 reads this one
    names = set(load_file(str(out / "model.safetensors")))
    routers = {n for n in names if "router_" in n}
    assert routers == (set(model.router.state_dict_msa()) if decouple else set())
    assert all(n.startswith("model.") for n in names)  # tied lm_head is not written
    bank_a = model.index(DOCS, ids=list("abcd"))
    bank_b = again.index(DOCS, ids=list("abcd"))
    ranked = [h.id for h in model.retrieve(QUESTION, bank_a, k=4)]
    assert ranked == [h.id for h in again.retrieve(QUESTION, bank_b, k=4)]


def test_our_llama_model_with_a_router_saves_in_msa_format(tiny_model_dir, tmp_path):
    cfg = MSAConfig(routing={"layers": [2, 3], "top_k": 3, "layer_aggregate": "max"},
                    encode={"chunk_size": 8, "batch_size": 5})
    model = MSAModel.from_pretrained(tiny_model_dir("llama"), router="random", config=cfg, device="cpu")
    out = model.save_pretrained(tmp_path / "llama-msa")
    raw = json.loads((out / "config.json").read_text())
    assert raw["base_model_type"] == "llama" and raw["msa_config"]["decouple_router"] is True
    assert raw["msa_config"]["aux_loss_method"] == "INFONCE"  # cosine with projectors
    assert raw["msa_config"]["pooling_kernel_size"] == 8 and raw["msa_config"]["doc_top_k"] == 3
    again = _load(out)
    _assert_same_model(model, again)
    assert again.profile == "default" and again.backbone.args.family == "llama"
    assert again.config.routing.layer_aggregate == "max" and again.config.encode.batch_size == 5
    bank = model.index(DOCS, ids=list("abcd"))
    again.check_bank(bank)  # same fingerprints: banks built before the save stay valid
    scores = [h.score for h in model.retrieve(QUESTION, bank, k=4)]
    assert [h.score for h in again.retrieve(QUESTION, bank, k=4)] == scores


def test_colbert_routing_is_not_written_as_the_msa_format(tiny_model_dir, tmp_path):
    """The MSA format (the authors' code) knows Eq. 2 only: a model routing in ColBERT order says so."""
    cfg = MSAConfig(routing={"layers": [2, 3], "query_reduce": "colbert"}, encode={"chunk_size": 8})
    model = MSAModel.from_pretrained(tiny_model_dir("llama"), router="random", config=cfg, device="cpu")
    with pytest.raises(InvalidInputError, match="colbert"):
        model.save_pretrained(tmp_path / "late-msa")
    assert not (tmp_path / "late-msa" / "config.json").exists()


def test_sharded_save_loads_back(tiny_msa_dir, tmp_path):
    from msa_core.checkpoints.msa_save import save_msa

    model = _load(tiny_msa_dir())
    folder = save_msa(model, tmp_path / "sharded", max_shard_bytes=100_000)
    assert len(list(folder.glob("model-*-of-*.safetensors"))) > 1
    assert (folder / "model.safetensors.index.json").is_file() and not (folder / "model.safetensors").exists()
    _assert_same_model(model, _load(folder))
    folder = save_msa(model, folder)  # saving again into the folder replaces every weight file
    assert [p.name for p in folder.glob("*.safetensors")] == ["model.safetensors"]
    _assert_same_model(model, _load(folder))


def test_bf16_save(tiny_msa_dir, tmp_path):
    model = _load(tiny_msa_dir())
    out = model.save_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    raw = json.loads((out / "config.json").read_text())
    assert raw["torch_dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in load_file(str(out / "model.safetensors")).values())
    assert _load(out, dtype=torch.bfloat16).backbone.dtype == torch.bfloat16
    with pytest.raises(InvalidInputError, match="format"):
        model.save_pretrained(tmp_path / "x", format="gguf")


@pytest.mark.integration
def test_default_model_round_trips_in_msa_format(tmp_path):
    """SmolLM2 (Llama) with its shipped trained router: saved as MSA, loaded back identical, default profile kept."""
    model = MSAModel.from_pretrained("default", device="cpu")
    out = model.save_pretrained(tmp_path / "smollm2-msa")
    raw = json.loads((out / "config.json").read_text())
    assert raw["base_model_type"] == "llama"
    assert raw["msa_config"]["router_layer_idx"] == ",".join(str(i) for i in model.layers)
    again = _load(out)
    assert again.backbone_fingerprint == model.backbone_fingerprint
    assert again.router_fingerprint == model.router_fingerprint and again.config == model.config
    assert again.profile == "default" and again.eos_ids == model.eos_ids
    for (name, want), got in zip(model.generator.state_dict().items(), again.generator.state_dict().values()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)  # base weights, unmerged
