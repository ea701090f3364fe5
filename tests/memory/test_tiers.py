"""Storage tiers of MemoryBank: K/V kept with the routing tensors, in host memory or memory-mapped from disk."""

import json
import sys
from pathlib import Path

import pytest
import torch

from msa_core.config import EncodeConfig, MSAConfig
from msa_core.errors import CorruptBankError, InvalidInputError
from msa_core.memory.bank import MemoryBank
from msa_core.memory.encoded import EncodedDocuments

LAYERS = [1, 3]
H, D = 2, 4
TENSORS = ("k_bar", "v_bar", "kr_bar")
INDEX = ("chunk_doc", "chunk_offsets", "chunk_counts")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def make_bank(dtype="bfloat16"):
    config = MSAConfig(encode=EncodeConfig(storage_dtype=dtype, chunk_size=8))
    return MemoryBank(layers=LAYERS, kv_heads=H, head_dim=D, config=config,
                      backbone_fingerprint="bb" * 20, router_fingerprint="rt" * 20, model_name="tiny")


def encoded(*docs, seed=0):
    """EncodedDocuments of whole documents, each given as (id, n_chunks, metadata)."""
    g = torch.Generator().manual_seed(seed)
    n_chunks = [c for _, c, _ in docs]
    shape = (len(LAYERS), sum(n_chunks), H, D)
    k, v, kr = (torch.randn(shape, generator=g) for _ in range(3))
    return EncodedDocuments(ids=[i for i, _, _ in docs], parent_ids=[i for i, _, _ in docs],
                            texts=[f"text of {i}" for i, _, _ in docs], metadatas=[m for _, _, m in docs],
                            n_tokens=[c * 8 for c in n_chunks], n_chunks=n_chunks, layers=LAYERS,
                            k_bar=k, v_bar=v, kr_bar=kr, part_index=[0] * len(docs))


@pytest.fixture
def bank():
    b = make_bank()
    b.add(encoded(("a", 2, {"lang": "en"}), ("b", 3, {"lang": "fr"}), ("c", 1, {})))
    return b


def state(bank):
    return {n: getattr(bank, n).cpu().clone() for n in (*TENSORS, *INDEX)}, bank.docstore, bank.ids()


def assert_state_equal(a, b):
    (ta, da, ia), (tb, db, ib) = a, b
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and torch.equal(ta[name], tb[name]), name
    assert da == db and ia == ib


def test_disk_tier_gives_the_same_retrieval_inputs(tmp_path, bank):
    bank.save(tmp_path)
    disk = MemoryBank.load(tmp_path, kv="disk")
    assert (disk.kv_tier, disk.kv_device, disk.kv_pinned, disk.device) == ("disk", torch.device("cpu"), False,
                                                                           torch.device("cpu"))
    assert_state_equal(state(disk), state(bank))
    chunks = torch.tensor([5, 0, 3, 3, 1])  # any order, repeats allowed
    for li in range(len(LAYERS)):
        k, v = disk.gather_kv(li, chunks, "cpu", torch.bfloat16)
        assert torch.equal(k, bank.k_bar[li][chunks]) and torch.equal(v, bank.v_bar[li][chunks])
        k32, _ = disk.gather_kv(li, chunks, torch.device("cpu"), torch.float32)
        assert k32.dtype == torch.float32 and torch.equal(k32, bank.k_bar[li][chunks].float())
    k0, v0 = disk.gather_kv(0, torch.tensor([], dtype=torch.long), "cpu", torch.float32)
    assert k0.shape == v0.shape == (0, H, D)
    info = disk.info()
    assert (info["kv_tier"], info["kv_device"], info["kv_pinned"]) == ("disk", "cpu", False)
    assert "kv=disk" in repr(disk)


