"""What a PEFT user expects, with PEFT as the oracle where PEFT has the feature: set_adapter / disable while
merged, Trainer resume from adapter-only checkpoints, GPT-2 LoRA export / import (fan_in_fan_out), PEFT's
methods on the model and add_weighted_adapter ("cat" / "linear"), a short robust tune (fake timings, faked
load averages) and auto's tuning hint, and the messages for PEFT / AdapterHub spellings.

Tiny models built from configs (no downloads); no timing is measured.
"""
import copy
import os
import pickle
import re
import warnings

import pytest
import torch
import torch.nn as nn

import sparseadapter_kernels as sak
from sparseadapter_kernels import dispatch, integration, tuning
from sparseadapter_kernels.integration import CONFIG_NAME, WEIGHTS_NAME, SparseAdapterConfig, add_sparse_adapters

from test_adapters_workflow import cfg, inputs, logits, randomize, same_state
from test_integration import build

transformers = pytest.importorskip("transformers")


def lora_pair(r_b=4, alpha_b=16.0):
    """BERT with LoRA adapters "default" (r 4, alpha 8) and "b", no task-head copies, randomized."""
    model = build("bert")
    add_sparse_adapters(model, cfg("lora", r=4, alpha=8.0, modules_to_save=[]))
    add_sparse_adapters(model, cfg("lora", r=r_b, alpha=alpha_b, seed=3, modules_to_save=[]), adapter_name="b")
    randomize(model)
    return model.eval()


