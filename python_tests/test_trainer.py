"""Fine-tuning with the Hugging Face ``Trainer`` and its default optimizer (fused AdamW in transformers 5).

A tiny BERT for sequence classification (built from a config, no downloads) gets sparse adapters and is
trained for a few steps on a small synthetic task, once per backend from the same initial state, same
seed and same data order. The kernel runs (``"cpu"``: the C++ kernels, ``"auto"``) must end where the
plain-PyTorch ``"reference"`` run ends (and where a float64 reference run ends), every adapter tensor
must have moved (the fused optimizer writes the values in place: kernels that kept stale prepared
operands left LoRA A frozen), the sparsity structure must be untouched, and the trained adapters must
survive ``save_adapters`` / ``load_adapters`` into a freshly built model bit for bit.
"""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import sparseadapter_kernels as sak
from sparseadapter_kernels import integration

from conftest import assert_close

transformers = pytest.importorskip("transformers")

VOCAB, SEQ, HIDDEN = 100, 16, 64
N_EXAMPLES, BATCH, STEPS, LR = 48, 8, 6, 5e-3
TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])

# Final parameters of a kernel run against a reference run. Adam normalizes its steps (|update| ~ lr),
# so a relative error e in a gradient moves a parameter by at most ~lr * e per step (e / 4 for the
# normalized ratio g / (|g| + eps), even for gradients near eps). One step's gradient error is bounded by
# the fp32 row of the tolerance table (one kernel against float64), and the errors of the STEPS steps add
# up at most linearly (each step also sees the earlier steps' parameter differences): STEPS x TOL[fp32]
# with lr < 1 to spare. Measured: about 1e-7 (cpu / auto vs reference, fp32 and fp64). A wrong or stale
# gradient instead moves a parameter by ~lr = 5e-3 per step, far outside it.
PARAM_SCALE = float(STEPS)

CASES = {
    # preset, config overrides; scope="layer" gives every adapter tensor its share of the weights (global
    # SNIP may leave a LoRA site with one A and one B entry that never meet, a structurally dead adapter)
    "houlsby_csr": dict(preset="houlsby", bottleneck=16, sparsity=0.75),
    "lora_csr": dict(preset="lora", sparsity=0.75),
    "houlsby_bsr": dict(preset="houlsby", bottleneck=16, sparsity=0.5, block_size=(4, 8)),
}


def _require_accelerate():
    """transformers.Trainer needs accelerate: fail (not skip) with the install hint when it is missing."""
    try:
        import accelerate  # noqa: F401
    except ImportError as e:
        from transformers.utils.import_utils import ACCELERATE_MIN_VERSION

        pytest.fail(f"transformers.Trainer needs accelerate>={ACCELERATE_MIN_VERSION}: "
                    f"pip install 'accelerate>={ACCELERATE_MIN_VERSION}' (or pip install -r requirements-dev.txt); "
                    f"import failed with: {e}")


def _require_backend(backend):
    if backend == "cpu" and not sak.backend_status()["cpu"][0]:
        pytest.skip("CPU kernels not built: " + sak.backend_status()["cpu"][1])


def build(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, num_labels=2, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, max_position_embeddings=SEQ)
    return transformers.BertForSequenceClassification(cfg)


def dataset(n=N_EXAMPLES, seed=0):
    """Random token ids; the label is whether the second token is in the upper half of the vocabulary."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, SEQ), generator=g)
    labels = (ids[:, 1] >= (3 + VOCAB) // 2).long()
    mask = torch.ones(SEQ, dtype=torch.long)
    return [dict(input_ids=ids[i], attention_mask=mask, labels=labels[i]) for i in range(n)]


def adapted_model(case):
    model = build()
    data = dataset()
    batches = [transformers.default_data_collator(data[i:i + BATCH]) for i in range(0, 2 * BATCH, BATCH)]
    sak.add_sparse_adapters(model, sak.SparseAdapterConfig(method="snip", scope="layer", **CASES[case]),
                            data=batches)
    return model


def train(model, backend, out_dir):
    """STEPS optimizer steps under transformers.Trainer with its default optimizer; returns the trainer and
    the input ids of every batch it trained on (the data order)."""
    integration.set_adapter_backend(model, backend)
    seen = []

    def collate(features):
        b = transformers.default_data_collator(features)
        seen.append(b["input_ids"].clone())
        return b

    extra = {} if TRANSFORMERS_MAJOR >= 5 else dict(optim="adamw_torch_fused")  # 4.x defaulted to unfused AdamW
    args = transformers.TrainingArguments(
        output_dir=str(out_dir), max_steps=STEPS, per_device_train_batch_size=BATCH, learning_rate=LR, seed=0,
        report_to="none", disable_tqdm=True, logging_strategy="no", save_strategy="no", eval_strategy="no",
        use_cpu=True, dataloader_num_workers=0, **extra)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset(), data_collator=collate)
    trainer.remove_callback(transformers.trainer_callback.PrinterCallback)  # prints the final metrics otherwise
    trainer.train()
    model.eval()
    return trainer, seen


def trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def check_fused_default_optimizer(trainer, model):
    assert trainer.args.optim == "adamw_torch_fused", \
        f"transformers {transformers.__version__}: the Trainer's optim is {trainer.args.optim!r}"
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate's AcceleratedOptimizer wraps it
    assert isinstance(opt, torch.optim.AdamW), type(opt)
    assert opt.defaults.get("fused") is True and all(g["fused"] for g in opt.param_groups), opt.defaults
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in model.parameters() if p.requires_grad}  # it trains exactly the adapters + head


def _dense_of(lin, values):
    """Dense [out, in] map of per-entry ``values`` laid out like ``lin``'s stored entries."""
    return dataclasses.replace(lin.sparse_weight(), values=values).to_dense()


