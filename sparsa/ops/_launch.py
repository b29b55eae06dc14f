"""Low-overhead relaunch of Triton kernels.

Each `kernel[grid](...)` call binds and specialises every argument in Python, and `triton.autotune`
adds its own cache lookup: 0.1-0.3 ms of host time per launch for kernels with ~50 arguments, which is
more than the GPU time of short calls (StreamKL at 2K tokens: 0.16 ms forward on an H100).

`FastLauncher` launches a signature's first call through Triton as usual (compiling and autotuning),
then remembers the compiled kernel and the meta-parameters it ran with, keyed by everything
Triton specialises on: each tensor's dtype and 16-byte alignment, the exact value and type of each
integer or bool, and the constexprs. Later calls with the same key go straight to the compiled kernel.
Floats are passed through (Triton does not specialise them). Host-side TMA tensor descriptors (Gluon's
`TensorDescriptor`) are keyed by their dtype, shape, strides, block shape, layout and padding and passed
on as they are (Triton's launcher encodes each into a CUtensorMap on every launch).
`SPARSA_FAST_LAUNCH=0` turns it off.

A cached launch calls the compiled kernel's C launcher directly with the current stream and the tensors'
raw pointers when no launch hooks are registered (Triton's own `compiled[grid](...)` builds launch
metadata, calls two empty hook chains and queries the driver about every pointer on every launch); with
hooks (a profiler), it goes through `compiled[grid]`.
"""
from __future__ import annotations

import os
from operator import itemgetter

import torch

ENABLED = os.environ.get("SPARSA_FAST_LAUNCH", "1") != "0"


class _Layout:
    """Where the tensors and the specialised scalars (ints, bools, ...; not floats) sit in an argument
    tuple with given argument types. Triton specialises a tensor on its dtype and 16-byte alignment (the
    key adds the device kind: the direct launch passes raw pointers, so a CPU tensor must never reuse a
    CUDA launch), an integer on its value, and does not specialise floats."""

    def __init__(self, kinds: tuple):
        self.tensors = [i for i, k in enumerate(kinds) if issubclass(k, torch.Tensor)]
        descriptors = [i for i, k in enumerate(kinds) if _is_descriptor(k)]
        others = [i for i, k in enumerate(kinds)
                  if not issubclass(k, (torch.Tensor, float)) and i not in descriptors]
        self.pick_tensors = _picker(self.tensors)
        self.pick_descriptors = _picker(descriptors)
        self.pick_others = _picker(others)


def _is_descriptor(kind: type) -> bool:
    """A host-side TMA tensor descriptor class (triton.tools / Gluon `TensorDescriptor`)."""
    return kind.__name__ == "TensorDescriptor"


def _descriptor_key(d) -> tuple:
    """What a launch depends on of a host-side tensor descriptor (its base is 16-byte aligned by
    construction; the CUtensorMap itself is rebuilt on every launch)."""
    return (d.base.dtype, d.base.is_cuda, tuple(d.shape), tuple(d.strides), tuple(d.block_shape), d.layout,
            d.padding)


def _picker(positions: list):
    """args -> tuple of args[i] for i in positions."""
    if not positions:
        return lambda args: ()
    if len(positions) == 1:
        return lambda args, i=positions[0]: (args[i],)
    return itemgetter(*positions)


def _dims(grid: tuple) -> tuple:
    return tuple(grid) + (1,) * (3 - len(grid))


def _no_hooks(hook) -> bool:
    """A launch hook that does nothing: None or an empty `triton.knobs.HookChain`."""
    return hook is None or getattr(hook, "calls", None) == []


_KNOBS = []  # triton.knobs, imported on first use (None for a Triton without it)


def _launch_hooks_idle() -> bool:
    if not _KNOBS:
        try:
            from triton import knobs
        except ImportError:  # older Triton: keep the standard path
            knobs = None
        _KNOBS.append(knobs)
    knobs = _KNOBS[0]
    if knobs is None:
        return False
    runtime = knobs.runtime
    return _no_hooks(runtime.launch_enter_hook) and _no_hooks(runtime.launch_exit_hook)


