"""Checkpoints that behave: save_pretrained / from_pretrained of an adapted model, Trainer checkpoints (resume,
adapter-only), file names no other library misreads, earlier checkpoints still load, portable base-model
names, several adapters in one directory, and PEFT LoRA export / import (same logits both ways).

Tiny models built from configs (no downloads); the Trainer runs a few CPU steps.
"""
import json
import os
import shutil

import pytest
import torch

import sparseadapter_kernels as sak
from sparseadapter_kernels import integration
from sparseadapter_kernels.integration import CONFIG_NAME, WEIGHTS_NAME, SparseAdapterConfig, add_sparse_adapters

from test_adapters_workflow import cfg, inputs, logits, multi, same_state
from test_integration import build

transformers = pytest.importorskip("transformers")


def two_adapters():
    return multi("bert", [("default", "houlsby", {}), ("b", "lora", {})])


def test_save_pretrained_round_trips_and_plain_from_pretrained_keeps_the_base(tmp_path):
    model = two_adapters()
    model.save_pretrained(str(tmp_path))
    assert {"config.json", "model.safetensors", CONFIG_NAME, WEIGHTS_NAME, "b"} <= set(os.listdir(tmp_path))
    assert sorted(os.listdir(tmp_path / "b")) == [CONFIG_NAME, WEIGHTS_NAME]
    assert "adapter_config.json" not in os.listdir(tmp_path)  # transformers / PEFT would take it for a PEFT adapter
    b = inputs("bert", pad=True)
    back = sak.from_pretrained(transformers.AutoModelForSequenceClassification, str(tmp_path))
    assert sak.list_adapters(back) == ["default", "b"]
    assert same_state(back, model)
    for name in ("default", "b"):
        sak.set_adapter(model, name)
        sak.set_adapter(back, name)
        assert torch.equal(logits(back.eval(), b), logits(model, b))
    plain = transformers.BertForSequenceClassification.from_pretrained(str(tmp_path))  # not re-initialized
    base = build("bert").state_dict()
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in base.items())
    peft = pytest.importorskip("peft")
    with pytest.raises(Exception):  # PEFT refuses the folder (no adapter_config.json, checked above); its text is its own
        peft.PeftConfig.from_pretrained(str(tmp_path))
    only_b = sak.from_pretrained(transformers.BertForSequenceClassification, str(tmp_path), adapter_name="b")
    assert sak.list_adapters(only_b) == ["b"]
    with pytest.raises(ValueError, match=r"no adapter 'zz' saved in .*found \['b', 'default'\]"):
        sak.from_pretrained(transformers.BertForSequenceClassification, str(tmp_path), adapter_name="zz")
    sak.merge_adapter(model, "b")
    with pytest.raises(RuntimeError, match="merged into the base weights, which would be saved"):
        model.save_pretrained(str(tmp_path / "merged"))


def test_save_adapters_of_several_adapters_peft_layout_and_load_by_name(tmp_path):
    model = two_adapters()
    stats = sak.save_adapters(model, str(tmp_path))
    assert set(stats) == {"default", "b"} and stats["b"]["nnz"] > 0
    fresh = build("bert")
    sak.load_adapters(fresh, str(tmp_path / "b"), adapter_name="b")
    sak.load_adapters(fresh, str(tmp_path))
    assert sak.list_adapters(fresh) == ["b", "default"] and sak.active_adapters(fresh) == ["b"]
    b = inputs("bert")
    for name in ("default", "b"):
        sak.set_adapter(model, name)
        sak.set_adapter(fresh, name)
        assert torch.equal(logits(fresh.eval(), b), logits(model, b))


def test_format_1_checkpoints_under_peft_names_still_load_and_are_replaced_on_save(tmp_path):
    model = two_adapters()
    sak.save_adapters(model, str(tmp_path), adapter_name="default")
    doc = json.loads((tmp_path / CONFIG_NAME).read_text())  # rewrite it as an earlier version wrote it
    doc["peft_type"] = "SPARSE_ADAPTER"
    doc["format"]["weights_file"] = "adapter_model.safetensors"
    (tmp_path / WEIGHTS_NAME).rename(tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps(doc))
    (tmp_path / CONFIG_NAME).unlink()
    (tmp_path / "notes.txt").write_text("mine")
    old = sak.load_adapters(build("bert"), str(tmp_path))
    sak.set_adapter(model, "default")
    assert torch.equal(logits(old.eval(), inputs("bert")), logits(model, inputs("bert")))
    sak.save_adapters(old, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == [CONFIG_NAME, WEIGHTS_NAME, "notes.txt"]


def test_saved_config_holds_no_absolute_path(tmp_path):
    model = build("bert")
    add_sparse_adapters(model, cfg("houlsby"))
    for name, want in ((str(tmp_path / "local" / "bert"), None), ("org/bert-tiny", "org/bert-tiny"),
                       ("models/bert", "models/bert")):
        model.config._name_or_path = name
        sak.save_adapters(model, str(tmp_path / "out"))
        assert integration.read_adapter_config(str(tmp_path / "out"))["base_model"]["name_or_path"] == want
        assert str(tmp_path) not in (tmp_path / "out" / CONFIG_NAME).read_text()


# ---------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------
def _trainer_run(out, steps, resume=None, callbacks=()):
    from test_trainer import build as build_trainer_model
    from test_trainer import dataset

    model = build_trainer_model()
    add_sparse_adapters(model, SparseAdapterConfig("houlsby", bottleneck=16, sparsity=0.5, method="rand"))
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=8, learning_rate=5e-3, seed=0,
        report_to="none", disable_tqdm=True, logging_strategy="no", save_strategy="steps", save_steps=2,
        eval_strategy="no", use_cpu=True, dataloader_num_workers=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset(),
                                   data_collator=transformers.default_data_collator, callbacks=list(callbacks))
    trainer.remove_callback(transformers.trainer_callback.PrinterCallback)
    trainer.train(resume_from_checkpoint=resume)
    return model


