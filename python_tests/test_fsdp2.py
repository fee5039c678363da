"""FSDP2 (``torch.distributed.fsdp.fully_shard``) training with sparse adapters: two CPU processes (gloo) end
where one process training on both ranks' batches ends, and ``save_adapters`` called on every rank of the
sharded model (it gathers the shards; rank 0 writes) gives a checkpoint that loads into a plain model.

Runs like ``test_ddp_two_processes_gloo`` (test_integration.py): spawned workers end with ``os._exit`` (torch's
gloo teardown can deadlock on the GIL), under a watchdog.
"""
import os

import pytest
import torch

import sparseadapter_kernels as sak
from sparseadapter_kernels import integration
from sparseadapter_kernels.integration import SparseAdapterConfig, add_sparse_adapters

from test_integration import batch, build, run_gloo

transformers = pytest.importorskip("transformers")

STEPS, LR = 3, 1e-2
CONFIG = dict(preset="houlsby", sparsity=0.8, method="rand", seed=3)


def adapted():
    model = build("bert")  # same seed on every rank: same base, adapters and masks
    add_sparse_adapters(model, SparseAdapterConfig(**CONFIG))
    add_sparse_adapters(model, SparseAdapterConfig("lora", sparsity=0.5, method="rand", seed=4), adapter_name="b")
    sak.set_adapter(model, ["default", "b"])  # both train
    return model


def rank_batch(step, rank):
    return batch("bert", seed=1000 + 10 * step + rank)


def _train(rank, world, port, out_dir):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    model = adapted()
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.bert.encoder.layer:  # each layer with its adapters, then the root (embeddings, head)
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    values = model.bert.encoder.layer[0].output.dense.adapter.down.values
    assert type(values).__name__ == "DTensor", type(values)  # the kept values are sharded, the indices are not
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    model.train()
    for step in range(STEPS):
        loss = model(**rank_batch(step, rank)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    sak.save_adapters(model, os.path.join(out_dir, "adapters"))  # on every rank: gathers; rank 0 writes
    dist.barrier()
    return model, opt


def test_fsdp2_two_processes_match_one_process_and_save_from_shards(tmp_path):
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        pytest.skip("torch.distributed.fsdp.fully_shard (FSDP2) is not available")
    run_gloo(_train, tmp_path, "FSDP2")
    # one process, both ranks' batches: FSDP2 averages the two ranks' gradients, so does the mean of the losses
    ref = adapted()
    opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=LR)
    ref.train()
    for step in range(STEPS):
        loss = (ref(**rank_batch(step, 0)).loss + ref(**rank_batch(step, 1)).loss) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
    ref.eval()
    init = adapted()
    for name in ("default", "b"):
        loaded = build("bert")
        sak.load_adapters(loaded, str(tmp_path / "adapters" / ("" if name == "default" else name)))
        got = integration.checkpoint._state(loaded, "default")[0]  # loaded alone, as "default"
        want = integration.checkpoint._state(ref, name)[0]
        assert got.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=2e-6, rtol=1e-5, msg=f"{name}: {k}")
        before = integration.checkpoint._state(init, name)[0]
        assert all(not torch.equal(got[k], before[k]) for k in want if k.endswith("values"))  # it trained