def _direct_runner(compiled, stream_of=None):
    """The C launcher of a compiled kernel, or None where this Triton's CompiledKernel differs.
    stream_of(device) -> the raw current stream (default: Triton's driver, which asks PyTorch)."""
    try:
        if stream_of is None:
            from triton.runtime.driver import driver

            stream_of = driver.active.get_current_stream
        run, function, packed = compiled.run, compiled.function, compiled.packed_metadata
    except (AttributeError, ImportError, RuntimeError):
        return None
    if not callable(run):
        return None

    def launch(device, dims, args):
        run(*dims, stream_of(device), function, packed, None, None, None, *args)

    return launch


class FastLauncher:
    """Launch cache for one `@triton.jit` function (see the module docstring)."""

    def __init__(self, fn, max_entries: int = 1024, device=None, stream_of=None):
        self.param_names = list(fn.arg_names)
        self.device = device or torch.cuda.current_device  # Triton launches on the current device
        self.stream_of = stream_of  # None: Triton's driver (tests pass a stand-in)
        self.max_entries = max_entries
        self._cache: dict = {}
        self._layouts: dict = {}

    def __call__(self, kernel, grid, args: tuple, consts: dict, meta: dict):
        """kernel: the jit function or its `triton.autotune` wrapper; grid: callable of the meta-parameters;
        args: the leading runtime arguments; consts: constexpr keyword arguments; meta: fixed
        meta-parameters (BM, BN, num_warps, ...; empty when autotuned)."""
        if not ENABLED:
            kernel[grid](*args, **consts, **meta)
            return
        device = self.device()
        kinds = tuple(map(type, args))
        layout = self._layouts.get(kinds)
        if layout is None:
            layout = self._layouts[kinds] = _Layout(kinds)
        tensors = layout.pick_tensors(args)
        ptrs = [t.data_ptr() for t in tensors]
        key = (device, kinds, tuple(consts.items()), layout.pick_others(args),
               tuple([(t.dtype, t.is_cuda) for t in tensors]), tuple([p % 16 == 0 for p in ptrs]),
               tuple([_descriptor_key(d) for d in layout.pick_descriptors(args)]))
        hit = self._cache.get(key)
        if hit is not None:
            compiled, chosen, tail, direct = hit
            dims = _dims(grid(chosen))  # the grid may depend on shapes outside the key
            if direct is not None and _launch_hooks_idle():
                # tensors as raw device pointers: Triton's launcher then skips its per-pointer driver
                # query (cuPointerGetAttribute), which validated them when this signature was first launched
                raw = list(args)
                for i, p in zip(layout.tensors, ptrs):
                    raw[i] = p
                direct(device, dims, (*raw, *tail))
            else:
                compiled[dims](*args, *tail)
            return
        compiled = kernel[grid](*args, **consts, **meta)
        chosen = dict(meta)
        best = getattr(kernel, "best_config", None)
        if best is not None:
            chosen.update(best.kwargs)
        values = {**consts, **chosen}
        if compiled is None or any(n not in values for n in self.param_names[len(args):]):
            return  # an unexpected signature: keep launching through Triton
        if len(self._cache) >= self.max_entries:
            self._cache.clear()
        tail = tuple(values[n] for n in self.param_names[len(args):])
        self._cache[key] = (compiled, chosen, tail, _direct_runner(compiled, self.stream_of))


_LAUNCHERS: dict = {}


def launcher_for(name: str, fn) -> FastLauncher:
    """The launch cache of kernel `name` (jit function fn), made on first use (StreamKL's kernels, the Gluon
    kernels of kl/gluon_fwd.py and sparse_attn/kv_gluon.py)."""
    launcher = _LAUNCHERS.get(name)
    if launcher is None:
        launcher = _LAUNCHERS[name] = FastLauncher(fn)
    return launcher