def test_trainer_checkpoints_resume_and_hold_the_adapters(tmp_path):
    pytest.importorskip("accelerate")
    straight = _trainer_run(tmp_path / "a", 4)
    ckpt = tmp_path / "a" / "checkpoint-2"
    assert {"model.safetensors", CONFIG_NAME, WEIGHTS_NAME} <= set(os.listdir(ckpt))
    at_2 = sak.load_adapters(_fresh_trainer_model(), str(ckpt))
    assert not same_state(at_2, straight)  # the adapters as they were at step 2
    resumed = _trainer_run(tmp_path / "a", 4, resume=str(ckpt))  # restores the adapters from model.safetensors
    assert same_state(resumed, straight)
    adapters_only = _trainer_run(tmp_path / "c", 2, callbacks=[sak.SparseAdapterCallback(adapters_only=True)])
    files = set(os.listdir(tmp_path / "c" / "checkpoint-2"))
    assert {CONFIG_NAME, WEIGHTS_NAME} <= files and "model.safetensors" not in files
    back = sak.load_adapters(_fresh_trainer_model(), str(tmp_path / "c" / "checkpoint-2"))
    assert same_state(back, adapters_only)
    assert not integration.adapter_state(adapters_only).save_adapters_only  # reset at the end of training


def _fresh_trainer_model():
    from test_trainer import build as build_trainer_model

    return build_trainer_model()


# ---------------------------------------------------------------------------------------------
# PEFT interop
# ---------------------------------------------------------------------------------------------
def test_peft_lora_export_and_import(tmp_path):
    peft = pytest.importorskip("peft")
    b = inputs("bert", pad=True)
    # ours -> PEFT: same logits from peft.PeftModel.from_pretrained
    model = multi("bert", [("default", "houlsby", {}), ("b", "lora", dict(r=4, alpha=16.0))])
    sak.set_adapter(model, "b")
    doc = sak.export_peft_lora(model, str(tmp_path / "peft"), adapter_name="b")
    assert doc["peft_type"] == "LORA" and doc["r"] == 4 and doc["lora_alpha"] == 16.0
    with pytest.raises(ValueError, match="'default' is a 'houlsby' adapter; PEFT's LoRA format holds LoRA adapters"):
        sak.export_peft_lora(model, str(tmp_path / "x"), adapter_name="default")
    pm = peft.PeftModel.from_pretrained(build("bert"), str(tmp_path / "peft")).eval()
    torch.testing.assert_close(logits(pm, b), logits(model, b), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="is a PEFT adapter .*import_peft_lora"):
        sak.load_adapters(build("bert"), str(tmp_path / "peft"))
    # PEFT -> ours: a trained PEFT LoRA converts with the same logits, then prunes
    torch.manual_seed(4)
    pm = peft.get_peft_model(build("bert"), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                             task_type="SEQ_CLS"))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n or "classifier" in n:
                p.normal_(0, 0.2)
    pm.save_pretrained(str(tmp_path / "theirs"))
    ours = sak.import_peft_lora(build("bert"), str(tmp_path / "theirs"))
    torch.testing.assert_close(logits(ours.eval(), b), logits(pm.eval(), b), atol=1e-5, rtol=1e-5)
    pruned = sak.import_peft_lora(build("bert"), str(tmp_path / "theirs"), sparsity=0.5, method="magnitude")
    lins = integration._adapter_sparse_linears(pruned)
    assert sum(m.nnz for m in lins.values()) == sum(round(0.5 * m.in_features * m.out_features) for m in lins.values())
    dense = integration._adapter_sparse_linears(ours)
    for n, m in lins.items():  # magnitude pruning kept the largest trained entries, values unchanged
        kept = m.mask()
        assert torch.equal(m.weight[kept], dense[n].weight[kept])
    with pytest.raises(ValueError, match="adapts 'bert.encoder.layer.0.attention.self.query', which LlamaForCausalLM"):
        sak.import_peft_lora(build("llama"), str(tmp_path / "theirs"))
    shutil.rmtree(tmp_path / "theirs")