def _mapping_of(address: int) -> str | None:
    """Path of the file mapped at `address` in this process (None: anonymous memory)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if lo <= address < hi:
            return fields[5] if len(fields) == 6 and fields[5].startswith("/") else None
    return None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_disk_tier_maps_the_file_instead_of_reading_it(tmp_path, bank):
    vdir = bank.save(tmp_path)
    tensors_file = str((vdir / "tensors.safetensors").resolve())
    disk = MemoryBank.load(tmp_path, kv="disk")
    for name in ("k_bar", "v_bar"):
        assert _mapping_of(getattr(disk, name).data_ptr()) == tensors_file, name
    # The same probe finds other memory for tensors copied into RAM (anonymous, or /dev/zero where CUDA
    # pins them), so the check can fail. (Not contrasted with load_file: safetensors >= 0.4 maps CPU
    # tensors lazily too, so kv="same" on CPU is also file-backed; the disk tier makes that a guarantee
    # and adds it for GPU routing.)
    assert _mapping_of(MemoryBank.load(tmp_path, kv="host").k_bar.data_ptr()) != tensors_file
    assert _mapping_of(disk.kr_bar.data_ptr()) != tensors_file  # routing keys are always resident


def test_disk_tier_refuses_mutations_but_saves_elsewhere(tmp_path, bank):
    bank.save(tmp_path / "a")
    disk = MemoryBank.load(tmp_path / "a", kv="disk")
    before = state(disk)
    with pytest.raises(InvalidInputError, match="kv='host'"):
        disk.add(encoded(("d", 2, {})))
    with pytest.raises(InvalidInputError, match="kv='host'"):
        disk.add(encoded(("a", 1, {})))  # an upsert too
    with pytest.raises(InvalidInputError, match="kv='host'"):
        disk.delete(["a"])
    assert_state_equal(state(disk), before)
    disk.save(tmp_path / "b")
    assert_state_equal(state(MemoryBank.load(tmp_path / "b")), before)
    editable = disk.to("cpu", kv="host")  # the way to edit: copy into memory
    assert editable.delete(["a"]) == 1 and "a" in disk


def _edit(b):
    b.add(encoded(("d", 2, {"lang": "de"}), seed=1))
    b.add(encoded(("a", 4, {"lang": "en"}), seed=2))  # upsert: a's chunks replaced, a moves to the end
    assert b.delete(["b", "missing"]) == 1
    b.add(encoded(("e", 1, {}), ("f", 2, {}), seed=3))
    b.delete(["c"])


@pytest.mark.parametrize("how", ["to", "load"])
def test_host_tier_mutations_match_a_same_tier_bank(tmp_path, bank, how):
    if how == "to":
        host = bank.to("cpu", kv="host")
    else:
        bank.save(tmp_path)
        host = MemoryBank.load(tmp_path, kv="host")
    assert (host.kv_tier, host.kv_device.type, host.kv_pinned) == ("host", "cpu", torch.cuda.is_available())
    _edit(bank)
    _edit(host)
    assert_state_equal(state(host), state(bank))
    assert (host.kv_tier, host.kv_pinned) == ("host", torch.cuda.is_available())
    assert host.get(["a"])[0]["metadata"] == {"lang": "en"} and host.row_mask({"lang": "de"}).sum() == 1


def test_to_round_trip_copies(bank):
    before = state(bank)
    host = bank.to("cpu", kv="host")
    back = host.to(torch.device("cpu"))
    assert back.kv_tier == "same" and back.kv_pinned is False
    assert_state_equal(state(back), before)
    for name in TENSORS:  # copies, not views of the original
        assert getattr(host, name).data_ptr() != getattr(bank, name).data_ptr()
    host.delete(["a"])
    back.add(encoded(("z", 1, {})))
    assert_state_equal(state(bank), before)
    assert host.config == bank.config and host.backbone_fingerprint == bank.backbone_fingerprint


@pytest.mark.parametrize("saved_from", ["same", "host", "disk"])
def test_save_load_across_tiers_is_bit_identical(tmp_path, bank, saved_from):
    expected = state(bank)
    bank.save(tmp_path / "src")
    source = {"same": bank, "host": bank.to("cpu", kv="host"),
              "disk": MemoryBank.load(tmp_path / "src", kv="disk")}[saved_from]
    source.save(tmp_path / "dst")
    raw = (tmp_path / "src" / "v000001" / "tensors.safetensors").read_bytes()
    assert (tmp_path / "dst" / "v000001" / "tensors.safetensors").read_bytes() == raw
    for kv in ("same", "host", "disk"):
        loaded = MemoryBank.load(tmp_path / "dst", kv=kv)
        assert loaded.kv_tier == kv
        assert_state_equal(state(loaded), expected)


def test_disk_tier_saved_over_its_own_folder(tmp_path, bank):
    """Saving a mapped bank into the folder it maps replaces the mapped version; the map stays valid."""
    bank.save(tmp_path)
    disk = MemoryBank.load(tmp_path, kv="disk")
    disk.save(tmp_path)
    assert_state_equal(state(disk), state(bank))
    assert_state_equal(state(MemoryBank.load(tmp_path, kv="disk")), state(bank))


def test_empty_bank_in_every_tier(tmp_path):
    empty = make_bank("float16")
    empty.save(tmp_path)
    for kv in ("same", "host", "disk"):
        loaded = MemoryBank.load(tmp_path, kv=kv)
        assert loaded.num_chunks == 0 and loaded.k_bar.shape == (len(LAYERS), 0, H, D)
    host = empty.to("cpu", kv="host")
    host.add(encoded(("a", 2, {})))
    assert host.num_chunks == 2 and host.kv_tier == "host"


def test_bad_arguments(tmp_path, bank):
    bank.save(tmp_path)
    for kv in ("gpu", "", None, "HOST"):
        with pytest.raises(InvalidInputError, match=r"kv must be one of \['same', 'host', 'disk'\]"):
            MemoryBank.load(tmp_path, kv=kv)
    with pytest.raises(InvalidInputError, match="kv must be one of"):
        bank.to("cpu", kv="gpu")
    with pytest.raises(InvalidInputError, match=r"load\(path, kv='disk'\)"):
        bank.to("cpu", kv="disk")
    with pytest.raises(InvalidInputError, match="map_location"):
        MemoryBank.load(tmp_path, map_location="nodevice", kv="host")
    with pytest.raises(InvalidInputError, match="is not a device"):
        bank.to("nodevice")
    chunks = torch.tensor([0, 1])
    for li in (-1, 2, 1.0, True, "1"):
        with pytest.raises(InvalidInputError, match="layer_index"):
            bank.gather_kv(li, chunks, "cpu", torch.float32)
    for bad in ([0, 1], torch.tensor([[0]]), torch.tensor([0.0]), torch.tensor([True])):
        with pytest.raises(InvalidInputError, match="1-D integer tensor"):
            bank.gather_kv(0, bad, "cpu", torch.float32)
    for bad in (torch.tensor([6]), torch.tensor([-1])):
        with pytest.raises(InvalidInputError, match="out of range"):
            bank.gather_kv(0, bad, "cpu", torch.float32)
    with pytest.raises(InvalidInputError, match="dtype"):
        bank.gather_kv(0, chunks, "cpu", torch.long)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_cuda_is_a_clear_error(tmp_path, bank):
    bank.save(tmp_path)
    with pytest.raises(InvalidInputError, match="CUDA device this machine does not have"):
        MemoryBank.load(tmp_path, map_location="cuda", kv="host")
    with pytest.raises(InvalidInputError, match="CUDA device"):
        bank.to("cuda")
    with pytest.raises(InvalidInputError, match="CUDA device"):
        bank.gather_kv(0, torch.tensor([0]), "cuda", torch.float32)


def test_disk_tier_rejects_a_truncated_tensors_file(tmp_path, bank):
    vdir = bank.save(tmp_path)
    path = vdir / "tensors.safetensors"
    path.write_bytes(path.read_bytes()[:-16])
    with pytest.raises(CorruptBankError, match="tensors.safetensors"):
        MemoryBank.load(tmp_path, kv="disk")


@pytest.mark.parametrize("damage", ["header_length", "header_json", "offsets", "dtype"])
def test_disk_tier_rejects_a_bad_header_even_with_matching_checksums(tmp_path, bank, damage):
    """The mapper's own checks, for a file whose manifest was rewritten to match it."""
    vdir = bank.save(tmp_path)
    path = vdir / "tensors.safetensors"
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    if damage == "header_length":
        raw = (len(raw) * 2).to_bytes(8, "little") + raw[8:]
    elif damage == "header_json":
        raw = raw[:8] + b"{" * n + raw[8 + n:]
    else:
        if damage == "offsets":
            header["k_bar"]["data_offsets"][1] += 2
        else:
            header["k_bar"]["dtype"] = "I64"
        text = json.dumps(header, separators=(",", ":")).encode().ljust(n)
        assert len(text) == n
        raw = raw[:8] + text + raw[8 + n:]
    path.write_bytes(raw)
    import hashlib
    manifest = json.loads((vdir / "manifest.json").read_text())
    manifest["files"]["tensors.safetensors"] = {"sha256": hashlib.sha256(raw).hexdigest(), "size": len(raw)}
    (vdir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptBankError, match="tensors.safetensors"):
        MemoryBank.load(tmp_path, kv="disk")


