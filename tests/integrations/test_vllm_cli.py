"""`kvtier vllm-args`: the --kv-transfer-config JSON (no engine started)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvtier.cli.main import main
from kvtier.integrations.vllm import SPEC_MODULE, SPEC_NAME, kv_transfer_config


def test_default_turns_on_the_offloading_connector(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["vllm-args"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["kv_connector"] == "OffloadingConnector"
    assert doc["kv_role"] == "kv_both"
    extra = doc["kv_connector_extra_config"]
    assert extra == {"spec_name": SPEC_NAME, "spec_module_path": SPEC_MODULE}


def test_config_is_embedded(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "kvtier.yaml"
    cfg.write_text("host: {budget: 2GiB, policy: arc}\ntiers:\n  - {kind: disk, path: /x}\n")
    assert main(["vllm-args", "--config", str(cfg), "--block-size", "64"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1  # one line: fits in a shell argument
    extra = json.loads(out)["kv_connector_extra_config"]
    assert extra["kvtier_config"]["host"] == {"budget": "2GiB", "policy": "arc"}
    assert extra["block_size"] == 64
    assert json.loads(out) == kv_transfer_config(
        {"host": {"budget": "2GiB", "policy": "arc"}, "tiers": [{"kind": "disk", "path": "/x"}]},
        block_size=64,
    )


def test_bad_config_names_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("host: {budget: 2GiB, polcy: lru}\n")
    assert main(["vllm-args", "--config", str(cfg)]) == 2
    assert "host.polcy" in capsys.readouterr().err
    assert main(["vllm-args", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert main(["vllm-args", "--block-size", "0"]) == 2
