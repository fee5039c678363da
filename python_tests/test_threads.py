"""One model run by several threads at once (a serving framework): the per-call settings (``adapter_names=``,
``mixed_batch``, ``disable_adapter()``) live in the call's context, not on the model, so each thread gets the
outputs and gradients it would get alone. Also nested forwards and a forward that raises.

Every threaded result is compared with the same call run sequentially in the main thread (within 1e-6).
"""
import sys
import threading

import pytest
import torch

import sparseadapter_kernels as sak
from sparseadapter_kernels import integration
from sparseadapter_kernels.integration import SparseAdapterConfig, add_sparse_adapters

from test_integration import batch, build

transformers = pytest.importorskip("transformers")

LORAS = [f"l{i}" for i in range(4)]
HOULSBYS = [f"h{i}" for i in range(4)]
ADAPTERS = LORAS + HOULSBYS
N_THREADS, REPEATS = 8, 6


def model_with_adapters(seed=0):
    """Tiny BERT with 4 LoRA (query / value) and 4 houlsby adapters, every weight random and nonzero."""
    model = build("bert", seed=seed)
    for name in ADAPTERS:
        preset = "lora" if name in LORAS else "houlsby"
        add_sparse_adapters(model, SparseAdapterConfig(preset, sparsity=0.5, method="rand"), adapter_name=name)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for lin in integration._adapter_sparse_linears(model).values():
            lin.values.copy_(torch.randn(lin.values.shape, generator=g) * 0.3)
    sak.set_adapter(model, ADAPTERS)  # all trainable (threads pass adapter_names, or disable)
    return model.eval()


def thread_batch(t, bsz=4):
    b = batch("bert", seed=100 + t, bsz=bsz, pad=True)
    b.pop("labels")
    return b


def thread_names(t):
    """Per-example names of thread ``t``: its own mix (two adapters, the base model alone, a repeat)."""
    return [ADAPTERS[t % 8], ADAPTERS[(t + 3) % 8], "__base__", ADAPTERS[t % 8]]


def values(model):
    return [lin.values for lin in integration._adapter_sparse_linears(model).values()]


def forward_and_grads(model, b, **kw):
    """Logits and the gradients of their squared sum w.r.t. every adapter's values (zeros where unused);
    ``torch.autograd.grad``: ``.grad`` of shared parameters would sum several threads' gradients."""
    out = model(**b, **kw).logits
    params = values(model)
    grads = torch.autograd.grad(out.square().sum(), params, allow_unused=True)
    return out.detach(), [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def close(got, want, what):
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6, msg=lambda m: f"{what}: {m}")


@pytest.fixture(autouse=True)
def _fast_switching():
    """Switch threads often, so that the forwards of the threads interleave inside one another."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(old)


def run_threads(jobs):
    """Run each ``job()`` in its own thread, all started together (a barrier); re-raise the first error."""
    barrier = threading.Barrier(len(jobs))
    errors = []

    def body(job):
        try:
            barrier.wait()
            job()
        except BaseException as e:  # noqa: BLE001 (reported in the main thread)
            errors.append(e)

    threads = [threading.Thread(target=body, args=(job,)) for job in jobs]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=300)
    assert not any(th.is_alive() for th in threads), "a thread did not finish"
    if errors:
        raise errors[0]


def assert_clean(model):
    state = integration.adapter_state(model)
    assert state.mixed is None and not state._kw_stack and not state.disabled and not state.is_disabled()


# ---------------------------------------------------------------------------------------------
# mixed batches from many threads
# ---------------------------------------------------------------------------------------------
def test_mixed_batches_from_8_threads_match_sequential_forward():
    model = model_with_adapters()
    with torch.no_grad():
        want = [model(**thread_batch(t), adapter_names=thread_names(t)).logits for t in range(N_THREADS)]

    def job(t):
        def run():
            b, names = thread_batch(t), thread_names(t)
            for i in range(REPEATS):
                with torch.no_grad():
                    close(model(**b, adapter_names=names).logits, want[t], f"thread {t}, call {i}")
        return run

    run_threads([job(t) for t in range(N_THREADS)])
    assert_clean(model)


def test_mixed_batches_from_8_threads_match_sequential_gradients():
    model = model_with_adapters()
    want = [forward_and_grads(model, thread_batch(t), adapter_names=thread_names(t)) for t in range(N_THREADS)]
    assert all(g.abs().sum() > 0 for g in want[0][1][:2])  # l0's A and B get gradients: a real check

    def job(t):
        def run():
            b, names = thread_batch(t), thread_names(t)
            for i in range(REPEATS // 2):
                out, grads = forward_and_grads(model, b, adapter_names=names)
                close(out, want[t][0], f"thread {t}, call {i}: logits")
                for k, (g, w) in enumerate(zip(grads, want[t][1])):
                    close(g, w, f"thread {t}, call {i}: gradient {k}")
        return run

    run_threads([job(t) for t in range(N_THREADS)])
    assert_clean(model)


def test_mixed_batch_and_disable_adapter_blocks_are_per_thread():
    """Threads in ``with mixed_batch``, in ``with disable_adapter()``, with ``adapter_names=`` and plain (the
    active adapters), all at once: each sees only its own settings; the model's flags are untouched."""
    model = model_with_adapters()
    sak.set_adapter(model, ["l1", "h2"])
    state = integration.adapter_state(model)

    def plain(b):
        return model(**b).logits

    def in_mixed_batch(t):
        def f(b):
            with sak.mixed_batch(model, thread_names(t)):
                return model(**b).logits
        return f

    def disabled(b):
        with sak.disable_adapter(model):
            assert state.is_disabled() and not state.disabled  # this thread only, not the model's flag
            return model(**b).logits

    def kwarg(t):
        return lambda b: model(**b, adapter_names=thread_names(t)).logits

    calls = [plain, in_mixed_batch(1), disabled, kwarg(3), plain, in_mixed_batch(5), disabled, kwarg(7)]
    with torch.no_grad():
        want = [f(thread_batch(t)) for t, f in enumerate(calls)]
        base = build("bert").eval()
        close(want[2], base(**thread_batch(2)).logits, "disable_adapter() is the base model")
        assert not torch.allclose(want[0], base(**thread_batch(0)).logits)

    def job(t):
        def run():
            b = thread_batch(t)
            for i in range(REPEATS):
                with torch.no_grad():
                    close(calls[t](b), want[t], f"thread {t}, call {i}")
        return run

    run_threads([job(t) for t in range(N_THREADS)])
    assert_clean(model)


