"""AdapterPool: many adapters resident in compact storage (int16 columns and row lengths), served by name in mixed
batches and generate; equal to the same adapters loaded as modules (forward and tokens), heads per row, bytes
counted, lazy loading, memory limit, and clear errors for names, lengths, shapes and sites."""
import threading

import pytest
import torch

import sparseadapter_kernels as sak
from sparseadapter_kernels.integration import add_sparse_adapters, load_adapters, save_adapters
from sparseadapter_kernels.integration.pool import AdapterPool

from test_adapters_workflow import build, cfg, inputs, randomize

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Four saved houlsby and four saved LoRA adapters of the tiny BERT (distinct random weights and heads)."""
    root = tmp_path_factory.mktemp("pooled")
    out = {}
    for preset in ("houlsby", "lora"):
        for i in range(4):
            model = build("bert", seed=0)
            add_sparse_adapters(model, cfg(preset, seed=i))
            randomize(model, seed=10 * i + (preset == "lora"))
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if "classifier" in n and p.requires_grad:
                        p.add_(0.1 * (i + 1))
            path = str(root / f"{preset}{i}")
            save_adapters(model, path)
            out[f"{preset}{i}"] = path
    return out


def serving(saved, preset, lazy=False, **kw):
    """A model holding the first adapter as a module (its sites serve the pool) and the others pooled."""
    model = load_adapters(build("bert", seed=0), saved[f"{preset}0"], adapter_name=f"{preset}0").eval()
    pool = AdapterPool(model, **kw)
    for i in range(1, 4):
        pool.add(f"{preset}{i}", saved[f"{preset}{i}"], lazy=lazy)
    return model, pool


def alone(saved, name, b):
    model = load_adapters(build("bert", seed=0), saved[name]).eval()
    with torch.no_grad():
        return model(**b).logits


@pytest.mark.parametrize("preset", ("houlsby", "lora"))
@pytest.mark.parametrize("lazy", (False, True))
def test_pooled_adapters_equal_each_request_alone(saved, preset, lazy):
    model, pool = serving(saved, preset, lazy=lazy)
    names = [f"{preset}3", f"{preset}1", "__base__", f"{preset}0", f"{preset}2", f"{preset}1"]
    b = inputs("bert", bsz=len(names), pad=True)
    with torch.no_grad():
        mixed = model(**b, adapter_names=names).logits
        base = build("bert", seed=0).eval()(**b).logits
    for i, name in enumerate(names):
        row = {k: v[i:i + 1] for k, v in b.items()}
        want = base[i:i + 1] if name == "__base__" else alone(saved, name, row)
        torch.testing.assert_close(mixed[i:i + 1], want, atol=2e-6, rtol=1e-5, msg=name)
    assert pool.stats()["resident"] == 3


def test_bytes_are_counted_and_compact(saved):
    model, pool = serving(saved, "houlsby")
    st = pool.stats()
    held = sum(t.numel() * t.element_size() for e in pool._entries.values() for p in e.parts.values()
               for t in p[:8] if t is not None)
    heads = sum(p.numel() * p.element_size() for e in pool._entries.values() for h in e.heads.values()
                for p in h.parameters())
    assert st["bytes"] == held + heads == pool.nbytes()
    for e in pool._entries.values():
        for p in e.parts.values():
            assert p.down_cols.dtype == p.up_cols.dtype == torch.int16
            assert p.down_rows.dtype == p.up_rows.dtype == torch.int16
    lins = sak.integration._adapter_sparse_linears(model).values()  # the module form of the same adapter
    module_bytes = sum(t.numel() * t.element_size() for lin in lins for t in [*lin.parameters(), *lin.buffers()])
    assert st["bytes_per_kept_value"] < module_bytes / sum(lin.nnz for lin in lins)


def test_add_from_model_and_remove(saved):
    model = load_adapters(build("bert", seed=0), saved["houlsby0"]).eval()
    load_adapters(model, saved["houlsby1"], adapter_name="h1")
    pool = AdapterPool(model)
    pool.add_from_model("copy1", "h1")
    b = inputs("bert", bsz=2)
    with torch.no_grad():
        got = model(**b, adapter_names=["copy1", "h1"]).logits
        want = model(**b, adapter_names=["h1", "h1"]).logits
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    pool.remove("copy1")
    assert "copy1" not in pool and len(pool) == 0
    with pytest.raises(ValueError, match="unknown adapter 'copy1'"):
        model(**b, adapter_names=["copy1", "h1"])
    with pytest.raises(ValueError, match="no pooled adapter 'zz'"):
        pool.remove("zz")


def test_errors(saved, tmp_path):
    model, pool = serving(saved, "houlsby")
    b = inputs("bert", bsz=2)
    with pytest.raises(ValueError, match=r"adapter_names: unknown adapter 'nope'"):
        model(**b, adapter_names=["nope", "houlsby1"])
    with pytest.raises(ValueError, match=r"got 3 adapter names for a batch of 2"):
        model(**b, adapter_names=["houlsby1"] * 3)
    with pytest.raises(ValueError, match="already an adapter of this model or pool"):
        pool.add("houlsby1", saved["houlsby1"])
    with pytest.raises(ValueError, match="already an adapter of this model or pool"):
        pool.add("houlsby0", saved["houlsby1"])
    with pytest.raises(ValueError, match="where this model holds no adapter site"):
        pool.add("l", saved["lora1"])  # LoRA sites: the model holds only houlsby ones
    with pytest.raises(ValueError, match="already has an AdapterPool"):
        AdapterPool(model)
    other = build("bert", seed=0, width=48)
    add_sparse_adapters(other, cfg("houlsby"))
    with pytest.raises(ValueError, match="different architecture"):
        AdapterPool(other).add("x", saved["houlsby1"])
    small = load_adapters(build("bert", seed=0), saved["houlsby0"])
    limited = AdapterPool(small, memory_limit=pool.nbytes("houlsby1") + 10)
    limited.add("a", saved["houlsby1"])
    with pytest.raises(MemoryError, match=r"above memory_limit=.*nothing was added"):
        limited.add("b", saved["houlsby2"])
    assert limited.names() == ["a"]


def test_threads_serve_one_pool(saved):
    model, pool = serving(saved, "lora")
    names = ["lora1", "lora2", "lora3", "lora0"]
    b = inputs("bert", bsz=4)
    with torch.no_grad():
        want = model(**b, adapter_names=names).logits
    results, barrier = [], threading.Barrier(4)

    def worker(k):
        order = names[k:] + names[:k]
        perm = [names.index(n) for n in order]
        barrier.wait()
        for _ in range(10):
            with torch.no_grad():
                got = model(**{kk: v[perm] for kk, v in b.items()}, adapter_names=order).logits
            results.append(torch.allclose(got, want[perm], atol=1e-6, rtol=1e-5))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 40 and all(results)


def test_unload_drops_the_pool(saved):
    model, pool = serving(saved, "houlsby")
    sak.unload(model)  # the sites are gone, and the pool with them
    add_sparse_adapters(model, cfg("houlsby"), adapter_name="again")
    with pytest.raises(ValueError, match="unknown adapter 'houlsby1'"):
        with torch.no_grad():
            model(**inputs("bert", bsz=2), adapter_names=["houlsby1", "again"])


def test_replaced_site_is_refused(saved):
    model, pool = serving(saved, "houlsby")
    site = next(m for m in model.modules() if type(m).__name__ == "SequentialAdapterLayer")
    pool._sites[id(site)] = lambda: None  # as if that site object had been replaced since pooling
    with pytest.raises(RuntimeError, match="adapter sites changed since"):
        with torch.no_grad():
            model(**inputs("bert", bsz=2), adapter_names=["houlsby1", "houlsby0"])


def test_generate_with_pooled_adapters(tmp_path):
    def llama(seed=0):
        torch.manual_seed(seed)
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)).eval()

    paths = []
    for i in range(3):
        m = llama()
        add_sparse_adapters(m, sak.SparseAdapterConfig("lora", sparsity=0.5, method="rand", seed=i))
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for lin in sak.integration._adapter_sparse_linears(m).values():
                lin.values.copy_(torch.randn(lin.values.shape, generator=g))
        paths.append(str(tmp_path / f"l{i}"))
        save_adapters(m, paths[-1])
    model = load_adapters(llama(), paths[0]).eval()
    pool = AdapterPool(model)
    pool.add("p1", paths[1])
    pool.add("p2", paths[2])
    ids = torch.randint(1, 64, (3, 5), generator=torch.Generator().manual_seed(5))
    names = ["p2", "default", "p1"]
    out = model.generate(ids, attention_mask=torch.ones_like(ids), adapter_names=names, max_new_tokens=6,
                         do_sample=False, pad_token_id=0)
    for i, name in enumerate(names):
        solo = load_adapters(llama(), paths[{"default": 0, "p1": 1, "p2": 2}[name]]).eval()
        want = solo.generate(ids[i:i + 1], attention_mask=torch.ones_like(ids[i:i + 1]), max_new_tokens=6,
                             do_sample=False, pad_token_id=0)
        n = want.shape[1]  # a request that ended (EOS) is padded while the others go on
        assert torch.equal(out[i:i + 1, :n], want) and bool((out[i, n:] == 0).all()), name
