"""bench/load_test.py at a reduced size: the app (a separate `python app.py` process, tiny model) serves
4 concurrent gradio_client clients x 3 caption requests each without a single error."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("gradio")
pytest.importorskip("gradio_client")
ROOT = Path(__file__).resolve().parents[1]


def load_test_module():
    spec = importlib.util.spec_from_file_location("load_test", ROOT / "bench" / "load_test.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_load_small(tiny_model, tmp_path, capsys):
    out = tmp_path / "load.json"
    code = load_test_module().main(["--clients", "4", "--requests", "3", "--model", str(tiny_model),
                                    "--threads", "1", "--beam", "2", "--max-len", "8", "--json", str(out)])
    res = json.loads(out.read_text())
    assert res["errors"] == 0, res["error_messages"]
    assert code == 0 and res["ok"] == res["requests"] == 12 and res["app_alive_after"]
    lat = res["latency_s"]
    assert 0 < lat["p50"] <= lat["p95"] <= lat["max"] and res["throughput_rps"] > 0
    assert res["app_rss_mib"]["peak"] >= res["app_rss_mib"]["idle"] > 50  # the app holds torch + gradio
    assert "errors 0" in capsys.readouterr().out
