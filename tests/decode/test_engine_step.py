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
    """No environment override, and Python's headers present (whatever this machine has)."""
    monkeypatch.delenv(static.ENGINE_STEP_ENV, raising=False)
    monkeypatch.delenv("TORCHDYNAMO_DISABLE", raising=False)
    for name in ("CC", "CXX"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(static, "python_headers_found", lambda: True)


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


def test_warm_up_runs_every_batch_width_and_leaves_a_clean_scheduler(monkeypatch):
    """`Scheduler.warm_up` decodes copies of a request at widths 1, 2, 4, ... up to the batch limit,
    each width's rows joining at once (one slot state of that width each), greedy and then
    sampled, then starts its statistics afresh; requests after it decode exactly as before."""
    from dataclasses import replace

    from tests.serve.test_engine import BLOCK4, alone, prompts
    from twotower.decode.engine import Request
    from twotower.decode.slots import SlotCache

    model = make_two_tower()
    widths = []
    claim = SlotCache.for_requests.__func__

    def spy(cls, model, *, rows, longest, max_slots=None):
        state = claim(cls, model, rows=rows, longest=longest, max_slots=max_slots)
        widths.append(state.slots)
        return state

    monkeypatch.setattr(SlotCache, "for_requests", classmethod(spy))
    scheduler = Scheduler(model, max_batch_size=6, decode_step="static")
    assert scheduler.batch_widths() == [1, 2, 4, 6]
    warm = Request("w", (5,), max_new_tokens=8, settings=BLOCK4)
    assert scheduler.warm_up(warm) == [1, 2, 4, 6]
    # greedy copies at each width, then sampled ones (the denoiser step's two graphs)
    assert widths == [1, 2, 4, 6] * 2 and scheduler.idle and scheduler.stats.generated_tokens == 0
    req = replace(warm, id="real", prompt=prompts(5, seed=4)[0])
    scheduler.submit(req)
    tokens = []
    while not scheduler.idle:
        tokens += [t for e in scheduler.step() for t in e.tokens]
    assert tokens == alone(model, req) and scheduler.stats.generated_tokens == len(tokens)
    busy = Scheduler(model, max_batch_size=2)
    busy.submit(req)
    with pytest.raises(RuntimeError, match="idle"):
        busy.warm_up(warm)


def test_the_servers_engine_thread_warms_up_before_its_first_request():
    """A request submitted during the warm-up waits in the inbox and then decodes as alone; the
    server's warm-up request is its default options over two blocks, with no EOS."""
    import queue

    from tests.serve.test_engine import BLOCK4, alone, prompts
    from twotower.decode.engine import Request
    from twotower.serve.app import warmup_request
    from twotower.serve.worker import EngineWorker
    from twotower.workload import Options

    model = make_two_tower()
    worker = EngineWorker(
        model, max_batch_size=4, max_queue=4, decode_step="static",
        warmup=Request("w", (5,), max_new_tokens=8, settings=BLOCK4),
    )  # fmt: skip
    worker.start()
    try:
        got: queue.Queue = queue.Queue()
        req = Request("real", prompts(6, seed=5)[0], max_new_tokens=8, settings=BLOCK4)
        worker.submit(req, got)
        tokens = []
        while True:
            event = got.get(timeout=120)
            tokens += event.tokens
            if event.finished:
                break
        assert worker.warmed_up.is_set() and tokens == alone(model, req)
    finally:
        worker.close()

    class Tok:
        bos_id = 1

    warm = warmup_request(Options(block_size=8), Tok(), eos_count=2, mask_id=3)
    assert (warm.prompt, warm.max_new_tokens, warm.eos_ids, warm.settings.block_size) == ((1,), 16, (3, 3), 8)
    assert warmup_request(Options(mode="ar"), Tok(), eos_count=1, mask_id=3).max_new_tokens == 2


def test_compiler_missing_says_why(no_override, monkeypatch):
    """The CPU needs a C++ compiler ($CXX, else g++), CUDA Triton and a C compiler for its launchers
    ($CC, else gcc or clang), both Python's headers (inductor and Triton build extensions against
    them): each missing part is named."""
    import importlib.util

    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/" + name)
    real_find_spec = importlib.util.find_spec
    triton = {"spec": object()}
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: triton["spec"] if name == "triton" else real_find_spec(name, *a)
    )
    assert static.compiler_missing("cpu") is None and static.compiler_missing("cuda") is None
    assert static.compiler_missing("mps") == "no compiled steps for mps devices" and not compiler_available("mps")
    monkeypatch.setattr(static, "python_headers_found", lambda: False)
    assert "Python.h" in static.compiler_missing("cpu") and "Python.h" in static.compiler_missing("cuda")
    monkeypatch.setattr(static, "python_headers_found", lambda: True)
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/g++" if name == "g++" else None)
    assert static.compiler_missing("cpu") is None
    assert static.compiler_missing("cuda") == "no C compiler ($CC, gcc, clang) for Triton's launchers"
    assert resolve_engine_step("auto", "cuda") == "eager"
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/clang" if name == "clang" else None)
    assert static.compiler_missing("cuda") is None  # Triton takes clang without gcc
    assert static.compiler_missing("cpu") == "no C++ compiler ($CXX, g++)"  # inductor takes g++ only
    monkeypatch.setenv("CXX", "ccache clang++")  # $CXX alone decides, by its first word
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/ccache" if name == "ccache" else None)
    assert static.compiler_missing("cpu") is None
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/g++" if name == "g++" else None)
    assert static.compiler_missing("cpu") == "no C++ compiler ($CXX, g++)"  # g++ exists, $CXX does not
    triton["spec"] = None
    assert static.compiler_missing("cuda") == "no triton"
    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "1")
    assert "TORCHDYNAMO_DISABLE" in static.compiler_missing("cpu")


def test_python_headers_are_looked_for_where_builds_look(monkeypatch, tmp_path):
    """The default scheme's include directory, "posix_prefix"'s (some distributions' default names a
    directory that does not exist) or INCLUDEPY: any one holding Python.h will do."""
    import sysconfig

    missing, found = tmp_path / "missing", tmp_path / "found"
    found.mkdir()
    (found / "Python.h").write_text("")
    places = {"default": missing, "prefix": missing, "INCLUDEPY": missing}
    monkeypatch.setattr(sysconfig, "get_paths", lambda *a, **k: {"include": str(places["default"])})
    monkeypatch.setattr(sysconfig, "get_path", lambda name, scheme=None, *a, **k: str(places["prefix"]))
    monkeypatch.setattr(sysconfig, "get_config_var", lambda name: str(places["INCLUDEPY"]))
    assert not static.python_headers_found()
    for where in places:
        places[where] = found
        assert static.python_headers_found(), where
        places[where] = missing


def test_the_recompile_limit_error_is_named_or_nothing_is_caught(monkeypatch):
    import torch

    assert static.recompile_limit_hit() is torch._dynamo.exc.FailOnRecompileLimitHit
    monkeypatch.delattr(torch._dynamo.exc, "FailOnRecompileLimitHit")
    assert static.recompile_limit_hit() == ()
    try:  # an older torch's other error is not hidden behind an AttributeError
        raise ValueError("inductor failed")
    except static.recompile_limit_hit():
        raise AssertionError("nothing should be caught") from None
    except ValueError as e:
        assert str(e) == "inductor failed"
