"""README.md's "Use with Hugging Face" block runs as it stands (a tiny BERT from a config, two Trainer steps)
and does what it says: the reloaded adapters are the trained ones, the mixed batch gives each example its
adapter's output."""
import pathlib
import re

import pytest
import torch

import sparseadapter_kernels as sak

transformers = pytest.importorskip("transformers")
README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def hugging_face_block() -> str:
    text = README.read_text()
    section = text.split("## Use with Hugging Face", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_hugging_face_block_runs(tmp_path, monkeypatch):
    pytest.importorskip("accelerate")
    monkeypatch.chdir(tmp_path)
    ns = {}
    exec(compile(hugging_face_block(), str(README), "exec"), ns)
    model, fresh, batch, logits = ns["model"], ns["fresh"], ns["batch"], ns["logits"]
    assert (tmp_path / "out" / "run" / "checkpoint-2").is_dir()
    assert sak.list_adapters(fresh) == ["default", "lora"] and logits.shape == (3, 2)
    model.eval()
    for i, name in enumerate(["default", "lora"]):  # each example got its adapter (the trained values reloaded)
        sak.set_adapter(model, name)
        with torch.no_grad():
            want = model(**{k: v[i:i + 1] for k, v in batch.items()}).logits
        torch.testing.assert_close(logits[i:i + 1], want, atol=1e-5, rtol=1e-5)
    with torch.no_grad(), sak.disable_adapter(fresh):
        base = fresh(**{k: v[2:3] for k, v in batch.items()}).logits
    torch.testing.assert_close(logits[2:3], base, atol=1e-5, rtol=1e-5)