def check_every_adapter_tensor_moved(model, before, init):
    """(a) Every trainable tensor changed, and within the adapters every entry that can get a gradient did.

    An entry can be structurally dead: a down-projection (LoRA A) row feeds a bottleneck unit whose
    up-projection (LoRA B) column was pruned away, so it never gets a gradient. Every other entry of the
    down projection, and every entry of the up projection (its unit gets an input: a kept down-projection
    entry or the trainable down bias), moves within a few Adam steps."""
    for n, p in init.items():
        assert not torch.equal(before[n], p), f"{n} never changed in {STEPS} Trainer steps"
    for site, m in integration.adapter_sites(model).items():
        if isinstance(m, sak.LoRA):
            down, up, down_name, up_name = m.lora_A, m.lora_B, f"{site}.lora_A", f"{site}.lora_B"
        else:
            down, up, down_name, up_name = m.adapter.down, m.adapter.up, f"{site}.adapter.down", f"{site}.adapter.up"
        fed = up.mask().any(0)  # bottleneck units that reach the output
        has_input = down.mask().any(1) | torch.tensor(down.bias is not None)
        live = {down_name: down.mask() & fed[:, None], up_name: up.mask() & has_input[None, :]}
        for name, lin in ((down_name, down), (up_name, up)):
            moved = _dense_of(lin, (before[f"{name}.values"] != init[f"{name}.values"]).to(lin.values.dtype)) != 0
            assert live[name].any(), f"{name}: no entry can train (a degenerate mask; pick another seed/sparsity)"
            stuck = live[name] & ~moved
            assert not stuck.any(), (f"{name}: {int(stuck.sum())} of {int(live[name].sum())} trainable entries "
                                     f"never moved, e.g. at {stuck.nonzero()[:4].tolist()}")


@pytest.mark.parametrize("backend", ["cpu", "auto"])
@pytest.mark.parametrize("case", list(CASES))
def test_trainer_fused_adamw_kernels_match_reference(case, backend, tmp_path):
    _require_accelerate()
    _require_backend(backend)
    base = adapted_model(case)
    init = trainable(base)
    lins = integration._adapter_sparse_linears(base)
    structure = {n: {f: getattr(m, f).clone() for f in ("crow_indices", "col_indices", "row_indices",
                                                          "t_crow_indices", "t_row_indices", "t_perm")}
                 for n, m in lins.items()}
    masks = {n: m.mask().clone() for n, m in lins.items()}
    nnz = {n: m.values.numel() for n, m in lins.items()}
    layout = "bsr" if "block_size" in CASES[case] else "csr"
    assert all(m.layout == layout for m in lins.values())

    runs = {}
    for name, be, dtype in (("kernel", backend, torch.float32), ("reference", "reference", torch.float32),
                            ("reference64", "reference", torch.float64)):
        model = copy.deepcopy(base).to(dtype)
        trainer, seen = train(model, be, tmp_path / name)
        check_fused_default_optimizer(trainer, model)
        runs[name] = (model, trainable(model), seen)
    kernel_model, kernel, kernel_seen = runs["kernel"]

    # the three runs saw the same batches in the same order
    for other in ("reference", "reference64"):
        assert len(runs[other][2]) == len(kernel_seen) == STEPS
        assert all(torch.equal(a, b) for a, b in zip(runs[other][2], kernel_seen)), f"data order differs ({other})"

    # (a) every adapter tensor (every trainable parameter) moved
    check_every_adapter_tensor_moved(kernel_model, kernel, init)

    # (b) the kernel run ends where the reference runs end (fp32 twin, and the float64 oracle)
    assert kernel.keys() == runs["reference"][1].keys() == init.keys()
    for n in kernel:
        assert kernel[n].dtype == torch.float32
        assert_close(kernel[n], runs["reference"][1][n], torch.float32, scale=PARAM_SCALE,
                     msg=f"{case}/{backend}: {n} vs the fp32 reference run")
        assert_close(kernel[n], runs["reference64"][1][n], torch.float32, scale=PARAM_SCALE,
                     msg=f"{case}/{backend}: {n} vs the float64 reference run")

    # (c) the structure is unchanged: same stored entries, same indices, pruned entries exactly zero
    after = integration._adapter_sparse_linears(kernel_model)
    assert after.keys() == lins.keys()
    for n, m in after.items():
        assert m.layout == layout and m.values.numel() == nnz[n], f"{n}: storage changed"
        assert torch.equal(m.mask(), masks[n]), f"{n}: mask changed"
        for f, t in structure[n].items():
            assert torch.equal(getattr(m, f), t), f"{n}.{f} changed"
        assert bool((m.weight.detach()[~masks[n]] == 0).all()), f"{n}: a pruned entry became nonzero"

    # (d) save -> load into a freshly built base model: the same logits in eval mode
    stats = sak.save_adapters(kernel_model, str(tmp_path / "adapters"))
    assert stats["nnz"] == sum(nnz.values())
    fresh = build()
    sak.load_adapters(fresh, str(tmp_path / "adapters"))
    integration.set_adapter_backend(fresh, backend)
    fresh.eval()
    loaded = dict(fresh.named_parameters())
    for n, p in kernel.items():
        assert loaded[n].requires_grad and torch.equal(loaded[n].detach(), p), f"{n} not restored"
    b = transformers.default_data_collator(dataset(16, seed=7))
    with torch.no_grad():
        want = kernel_model(**b).logits
        got = fresh(**b).logits
    assert torch.equal(got, want)
    with torch.no_grad():  # and the loaded model agrees with the reference backend
        integration.set_adapter_backend(fresh, "reference")
        assert_close(fresh(**b).logits, want, torch.float32)
