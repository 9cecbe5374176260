"""`pnl serve` flag and PNL_* environment checks, in process (they fail before any model loads)."""

from __future__ import annotations

import os

import pytest

from professional_nano_llm.cli import main


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in [n for n in os.environ if n.startswith("PNL_")]:
        monkeypatch.delenv(name)


def serve_error(capsys, *args: str) -> str:
    """Runs `pnl serve ARGS`, which must fail with status 2; returns its stderr."""
    try:
        code = main(["serve", *args])
    except SystemExit as e:  # argparse
        code = e.code
    assert code == 2
    return capsys.readouterr().err


def test_invalid_flags_are_errors(capsys):
    assert "--metrics-auth needs --api-key" in serve_error(capsys, "--metrics-auth")
    assert "--max-waiting-requests must be >= 1, got 0" in serve_error(capsys, "--max-waiting-requests", "0")
    assert "two models given" in serve_error(capsys, "a-model", "--model", "another-model")
    assert "invalid choice: 'xml'" in serve_error(capsys, "--log-format", "xml")


def test_env_variables_set_flags_and_the_command_line_wins(capsys, monkeypatch):
    monkeypatch.setenv("PNL_PORT", "eighty")
    assert "PNL_PORT='eighty' is not a valid --port" in serve_error(capsys)
    monkeypatch.setenv("PNL_PORT", "8080")
    monkeypatch.setenv("PNL_LOG_FORMAT", "xml")
    assert "PNL_LOG_FORMAT='xml': choose from text, json" in serve_error(capsys)
    monkeypatch.delenv("PNL_LOG_FORMAT")
    monkeypatch.setenv("PNL_METRICS_AUTH", "true")  # a switch, read from the environment
    assert "--metrics-auth needs --api-key" in serve_error(capsys)
    monkeypatch.delenv("PNL_METRICS_AUTH")
    monkeypatch.setenv("PNL_MAX_WAITING_TOKENS", "100")
    assert "--max-waiting-tokens must be >= 1, got 0" in serve_error(capsys, "--max-waiting-tokens", "0")
    monkeypatch.setenv("PNL_MAX_WAITING_TOKENS", "0")
    assert "--max-waiting-tokens must be >= 1, got 0" in serve_error(capsys)
    monkeypatch.setenv("PNL_MODEL", "env-model")  # a positional MODEL overrides PNL_MODEL
    assert "two models given" not in serve_error(capsys, "cli-model")


def test_generate_ignores_serve_env(capsys, monkeypatch):
    monkeypatch.setenv("PNL_PORT", "eighty")  # only `serve` reads PNL_* flags
    with pytest.raises(SystemExit) as e:
        main(["generate", "--help"])
    assert e.value.code == 0
