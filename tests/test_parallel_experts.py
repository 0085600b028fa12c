"""The experts side by side in threads (CPU training): the loop's numbers, only where it applies."""

from __future__ import annotations

import copy
import os
import platform
import subprocess
import sys

import pytest
import timm
import torch

import ride_models  # noqa: F401  (registers the models)
from ride_models.models import parallel_experts


@pytest.fixture
def two_threads():
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(saved)


@pytest.fixture
def passes(monkeypatch):
    """How many side-by-side passes (forward or backward) ran."""
    calls = []
    run_threads = parallel_experts._run_threads

    def counted(work, threads_each):
        calls.append(len(work))
        return run_threads(work, threads_each)

    monkeypatch.setattr(parallel_experts, "_run_threads", counted)
    return calls


def _pair(name: str, **kwargs):
    """A model in training (channels-last, float64) and its copy that runs the experts in turn."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=7, **kwargs).double().train()
    model.to(memory_format=torch.channels_last)
    model.set_expert_training(True)
    loop = copy.deepcopy(model)
    loop.set_parallel_experts(False)
    return model, loop


def _step(model, x, y):
    model.zero_grad(set_to_none=True)
    out = model(x)
    # every expert's logits in the loss, each in its own way
    loss = (
        torch.nn.functional.cross_entropy(out.logits, y)
        + (out.expert_logits**2).mean(dim=(0, 2)).cumsum(0).sum()
    )
    loss.backward()
    return out.logits.detach()


@pytest.mark.parametrize("name", ["ride_resnet32_3e", "ride_resnet10_2e"])
def test_side_by_side_training_equals_the_loop(name, two_threads, passes):
    # Outputs, every gradient and every running statistic as the loop computes them (float64), with 3
    # experts on 2 threads (a worker each) and with bottleneck-free ImageNet experts (shortcut B); and twice
    # the same step gives the same gradients bit for bit (the shared maps' gradient is summed in a fixed
    # order).
    model, loop = _pair(name, fused_experts=False)
    size = 32 if "32" in name else 48
    x = torch.randn(6, 3, size, size, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    y = torch.arange(6) % 7
    torch.testing.assert_close(_step(model, x, y), _step(loop, x, y), rtol=1e-10, atol=1e-10)
    experts = len(model.experts)
    assert passes == [experts, experts]  # one forward, one backward, each with a worker per expert
    for (key, a), b in zip(model.named_parameters(), loop.parameters()):
        assert (a.grad is None) == (b.grad is None), key
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-10, msg=key)
    for (key, a), b in zip(model.named_buffers(), loop.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=key)
    assert torch.get_num_threads() == 2  # restored after the workers' 1 thread each

    again = copy.deepcopy(model)  # the same weights and statistics after one step
    _step(model, x, y), _step(again, x, y)
    assert all(
        torch.equal(a.grad, b.grad)
        for a, b in zip(model.parameters(), again.parameters())
        if a.grad is not None
    )


def test_side_by_side_only_where_the_experts_run_one_by_one_in_training(two_threads, passes):
    model, _ = _pair("ride_resnet32_2e")
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    model(x)
    assert passes == [2]  # the default: channels-last maps on the CPU run one by one, here side by side
    model.set_fused_experts(True)
    model(x)  # the fused pass, not the loop
    model.set_fused_experts(None)
    with torch.no_grad():
        model(x)  # nothing to record: no backward to parallelize
    model.eval()(x)
    model.train()
    model.set_grad_checkpointing(True)
    model(x)  # checkpoint_blocks calls the modules
    model.set_grad_checkpointing(False)
    torch.set_num_threads(1)
    model(x)  # one intra-op thread: nothing to share out
    torch.set_num_threads(2)
    handle = model.experts[1].layer3[0].register_forward_hook(lambda *args: None)
    model(x)  # a hook must fire, in the caller's thread, on a module called by the loop
    handle.remove()
    model.set_parallel_experts(False)
    model(x)
    assert passes == [2]
    model.set_parallel_experts(True)
    model(x)
    assert passes == [2, 2]


def test_a_second_backward_says_what_to_do(two_threads):
    model, _ = _pair("ride_resnet32_2e")
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    loss = model(x).logits.sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match=r"set_parallel_experts\(False\)"):
        loss.backward()


def test_an_error_in_a_worker_reaches_the_caller(two_threads):
    model, _ = _pair("ride_resnet32_2e")

    class Broken(torch.nn.Module):
        def forward(self, x):
            raise ValueError("broken expert")

    model.experts[1].layer3 = Broken()
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="broken expert"):
        model(x)
    assert torch.get_num_threads() == 2


GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def _tune_malloc_calls(monkeypatch, **env):
    """The mallopt calls a first ``_tune_malloc`` makes with ``env`` set and no other malloc settings."""
    calls = []
    monkeypatch.setattr(parallel_experts, "_mallopt", lambda param, value: calls.append((param, value)))
    monkeypatch.setattr(parallel_experts, "_malloc_tuned", False)
    for name in (*parallel_experts._USER_MALLOC_VARIABLES, "GLIBC_TUNABLES", "RIDE_MODELS_TUNE_MALLOC"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    parallel_experts._tune_malloc()
    parallel_experts._tune_malloc()  # once per process
    return calls


def test_malloc_is_tuned_once_unless_the_user_chose(monkeypatch):
    # Where the C library is glibc: one arena, blocks up to 32 MiB from the heap, 256 MiB kept at its top.
    expected = [(-8, 1), (-3, 32 << 20), (-1, 256 << 20)]
    assert _tune_malloc_calls(monkeypatch) == (expected if GLIBC else [])
    # The user's choices stand: any glibc malloc setting, or ours turned off.
    assert _tune_malloc_calls(monkeypatch, MALLOC_ARENA_MAX="4") == []
    assert _tune_malloc_calls(monkeypatch, MALLOC_TRIM_THRESHOLD_="131072") == []
    assert _tune_malloc_calls(monkeypatch, GLIBC_TUNABLES="glibc.malloc.mmap_threshold=65536") == []
    assert _tune_malloc_calls(monkeypatch, RIDE_MODELS_TUNE_MALLOC="0") == []
    assert _tune_malloc_calls(monkeypatch, GLIBC_TUNABLES="glibc.rtld.optional_static_tls=2048") == (
        expected if GLIBC else []
    )


@pytest.mark.skipif(not GLIBC, reason="glibc's allocator settings: Linux with glibc only")
def test_importing_ride_models_keeps_torch_threads_in_one_malloc_arena():
    # In a fresh process: imported before torch's first parallel operator, the worker threads of that
    # operator (and later the experts' workers) allocate from glibc's main arena; malloc_stats lists it alone.
    code = (
        "import ctypes, sys, torch, ride_models, threading\n"
        "torch.set_num_threads(2)\n"
        "x = torch.randn(1 << 22).relu()\n"
        "t = threading.Thread(target=lambda: torch.randn(1 << 20).sum()); t.start(); t.join()\n"
        "sys.stderr.flush(); ctypes.CDLL(None).malloc_stats()\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in parallel_experts._USER_MALLOC_VARIABLES}
    env.pop("RIDE_MODELS_TUNE_MALLOC", None)
    env.pop("GLIBC_TUNABLES", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Arena 0:" in out.stderr and "Arena 1:" not in out.stderr, out.stderr