def peft_twin(model, tmp_path):
    """The same two adapters in a PeftModel (exported by export_peft_lora)."""
    peft = pytest.importorskip("peft")
    for name in ("default", "b"):
        sak.export_peft_lora(model, str(tmp_path / name), adapter_name=name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's load_adapter names the other adapter's keys as missing
        pm = peft.PeftModel.from_pretrained(build("bert"), str(tmp_path / "default")).eval()
        pm.load_adapter(str(tmp_path / "b"), adapter_name="b")
    return pm


# ---------------------------------------------------------------------------------------------
# 1. set_adapter / disable / enable while merged: PEFT warns and unmerges
# ---------------------------------------------------------------------------------------------
def test_set_adapter_and_disable_while_merged_unmerge_first_like_peft(tmp_path):
    model = lora_pair()
    pm = peft_twin(model, tmp_path)
    b = inputs("bert", pad=True)
    base = logits(build("bert").eval(), b)
    want = {}
    for name in ("default", "b"):
        sak.set_adapter(model, name)
        want[name] = logits(model, b)
    sak.set_adapter(model, "default")
    before = {n: p.clone() for n, p in model.named_parameters()}
    sak.merge_adapter(model)
    pm.set_adapter("default")
    pm.merge_adapter()
    with pytest.warns(UserWarning, match=r"set_adapter: adapters \['default'\] are merged .*Unmerging the model first"):
        sak.set_adapter(model, "b")
    with pytest.warns(UserWarning, match="Adapter cannot be set when the model is merged. Unmerging the model first"):
        pm.set_adapter("b")  # the oracle
    assert integration.adapter_state(model).merged == [] and sak.active_adapters(model) == ["b"]
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # unmerged bit-exact
    assert torch.equal(logits(model, b), want["b"])  # b alone, not default + b
    torch.testing.assert_close(logits(pm, b), want["b"], atol=1e-5, rtol=1e-5)
    # disable_adapter() while merged: unmerged first (warning), the base model inside, b unmerged after (PEFT)
    sak.merge_adapter(model)
    pm.merge_adapter()
    with pytest.warns(UserWarning, match=r"disable_adapter: adapters \['b'\] are merged"):
        with sak.disable_adapter(model):
            assert torch.equal(logits(model, b), base)
    with pm.disable_adapter():
        torch.testing.assert_close(logits(pm, b), base, atol=1e-5, rtol=1e-5)
    assert integration.adapter_state(model).merged == []
    assert torch.equal(logits(model, b), want["b"])
    torch.testing.assert_close(logits(pm, b), want["b"], atol=1e-5, rtol=1e-5)
    # disable_adapters() (every thread) likewise; enable_adapters runs b (unmerged); merging while disabled refuses
    sak.merge_adapter(model)
    with pytest.warns(UserWarning, match=r"disable_adapters: adapters \['b'\] are merged"):
        model.disable_adapters()
    assert torch.equal(logits(model, b), base) and integration.adapter_state(model).merged == []
    with pytest.raises(RuntimeError, match="adapters are disabled"):
        sak.merge_adapter(model)
    model.enable_adapters()
    assert torch.equal(logits(model, b), want["b"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing merged: no warning
        sak.set_adapter(model, "default")
    assert torch.equal(logits(model, b), want["default"])


# ---------------------------------------------------------------------------------------------
# 2. Trainer: resume from adapter-only checkpoints
# ---------------------------------------------------------------------------------------------
def _run(out, steps, resume=None, trainer_cls=None, two=False):
    pytest.importorskip("accelerate")
    from test_trainer import build as build_trainer_model
    from test_trainer import dataset

    model = build_trainer_model()
    add_sparse_adapters(model, SparseAdapterConfig("houlsby", bottleneck=16, sparsity=0.5, method="rand"))
    if two:  # a second adapter, active with the first: its files go to checkpoint-N/b/
        add_sparse_adapters(model, SparseAdapterConfig("lora", sparsity=0.5, method="rand", modules_to_save=[]),
                            adapter_name="b")
        sak.set_adapter(model, ["default", "b"])
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=8, learning_rate=5e-3, seed=0,
        report_to="none", disable_tqdm=True, logging_strategy="no", save_strategy="steps", save_steps=2,
        eval_strategy="no", use_cpu=True, dataloader_num_workers=0)
    trainer = (trainer_cls or sak.SparseAdapterTrainer)(
        model=model, args=args, train_dataset=dataset(), data_collator=transformers.default_data_collator,
        callbacks=[sak.SparseAdapterCallback(adapters_only=True)])
    trainer.remove_callback(transformers.trainer_callback.PrinterCallback)
    trainer.train(resume_from_checkpoint=resume)
    return model


@pytest.mark.parametrize("two", [False, True], ids=["one_adapter", "two_adapters"])
def test_trainer_resumes_bit_exact_from_adapter_only_checkpoints(tmp_path, two):
    straight = _run(tmp_path / "a", 4, two=two)
    ckpt = tmp_path / "a" / "checkpoint-2"
    files = set(os.listdir(ckpt))
    assert {CONFIG_NAME, WEIGHTS_NAME, "optimizer.pt", "scheduler.pt", "trainer_state.json"} <= files
    assert "model.safetensors" not in files and integration.is_adapter_checkpoint(str(ckpt))
    assert not same_state(sak.load_adapters(_fresh(), str(ckpt)), straight)  # step 2, not step 4
    resumed = _run(tmp_path / "a", 4, resume=str(ckpt), two=two)  # optimizer, scheduler, RNG, state: transformers'
    assert same_state(resumed, straight)
    with pytest.raises(ValueError, match="Can't find a valid checkpoint"):  # why the Trainer class matters
        _run(tmp_path / "a", 4, resume=str(ckpt), trainer_cls=transformers.Trainer, two=two)


def _fresh():
    from test_trainer import build as build_trainer_model

    return build_trainer_model()


def test_load_adapter_checkpoint_keeps_the_parameter_objects_and_checks_the_adapters(tmp_path):
    model = lora_pair()
    sak.save_adapters(model, str(tmp_path))
    want = {n: p.clone() for n, p in model.named_parameters()}
    params = dict(model.named_parameters())
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    integration.load_adapter_checkpoint(model, str(tmp_path))
    assert all(p is params[n] and torch.equal(p, want[n]) for n, p in model.named_parameters())
    other = build("bert")
    add_sparse_adapters(other, cfg("lora", r=4, alpha=8.0, modules_to_save=[]))
    with pytest.raises(ValueError, match=r"holds adapters \['b', 'default'\] but the model has \['default'\]"):
        integration.load_adapter_checkpoint(other, str(tmp_path))


# ---------------------------------------------------------------------------------------------
# 3. GPT-2 (Conv1D) LoRA: export / import with PEFT, fan_in_fan_out
# ---------------------------------------------------------------------------------------------
def test_gpt2_lora_export_import_round_trip_with_peft(tmp_path):
    peft = pytest.importorskip("peft")
    from test_gpt2 import build_gpt2
    from test_gpt2 import inputs as gpt2_inputs

    b = gpt2_inputs()
    model = add_sparse_adapters(build_gpt2(), cfg("lora", r=4, alpha=8)).eval()
    randomize(model)
    want = logits(model, b)
    doc = sak.export_peft_lora(model, str(tmp_path / "ours"))
    assert doc["fan_in_fan_out"] is True and doc["target_modules"] == [f"transformer.h.{i}.attn.c_attn" for i in (0, 1)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(build_gpt2(), str(tmp_path / "ours")).eval()
    assert not [w for w in caught if "fan_in_fan_out" in str(w.message)]  # PEFT's own setting for Conv1D
    torch.testing.assert_close(logits(theirs, b), want, atol=1e-5, rtol=1e-5)
    back = sak.import_peft_lora(build_gpt2(), str(tmp_path / "ours")).eval()  # ours -> PEFT -> ours
    assert torch.equal(logits(back, b), want)
    # a LoRA trained with PEFT on GPT-2 (fan_in_fan_out=True saved) imports with PEFT's logits
    torch.manual_seed(2)
    pm = peft.get_peft_model(build_gpt2(), peft.LoraConfig(r=4, lora_alpha=16, target_modules=["c_attn", "c_proj"],
                                                           fan_in_fan_out=True))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    pm.save_pretrained(str(tmp_path / "theirs"))
    ours = sak.import_peft_lora(build_gpt2(), str(tmp_path / "theirs")).eval()
    assert len(integration.adapter_sites(ours)) == 6  # c_attn, attn.c_proj, mlp.c_proj per layer
    torch.testing.assert_close(logits(ours, b), logits(pm.eval(), b), atol=1e-5, rtol=1e-5)
    # fan_in_fan_out on nn.Linear targets (not PEFT's own setting there) is refused, naming them
    bert = lora_pair()
    sak.export_peft_lora(bert, str(tmp_path / "bert"))
    path = tmp_path / "bert" / "adapter_config.json"
    path.write_text(path.read_text().replace('"fan_in_fan_out": false', '"fan_in_fan_out": true'))
    with pytest.raises(NotImplementedError, match=r"fan_in_fan_out.*\['bert.encoder.layer.0.attention.self.query'"):
        sak.import_peft_lora(build("bert"), str(tmp_path / "bert"))


# ---------------------------------------------------------------------------------------------
# 4. PEFT's methods on the model; add_weighted_adapter
# ---------------------------------------------------------------------------------------------
def test_peft_methods_on_the_model(capsys):
    model = lora_pair()
    b = inputs("bert")
    base = logits(build("bert").eval(), b)
    stats = model.print_trainable_parameters()
    assert "trainable params:" in capsys.readouterr().out
    assert model.get_nb_trainable_parameters() == (stats["trainable_params"], stats["all_params"])
    want = logits(model, b)
    with model.disable_adapter():
        assert torch.equal(logits(model, b), base)
    model.disable_adapter_layers()
    assert torch.equal(logits(model, b), base)
    model.enable_adapter_layers()
    assert model.merge_adapter() == ["default"] and integration.adapter_state(model).merged == ["default"]
    torch.testing.assert_close(logits(model, b), want, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    assert torch.equal(logits(model, b), want)
    model.set_adapter("b")
    assert model.active_adapters() == ["b"]
    twin = pickle.loads(pickle.dumps(model))  # the methods pickle with the model and act on the copy
    twin.set_adapter("default")
    assert twin.active_adapters() == ["default"] and model.active_adapters() == ["b"]
    assert torch.equal(logits(twin, b), want)
    copy.deepcopy(model).delete_adapter("b")
    assert sak.list_adapters(model) == ["default", "b"]
    model.set_adapter("default")
    plain = model.merge_and_unload(progressbar=True, safe_merge=True)
    torch.testing.assert_close(logits(plain, b), want, atol=1e-5, rtol=1e-5)
    for name in integration.methods.PEFT_METHODS:  # none of ours left; transformers' own are back
        assert name not in plain.__dict__
    assert not hasattr(plain, "merge_and_unload") and not hasattr(plain, "print_trainable_parameters")
    assert plain.set_adapter.__func__ is type(plain).set_adapter


class _Own(nn.Module):
    """Not a transformers model, with an ``unload`` method of its own."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 16)

    def forward(self, x):
        return self.proj(x)

    def unload(self):
        return "mine"


def test_peft_methods_on_a_plain_module_keep_its_own():
    model = add_sparse_adapters(_Own(), cfg("lora", target_modules=["proj"]))
    assert model.unload() == "mine"  # the class's own method stays
    assert model.active_adapters() == ["default"]
    add_sparse_adapters(model, cfg("lora", target_modules=["proj"]), adapter_name="b")
    model.set_adapter("b")
    assert sak.active_adapters(model) == ["b"]
    model.delete_adapter("b")
    sak.unload(model)
    assert not hasattr(model, "set_adapter") and model.unload() == "mine"


def _site_deltas(model, name):
    """``{site: scale * B A}`` in float64 (dense) and the masks of adapter ``name``."""
    out = {}
    for logical, _, site in integration.inject.site_entries(model):
        h = site.adapter_slots().get(name)
        if h is not None:
            a, b = h.lora_A.weight.double(), h.lora_B.weight.double()
            out[logical] = ((b @ a) * (h.alpha / h.r), h.lora_A.mask(), h.lora_B.mask())
    return out


def test_add_weighted_adapter_cat_is_exact_and_matches_peft(tmp_path):
    model = lora_pair(r_b=8, alpha_b=4.0)  # different ranks: cat only
    pm = peft_twin(model, tmp_path)
    b = inputs("bert", pad=True)
    ws = [0.7, -1.3]
    model.add_weighted_adapter(["default", "b"], ws, "c", combination_type="cat")
    pm.add_weighted_adapter(["default", "b"], ws, "c", combination_type="cat")
    state = integration.adapter_state(model)
    assert state.active == ["default"] and state.configs["c"].r == 12 and state.configs["c"].alpha == 12.0
    assert not any(p.requires_grad for p in integration.inject.adapter_parts(model, "c")["bert.encoder.layer.0."
                                                                                       "attention.self.query.lora_A"]
                   .parameters())  # added inactive and frozen (PEFT)
    a, bb, c = (_site_deltas(model, n) for n in ("default", "b", "c"))
    for site, (delta, mask_a, mask_b) in c.items():  # the dense formula: sum_i w_i scale_i B_i A_i
        torch.testing.assert_close(delta, ws[0] * a[site][0] + ws[1] * bb[site][0], atol=1e-6, rtol=1e-6)
        assert torch.equal(mask_a, torch.cat([a[site][1], bb[site][1]]))  # masks concatenated, nothing else kept
        assert torch.equal(mask_b, torch.cat([a[site][2], bb[site][2]], dim=1))
    sak.set_adapter(model, "c")
    pm.set_adapter("c")
    torch.testing.assert_close(logits(model, b), logits(pm, b), atol=1e-5, rtol=1e-5)
    sak.save_adapters(model, str(tmp_path / "saved"))  # the combined adapter saves and loads like any other
    back = sak.load_adapters(build("bert"), str(tmp_path / "saved" / "c"), adapter_name="c").eval()
    assert torch.equal(logits(back, b), logits(model, b))


def test_add_weighted_adapter_linear_matches_peft_and_refuses_what_it_cannot(tmp_path):
    model = lora_pair()
    pm = peft_twin(model, tmp_path)
    b = inputs("bert", pad=True)
    ws = [0.5, -2.0]
    model.add_weighted_adapter(["default", "b"], ws, "lin", combination_type="linear")
    pm.add_weighted_adapter(["default", "b"], ws, "lin", combination_type="linear")
    a, bb, lin = (_site_deltas(model, n) for n in ("default", "b", "lin"))
    for site in lin:  # union of the masks
        assert torch.equal(lin[site][1], a[site][1] | bb[site][1])
        assert torch.equal(lin[site][2], a[site][2] | bb[site][2])
    sak.set_adapter(model, "lin")
    pm.set_adapter("lin")
    torch.testing.assert_close(logits(model, b), logits(pm, b), atol=1e-5, rtol=1e-5)
    with pytest.raises(NotImplementedError, match="'svd' makes dense factors"):
        sak.add_weighted_adapter(model, ["default", "b"], ws, "x", combination_type="svd")
    with pytest.raises(ValueError, match="already exists"):
        sak.add_weighted_adapter(model, ["default", "b"], ws, "lin")
    with pytest.raises(ValueError, match="one weight per adapter"):
        sak.add_weighted_adapter(model, ["default", "b"], [1.0], "x")
    other = lora_pair(r_b=8)
    with pytest.raises(ValueError, match="'linear' needs adapters of one r"):
        sak.add_weighted_adapter(other, ["default", "b"], ws, "x", combination_type="linear")
    add_sparse_adapters(other, cfg("houlsby"), adapter_name="h")
    with pytest.raises(ValueError, match="'h' is a 'houlsby' adapter; only LoRA adapters combine"):
        sak.add_weighted_adapter(other, ["default", "h"], ws, "x")
    heads = build("bert")  # two adapters holding copies of one task head: PEFT's error
    for name in ("default", "b"):
        add_sparse_adapters(heads, cfg("lora"), adapter_name=name)
    with pytest.raises(ValueError, match="each hold a copy of the task head 'classifier'"):
        sak.add_weighted_adapter(heads, ["default", "b"], ws, "x")
    assert sak.list_adapters(heads) == ["default", "b"]


# ---------------------------------------------------------------------------------------------
# 5. A short, robust tune (fake timings, faked load averages) and auto's one-time hint
# ---------------------------------------------------------------------------------------------
def _limit(dtype, layout, op, n):
    """The fake machine: the kernel wins up to this density (and nowhere for bf16 BSR linear at 1 token)."""
    base = {"float32": 0.3, "bfloat16": 0.1}[dtype] + (0.2 if op == "adapter" else 0.0)
    return base if n >= 16 else (0.0 if layout == "bsr" else 0.05)


def _fake_rows(spec, speedup, noisy=False):
    q = spec.params
    key = dict(suite="tune", device="cpu", dtype=q["dtype"], layout=q["layout"], op=q["op"], n=q["n"],
               sparsity=round(1 - q["density"], 6), status="ok")
    return [dict(key, impl="dense", speedup=1.0, noisy=False), dict(key, impl="cpu", speedup=speedup, noisy=noisy)]


def _fake_speedup(spec):
    q = spec.params
    kind = "adapter" if q["op"] == "adapter" else "linear"
    wins = q["density"] <= _limit(q["dtype"], q["layout"], kind, q["n"])
    if (q["n"], q["density"]) == (256, 0.1) and q["dtype"] == "float32" and q["op"] == "up":
        wins = False  # a loss below a win: the buckets up to 256 stop at 0.05 (as in the full grid)
    return 2.0 if wins else 0.9


def _tune_specs():
    from sparseadapter_kernels.bench.suites import Options, tune

    return tune.specs("tune", Options())


def test_tune_measures_only_what_the_tables_need_and_remeasures_noisy_cases():
    from sparseadapter_kernels.bench.suites import tune

    specs = _tune_specs()
    full = [r for s in specs for r in _fake_rows(s, _fake_speedup(s))]
    calls = []

    def measure(spec, attempt):
        calls.append((spec.id, attempt))
        noisy = spec.params["n"] == 4096 and attempt == 0  # noisy the first time: measured again, quiet then
        return _fake_rows(spec, 0.5 if noisy else _fake_speedup(spec), noisy=noisy)

    rows = tune.run_adaptive(specs, measure)
    want = tune.store_tuning(full, store=False)["tables"]
    assert tune.store_tuning(rows, store=False)["tables"] == want  # the tables of the full grid
    assert len({c[0] for c in calls}) < len(specs) / 2  # ... from less than half of its cases
    again = [c for c in calls if c[1] > 0]
    assert again and all(dict(calls).get(c[0]) is not None for c in again)
    assert all(r["remeasured"] == (1 if r["n"] == 4096 else 0) for r in rows)
    assert not any(r["noisy"] for r in rows)  # only the final measurement of a case is kept
    # a case that stays noisy is measured 1 + RETRIES times, then kept (and counted by refusal)
    stubborn = []
    tune.run_adaptive(specs[:1], lambda s, a: stubborn.append(a) or _fake_rows(s, 2.0, noisy=True))
    assert stubborn == list(range(tune.RETRIES + 1))


def test_tune_remeasures_only_undecided_cases():
    from sparseadapter_kernels.bench.suites import tune

    m = tuning.MARGIN
    assert not tune.undecided(dict(noisy=False, speedup_q1=0.5, speedup_q3=2.0))
    assert not tune.undecided(dict(noisy=True, speedup_q1=m + 0.1, speedup_q3=m + 3.0))  # a noisy win
    assert not tune.undecided(dict(noisy=True, speedup_q1=0.2, speedup_q3=m - 0.01))     # a noisy loss
    assert tune.undecided(dict(noisy=True, speedup_q1=m - 0.1, speedup_q3=m + 0.1))
    assert tune.undecided(dict(noisy=True))  # no quartiles: noisy alone decides
    calls = []
    specs = _tune_specs()[:1]
    tune.run_adaptive(specs, lambda s, a: calls.append(a) or [dict(r, speedup_q1=m + 0.5, speedup_q3=m + 2.0) for r in
                                                              _fake_rows(s, 2.0, noisy=True)])
    assert calls == [0]  # noisy but wholly above the margin: measured once


def test_tune_needs_the_stored_tables_threshold(tmp_path, monkeypatch):
    """A re-tune asks each case for the speed-up of tuning.threshold against this machine's stored table, and
    judges noise against that threshold."""
    from sparseadapter_kernels.bench.suites import tune

    monkeypatch.setenv(tuning.CACHE_ENV, str(tmp_path / "tuning.json"))
    tuning._LOADED.clear()
    try:
        specs = [s for s in _tune_specs() if s.params["dtype"] == "float32" and s.params["layout"] == "csr"
                 and s.params["op"] == "adapter"]
        first = {s.id: tune.threshold_of(s) for s in specs}
        assert set(first.values()) == {tuning.MARGIN}
        tuning.store(tuning.machine_key(torch.float32), {
            tuning.table_key(torch.float32, "csr", "adapter", "cpu"): ((1, 0.0), (256, 0.3))})
        m, h = tuning.MARGIN, tuning.HYSTERESIS
        for s in specs:
            kept = s.params["n"] >= 256 and s.params["density"] <= 0.3
            assert tune.threshold_of(s) == pytest.approx(m / h if kept else m * h)
        s = next(s for s in specs if s.params["n"] >= 256 and s.params["density"] == 0.3)
        rows = tune.measure_until_quiet(s, lambda sp, a: _fake_rows(sp, m * 0.97), 0, tune.threshold_of(s))
        assert tune._wins(tune._kernel_row(rows))  # under the margin, over the kept cell's threshold
        assert not tune.undecided(dict(rows[0], noisy=True, speedup_q1=m, speedup_q3=m * 1.02))
    finally:
        tuning._LOADED.clear()


def test_tune_refuses_to_store_from_a_busy_machine_and_says_so(tmp_path, monkeypatch, capsys):
    from sparseadapter_kernels.bench import case as bench_case
    from sparseadapter_kernels.bench.suites import Options, run_cases, tune

    cache = tmp_path / "tuning.json"
    monkeypatch.setenv(tuning.CACHE_ENV, str(cache))
    tuning._LOADED.clear()
    monkeypatch.setattr(tune, "build", lambda spec, opts: spec)  # no workload, no timing: fake rows
    monkeypatch.setattr(bench_case, "measure_case", lambda spec, settings, noise, events: _fake_rows(
        spec, _fake_speedup(spec)))
    threads = torch.get_num_threads()
    limit = tune.busy_load()
    for load, stored in (((limit + 3.0,) * 3, False), ((0.0,) * 3, True)):
        monkeypatch.setattr(os, "getloadavg", lambda load=load: load)
        opts = Options()
        rows = run_cases("tune", opts, lambda rows: None)  # the suite's own adaptive loop
        out = tune.finish(rows, opts)
        text = capsys.readouterr().out + "\n".join(out["lines"])
        if not stored:
            assert "the machine is busy" in text and "NOT STORED: the machine was busy" in text
            assert "before the tune" in text and not cache.exists() and out["extra"]["tuning"]["path"] is None
        else:
            assert f"stored in {cache}" in text and "NOT STORED" not in text
    key = tuning.machine_key(torch.float32)
    assert tuning.tuned_table("cpu", torch.float32, "csr", "adapter", "cpu") == \
        tuple(tuple(p) for p in out["extra"]["tuning"]["tables"][key]["float32/csr/adapter/cpu"])
    # after the tune: its own threads are discounted, others' load is not; noisy cases count too
    assert tune.refusal(rows, (0.0,), (threads + limit - 0.1,), threads) == []
    assert "after the tune" in tune.refusal(rows, (0.0,), (threads + limit + 1,), threads)[0]
    noisy = [dict(r, noisy=True) if i % 4 == 1 else r for i, r in enumerate(rows)]
    assert "still noisy" in tune.refusal(noisy, (0.0,), (0.0,), threads)[0]
    tuning._LOADED.clear()


def test_auto_hints_once_at_the_tune_on_an_untuned_cpu(tmp_path, monkeypatch):
    if not sak.backends.backend_usable("cpu"):
        pytest.skip("the CPU kernels are not built: auto has nothing to tune")
    from conftest import random_sparse

    monkeypatch.setenv(tuning.CACHE_ENV, str(tmp_path / "tuning.json"))
    monkeypatch.delenv(dispatch.HINT_ENV, raising=False)
    monkeypatch.setattr(dispatch, "_committed_applies", lambda dtype: False)  # whatever CPU this is: untuned
    tuning._LOADED.clear()
    dispatch._decision.cache_clear()
    dispatch._HINT_SEEN.clear()
    x = torch.randn(4, 96)

    def hints(w):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sak.ops.sparse_linear(x, w, backend="auto")
        return [str(c.message) for c in caught if issubclass(c.category, dispatch.TuningHint)]

    try:
        assert hints(random_sparse((32, 96), 0.0)[0]) == []     # a dense weight: nothing to tune for
        assert hints(random_sparse((32, 96), 0.1)[0]) == []     # density 0.9: above what a tune can choose
        got = hints(random_sparse((32, 96), 0.8)[0])
        assert len(got) == 1 and "sparseadapter-bench --tune" in got[0] and "never tuned" in got[0]
        assert "runs dense math" in got[0] and "SAK_TUNE_HINT=0" in got[0]
        assert hints(random_sparse((32, 96), 0.8)[0]) == []     # once per process
        dispatch._HINT_SEEN.clear()
        tuning.store(tuning.machine_key(torch.float32),
                     {tuning.table_key(torch.float32, "csr", "linear", "cpu"): ((1, 0.3),)})
        assert hints(random_sparse((32, 96), 0.8)[0]) == []     # tuned here: no hint
        dispatch._HINT_SEEN.clear()
        monkeypatch.setenv(dispatch.HINT_ENV, "0")
        tuning._LOADED.clear()
        os.remove(tmp_path / "tuning.json")
        dispatch._decision.cache_clear()
        assert hints(random_sparse((32, 96), 0.8)[0]) == []     # silenced
    finally:
        tuning._LOADED.clear()
        dispatch._decision.cache_clear()
        dispatch._HINT_SEEN.clear()


# ---------------------------------------------------------------------------------------------
# 6. Messages for PEFT / AdapterHub spellings and paths
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, want", [
    (dict(rank=8), "['rank'] ('rank': did you mean r=?"), (dict(lora_r=8), "'lora_r': did you mean r=?"),
    (dict(target_module=["query"]), "'target_module': did you mean target_modules=?"),
    (dict(reduction=16), "'reduction': did you mean reduction_factor=?"),
    (dict(sparsty=0.5), "['sparsty'] ('sparsty': did you mean sparsity=?)"),
])
def test_peft_and_adapterhub_spellings_are_named(kw, want):
    preset = "houlsby" if "reduction" in kw else "lora"
    with pytest.raises(TypeError, match=re.escape(want)):
        SparseAdapterConfig(preset, **kw)
    with pytest.raises(ValueError, match=re.escape(want)):
        SparseAdapterConfig.from_dict(dict(preset=preset, **kw))


def test_method_in_any_case_and_file_paths(tmp_path):
    for spelling in ("SNIP", "Snip", "GraSP", "Random", "MAG"):
        assert SparseAdapterConfig("lora", method=spelling).method in ("snip", "grasp", "rand", "magnitude")
    model = lora_pair()
    (tmp_path / "file").write_text("x")
    for call in (sak.save_adapters, sak.export_peft_lora, model.save_pretrained):
        with pytest.raises(NotADirectoryError, match="is a file; expected a directory"):
            call(*(() if call is model.save_pretrained else (model,)), str(tmp_path / "file"))