# ---- GPU: pinned host tier feeding CUDA -------------------------------------------------------
@cuda
def test_cpu_built_bank_loads_on_cuda_with_a_pinned_host_tier(tmp_path, bank):
    bank.save(tmp_path)
    gpu = MemoryBank.load(tmp_path, map_location="cuda", kv="host")
    assert gpu.device.type == "cuda" and gpu.kr_bar.device.type == "cuda" and gpu.chunk_doc.device.type == "cuda"
    assert gpu.k_bar.device.type == "cpu" and gpu.k_bar.is_pinned() and gpu.v_bar.is_pinned() and gpu.kv_pinned
    assert torch.equal(gpu.kr_bar.cpu(), bank.kr_bar)
    chunks = torch.tensor([4, 1, 1, 0], device="cuda")
    for li in range(len(LAYERS)):
        k, v = gpu.gather_kv(li, chunks, "cuda", torch.float32)
        assert k.device.type == "cuda" and k.dtype == torch.float32
        assert torch.equal(k.cpu(), bank.k_bar[li][chunks.cpu()].float())
        assert torch.equal(v.cpu(), bank.v_bar[li][chunks.cpu()].float())
    _edit(gpu)
    _edit(bank)
    assert gpu.k_bar.is_pinned() and gpu.kr_bar.device.type == "cuda"
    assert_state_equal(state(gpu), state(bank))


