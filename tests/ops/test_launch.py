"""FastLauncher (sparsa/ops/_launch.py) with a stand-in for Triton's jit function and compiled kernel."""
import torch

from sparsa.ops._launch import FastLauncher


class FakeCompiled:
    def __init__(self, log):
        self.log = log

    def __getitem__(self, dims):
        return lambda *args: self.log.append(("fast", dims, args))


class FakeKernel:
    """Plays `kernel[grid](*args, **kwargs)`: records the call, returns a compiled kernel."""

    arg_names = ["x", "n", "scale", "FLAG", "BM"]

    def __init__(self, best=None):
        self.log = []
        self.compiles = 0
        if best is not None:
            self.best_config = type("Config", (), {"kwargs": best})()

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.compiles += 1
            self.log.append(("triton", grid(kwargs if "BM" in kwargs else self.best_config.kwargs), args, kwargs))
            return FakeCompiled(self.log)

        return run


def _launcher(kernel):
    return FastLauncher(kernel, device=lambda: 0)


def test_second_identical_launch_skips_triton_and_passes_constexprs_in_order():
    kernel = FakeKernel()
    launch = _launcher(kernel)
    x = torch.zeros(64)
    rows = [10]
    grid = lambda m: (rows[0] // m["BM"],)
    launch(kernel, grid, (x, 7, 0.5), {"FLAG": True}, {"BM": 2, "num_warps": 4})
    rows[0] = 20  # the grid is evaluated again on every launch
    launch(kernel, grid, (x, 7, 0.25), {"FLAG": True}, {"BM": 2, "num_warps": 4})
    assert kernel.compiles == 1
    assert kernel.log[0][0] == "triton" and kernel.log[0][1] == (5,)
    assert kernel.log[1] == ("fast", (10, 1, 1), (x, 7, 0.25, True, 2))


def test_anything_triton_specialises_on_is_a_new_launch():
    kernel = FakeKernel()
    launch = _launcher(kernel)
    grid = lambda m: (1,)
    x = torch.zeros(64)
    calls = [
        ((x, 7, 0.5), {"FLAG": True}),
        ((x, 8, 0.5), {"FLAG": True}),  # another integer value
        ((x, True, 0.5), {"FLAG": True}),  # a bool is not the integer 1
        ((x.double(), 8, 0.5), {"FLAG": True}),  # dtype
        ((x[1:], 8, 0.5), {"FLAG": True}),  # 16-byte alignment of the pointer
        ((x, 8, 0.5), {"FLAG": False}),  # a constexpr
    ]
    for args, consts in calls:
        launch(kernel, grid, args, consts, {"BM": 1})
    assert kernel.compiles == len(calls)
    for args, consts in calls:
        launch(kernel, grid, args, consts, {"BM": 1})
    assert kernel.compiles == len(calls)
    assert [e[0] for e in kernel.log[len(calls):]] == ["fast"] * len(calls)


def test_autotuned_kernel_reuses_the_config_it_ran_with():
    kernel = FakeKernel(best={"BM": 4})
    launch = _launcher(kernel)
    x = torch.zeros(64)
    grid = lambda m: (16 // m["BM"], 3)
    launch(kernel, grid, (x, 7, 0.5), {"FLAG": False}, {})
    launch(kernel, grid, (x, 7, 0.5), {"FLAG": False}, {})
    assert kernel.compiles == 1
    assert kernel.log[1] == ("fast", (4, 3, 1), (x, 7, 0.5, False, 4))


class FakeDirectCompiled(FakeCompiled):
    """A compiled kernel with Triton 3.6's C-launcher attributes: `run(gx, gy, gz, stream, function,
    packed_metadata, launch_metadata, enter_hook, exit_hook, *args)`."""

    function = "fn-handle"
    packed_metadata = "packed"

    def run(self, *call):
        self.log.append(("direct", call))


class FakeDirectKernel(FakeKernel):
    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.compiles += 1
            return FakeDirectCompiled(self.log)

        return run


def test_cached_launch_calls_the_c_launcher_directly_unless_hooks_are_registered():
    knobs = __import__("pytest").importorskip("triton.knobs")
    kernel = FakeDirectKernel()
    launch = FastLauncher(kernel, device=lambda: 3, stream_of=lambda dev: f"stream{dev}")
    x = torch.zeros(64)
    grid = lambda m: (4, 2)
    for _ in range(2):
        launch(kernel, grid, (x, 7, 0.5), {"FLAG": False}, {"BM": 16})
    assert kernel.compiles == 1
    ptr = x.data_ptr()  # tensors reach the C launcher as raw pointers
    assert kernel.log == [("direct", (4, 2, 1, "stream3", "fn-handle", "packed", None, None, None, ptr, 7, 0.5, False, 16))]
    hook = lambda metadata: None
    knobs.runtime.launch_enter_hook.add(hook)  # a profiler's hook: the standard path, which calls it
    try:
        launch(kernel, grid, (x, 7, 0.5), {"FLAG": False}, {"BM": 16})
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    assert kernel.log[-1] == ("fast", (4, 2, 1), (x, 7, 0.5, False, 16))


class TensorDescriptor:
    """Stand-in with the fields of Gluon's host-side TMA descriptor (the launcher matches the class name)."""

    def __init__(self, base, block_shape, layout="swizzle128", padding="zero"):
        self.base, self.shape, self.strides = base, list(base.shape), list(base.stride())
        self.block_shape, self.layout, self.padding = block_shape, layout, padding


def test_tensor_descriptors_are_keyed_by_what_the_kernel_depends_on_and_passed_on_unchanged():
    kernel = FakeDirectKernel()
    launch = FastLauncher(kernel, device=lambda: 0, stream_of=lambda dev: "s")
    grid = lambda m: (1,)
    x = torch.zeros(8, 64)
    first = TensorDescriptor(x, [4, 64])
    launch(kernel, grid, (first, 7, 0.5), {"FLAG": False}, {"BM": 16})
    again = TensorDescriptor(x.clone(), [4, 64])  # another tensor of the same layout: a cached launch
    launch(kernel, grid, (again, 7, 0.5), {"FLAG": False}, {"BM": 16})
    assert kernel.compiles == 1
    assert kernel.log[-1][1][9:] == (again, 7, 0.5, False, 16)  # the descriptor itself, not a pointer
    others = [
        TensorDescriptor(x, [8, 64]),  # block shape
        TensorDescriptor(torch.zeros(16, 64), [4, 64]),  # shape
        TensorDescriptor(x.double(), [4, 64]),  # dtype
        TensorDescriptor(x, [4, 64], layout="swizzle64"),
        TensorDescriptor(torch.zeros(64, 8).t(), [4, 64]),  # strides
    ]
    for d in others:
        launch(kernel, grid, (d, 7, 0.5), {"FLAG": False}, {"BM": 16})
    assert kernel.compiles == 1 + len(others)
