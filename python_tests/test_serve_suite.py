"""The ``serve`` suite starts, verifies every candidate, and writes its table, memory figures and plot
(``--smoke``: tiny shapes; its numbers mean nothing)."""
import json

import pytest

from sparseadapter_kernels.backends import backend_usable
from sparseadapter_kernels.bench import __main__ as bench_main

pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not backend_usable("cpu"), reason="the CPU extension is not built")


def test_serve_smoke_writes_results(tmp_path, capsys):
    out = tmp_path / "out"
    assert bench_main.main(["--suite", "serve", "--smoke", "--no-progress", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    data = json.loads((out / "results.json").read_text())
    rows = [r for r in data["rows"] if r["suite"] == "serve"]
    assert rows and all(r["status"] != "wrong" for r in rows)
    assert {r["impl"] for r in rows} >= {"one", "ours", "modules", "loop", "peft", "base"}
    assert len(data["serve"]) == 6 and {m["dtype"] for m in data["serve_memory"]} == {"float32", "bfloat16"}
    for m in data["serve_memory"]:
        assert m["pool_bytes_per_kept_value"] < m["module_bytes_per_kept_value"]
    assert data["serve_switching"]["resident_big"] >= 5
    assert (out / "serve_vs_adapters.png").read_bytes()[:4] == b"\x89PNG"
    assert "== serve: adapter layers" in text and "== serve: memory" in text
