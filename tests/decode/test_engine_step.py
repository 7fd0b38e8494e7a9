"""`--engine-step auto`: compiled where a compiler is present for the model's device, eager
elsewhere, overridable by $TWOTOWER_ENGINE_STEP; bad values are refused."""

from __future__ import annotations

import shutil

import pytest

from tests.serve.models import make_two_tower
from twotower.decode import static
from twotower.decode.scheduler import Scheduler
from twotower.decode.static import compiler_available, resolve_engine_step


@pytest.fixture
def no_override(monkeypatch):
    monkeypatch.delenv(static.ENGINE_STEP_ENV, raising=False)
    monkeypatch.delenv("TORCHDYNAMO_DISABLE", raising=False)


def test_auto_is_compiled_with_a_cpu_compiler_and_eager_without(no_override, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/" + name)
    assert compiler_available("cpu") and resolve_engine_step("auto", "cpu") == "compiled"
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert not compiler_available("cpu") and resolve_engine_step("auto", "cpu") == "eager"


def test_auto_is_eager_when_dynamo_is_disabled(no_override, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/" + name)
    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "1")
    assert resolve_engine_step("auto", "cpu") == "eager"


def test_the_environment_decides_what_auto_means_and_explicit_steps_stay(no_override, monkeypatch):
    monkeypatch.setenv(static.ENGINE_STEP_ENV, "static")
    assert resolve_engine_step("auto", "cpu") == "static"
    assert resolve_engine_step("eager", "cpu") == "eager"
    monkeypatch.setenv(static.ENGINE_STEP_ENV, "fast")
    with pytest.raises(ValueError, match="decode_step must be one of"):
        resolve_engine_step("auto", "cpu")
    with pytest.raises(ValueError, match="decode_step must be one of"):
        resolve_engine_step("compile", "cpu")


def test_the_scheduler_resolves_auto(no_override, monkeypatch):
    monkeypatch.setenv(static.ENGINE_STEP_ENV, "static")
    assert Scheduler(make_two_tower(), decode_step="auto").decode_step == "static"