def test_disable_adapters_is_for_every_thread_the_context_manager_for_one():
    model = model_with_adapters()
    b = thread_batch(0)
    with torch.no_grad():
        with_adapters = model(**b).logits
        base = build("bert").eval()(**b).logits
        seen = {}

        def other_thread():
            seen["out"] = model(**b).logits

        with sak.disable_adapter(model):
            close(model(**b).logits, base, "inside disable_adapter()")
            th = threading.Thread(target=other_thread)
            th.start()
            th.join()
        close(seen["out"], with_adapters, "another thread during disable_adapter()")
        integration.disable_adapters(model)  # the model's flag: every thread
        th = threading.Thread(target=other_thread)
        th.start()
        th.join()
        close(seen["out"], base, "another thread after disable_adapters()")
        integration.enable_adapters(model)
        close(model(**b).logits, with_adapters, "after enable_adapters()")
    assert_clean(model)


# ---------------------------------------------------------------------------------------------
# nested forwards, forwards that raise
# ---------------------------------------------------------------------------------------------
def test_nested_forwards_keep_the_outer_names_in_4_threads():
    """A hook inside the forward runs the model again (other names) and a second model (no names): the outer
    forward goes on with its own names, the inner ones see theirs, in each of 4 threads at once."""
    model, other = model_with_adapters(), model_with_adapters(seed=7)
    sak.set_adapter(other, "h3")
    inner_names = {t: list(reversed(thread_names(t + 1))) for t in range(4)}
    local = threading.local()

    def hook(module, args, output):
        if getattr(local, "t", None) is None:
            return
        t, local.t = local.t, None  # once per outer forward
        b = thread_batch(t + 10)
        local.inner = model(**b, adapter_names=inner_names[t]).logits
        local.other = other(**b, adapter_names=None).logits  # None: no names (and not the outer model's)

    with torch.no_grad():
        want = [model(**thread_batch(t), adapter_names=thread_names(t)).logits for t in range(4)]
        want_inner = [model(**thread_batch(t + 10), adapter_names=inner_names[t]).logits for t in range(4)]
        want_other = [other(**thread_batch(t + 10)).logits for t in range(4)]
    handle = model.bert.encoder.layer[0].register_forward_hook(hook)

    def job(t):
        def run():
            for i in range(REPEATS):
                local.t = t
                with torch.no_grad():
                    out = model(**thread_batch(t), adapter_names=thread_names(t)).logits
                close(out, want[t], f"thread {t}, call {i}: outer")
                close(local.inner, want_inner[t], f"thread {t}, call {i}: inner")
                close(local.other, want_other[t], f"thread {t}, call {i}: other model")
        return run

    try:
        run_threads([job(t) for t in range(4)])
    finally:
        handle.remove()
    assert_clean(model)
    assert_clean(other)


class Boom(RuntimeError):
    pass


def test_a_forward_that_raises_leaks_no_names_in_4_threads():
    """Forwards with adapter_names that raise halfway (a hook), with bad names, and inside ``mixed_batch``:
    the next call of that thread runs with the settings it had before; other threads are unaffected."""
    model = model_with_adapters()
    sak.set_adapter(model, "l2")
    state = integration.adapter_state(model)
    local = threading.local()

    def hook(module, args, output):
        if getattr(local, "boom", False):
            raise Boom("halfway")

    with torch.no_grad():
        want_active = [model(**thread_batch(t)).logits for t in range(4)]
        want_mixed = [model(**thread_batch(t), adapter_names=thread_names(t)).logits for t in range(4)]
    handle = model.bert.encoder.layer[1].register_forward_hook(hook)

    def job(t):
        def run():
            b, names = thread_batch(t), thread_names(t)
            for i in range(REPEATS):
                with torch.no_grad():
                    local.boom = True
                    with pytest.raises(Boom):
                        model(**b, adapter_names=names)
                    local.boom = False
                    assert state.mixed is None and not state._kw_stack
                    close(model(**b).logits, want_active[t], f"thread {t}, call {i}: after the raise")
                    with pytest.raises(ValueError, match="unknown adapter"):
                        model(**b, adapter_names=["nope"] * 4)
                    with sak.mixed_batch(model, names):
                        local.boom = True
                        with pytest.raises(Boom):
                            model(**b, adapter_names=list(reversed(names)))
                        local.boom = False
                        assert state.mixed == tuple(names) and not state._kw_stack
                        close(model(**b).logits, want_mixed[t], f"thread {t}, call {i}: in mixed_batch")
                    assert state.mixed is None
        return run

    try:
        run_threads([job(t) for t in range(4)])
    finally:
        handle.remove()
    assert_clean(model)