@cuda
def test_disk_tier_gathers_onto_cuda(tmp_path, bank):
    bank.save(tmp_path)
    disk = MemoryBank.load(tmp_path, map_location="cuda", kv="disk")
    assert disk.kr_bar.device.type == "cuda" and disk.k_bar.device.type == "cpu"
    chunks = torch.tensor([5, 2], device="cuda")
    k, _ = disk.gather_kv(1, chunks, "cuda", torch.bfloat16)
    assert k.device.type == "cuda" and torch.equal(k.cpu(), bank.k_bar[1][[5, 2]])


@cuda
def test_cuda_bank_moves_to_cpu_and_back(bank):
    gpu = bank.to("cuda")
    assert gpu.k_bar.device.type == gpu.kr_bar.device.type == gpu.chunk_counts.device.type == "cuda"
    k, _ = gpu.gather_kv(0, torch.tensor([1, 3]), "cpu", torch.float32)
    assert k.device.type == "cpu" and torch.equal(k, bank.k_bar[0][[1, 3]].float())
    cpu = gpu.to("cpu")
    assert cpu.k_bar.device.type == cpu.kr_bar.device.type == "cpu"
    assert_state_equal(state(cpu), state(bank))
    host = gpu.to("cuda", kv="host")
    assert host.k_bar.is_pinned() and host.kr_bar.device.type == "cuda"
    assert_state_equal(state(host), state(bank))


@pytest.mark.parametrize("kv", ["host", "disk"])
def test_a_shard_cut_from_any_tier_matches(tmp_path, bank, kv):
    from msa_core.distributed import ShardedBank

    bank.save(tmp_path)
    tiered = MemoryBank.load(tmp_path, kv=kv)
    for rank in range(2):
        a, b = ShardedBank.from_bank(bank, rank, 2).local, ShardedBank.from_bank(tiered, rank, 2).local
        assert b.kv_tier == "same"
        assert_state_equal(state(b), state(a))
