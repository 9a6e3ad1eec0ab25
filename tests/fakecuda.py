"""A simulated CUDA device on a CPU-only torch, so that the GPU code paths run in CI (no test may need a GPU).

Tensors "on cuda" are CPU tensors tagged ``_fc``. The simulation raises
``FAKECUDA`` errors where real CUDA would: device and CPU tensors (not 0-dim)
mixed in one operation, ``.numpy()`` of a device tensor, a CPU generator for a
device random op (or the reverse), ``pin_memory()`` of a device tensor. It
cannot exercise CUDA graphs or autocast's dtypes; timings mean nothing.
``install()`` patches torch for the rest of the process: use it in a
subprocess (``tests/test_fake_cuda.py``).
"""
import traceback

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

FAKE = torch.device("cuda:0")
TB = torch._C.TensorBase.__dict__
D_DEVICE, D_ISCUDA, D_DATA = TB["device"], TB["is_cuda"], TB["data"]
LOG = []


def tagged(t):
    return isinstance(t, torch.Tensor) and getattr(t, "_fc", False)


def is_cuda_dev(d):
    if d is None:
        return None
    if isinstance(d, torch.device):
        return d.type == "cuda"
    if isinstance(d, str):
        return d.startswith("cuda")
    if isinstance(d, int):
        return True
    return None


def settag(out, tag):
    flat, _ = tree_flatten(out)
    for t in flat:
        if isinstance(t, torch.Tensor):
            try:
                t._fc = bool(tag)
            except Exception:
                pass
    return out


_OrigGen = torch.Generator


class FakeGen(_OrigGen):
    def __new__(cls, device="cpu"):
        g = _OrigGen.__new__(cls)
        g._fake_cuda = bool(is_cuda_dev(device))
        return g

    def __init__(self, device="cpu"):
        pass


make_gen = FakeGen


def fail(msg):
    stack = "".join(traceback.format_stack(limit=14)[:-2])
    LOG.append((msg, stack))
    raise RuntimeError("FAKECUDA: " + msg)


def getter_of(func, desc):
    return getattr(func, "__self__", None) is desc


class FakeCuda(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", str(func))
        if getter_of(func, D_DEVICE):
            return FAKE if tagged(args[0]) else func(*args)
        if getter_of(func, D_ISCUDA):
            return tagged(args[0])
        if getattr(func, "__self__", None) is D_DATA and name == "__set__":  # .data = x
            out = func(*args, **kwargs)
            args[0]._fc = tagged(args[1])
            return out
        if getattr(func, "__self__", None) is not None and name == "__set__":
            return func(*args, **kwargs)
        if func in (torch.Tensor.cpu,):
            self_ = args[0]
            return settag(self_.clone(), False) if tagged(self_) else self_
        if func is torch.Tensor.cuda:
            self_ = args[0]
            return self_ if tagged(self_) else settag(self_.clone(), True)
        if func is torch.Tensor.to:
            self_, rest = args[0], list(args[1:])
            target = None
            if rest and isinstance(rest[0], torch.Tensor):
                target = tagged(rest[0])
                rest[0] = torch.empty(0, dtype=rest[0].dtype)
            elif rest and isinstance(rest[0], (str, torch.device, int)):
                target = is_cuda_dev(rest[0])
                rest[0] = "cpu"
            if "device" in kwargs:
                target = is_cuda_dev(kwargs["device"])
                kwargs["device"] = "cpu"
            out = func(self_, *rest, **kwargs)
            if target is None:
                target = tagged(self_)
            if bool(target) != tagged(self_) and out is self_:
                out = out.clone()
            return settag(out, target)
        if func is torch.Tensor.pin_memory:
            if tagged(args[0]):
                fail("pin_memory() of a device tensor")
            return args[0].clone()
        if func is torch.Tensor.numpy:
            if tagged(args[0]):
                fail(".numpy() of a device tensor")
            return func(*args, **kwargs)
        flat, _ = tree_flatten((args, kwargs))
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        gen = kwargs.get("generator")
        dev_kw = None
        if "device" in kwargs:
            dev_kw = is_cuda_dev(kwargs["device"])
            kwargs["device"] = "cpu" if dev_kw is not None else kwargs["device"]
        if isinstance(gen, FakeGen):
            want = dev_kw if dev_kw is not None else any(tagged(t) for t in tensors)
            if bool(gen._fake_cuda) != bool(want):
                fail(f"{name}: generator on {'cuda' if gen._fake_cuda else 'cpu'}, op on {'cuda' if want else 'cpu'}")
        on = [t for t in tensors if tagged(t)]
        off = [t for t in tensors if not tagged(t) and t.dim() > 0]
        allowed_mix = name in ("copy_", "__setitem__", "__repr__", "__format__", "__str__", "set_", "is_same_size",
                               "__deepcopy__", "_has_compatible_shallow_copy_type", "detach", "requires_grad_", "__reduce_ex__")
        if name == "__getitem__":
            if not tagged(args[0]) and on:
                fail("indexing a CPU tensor with device indices")
            allowed_mix = True
        if on and off and not allowed_mix:
            fail(f"{name}: device and CPU tensors mixed (shapes {[tuple(t.shape) for t in on][:3]} vs {[tuple(t.shape) for t in off][:3]})")
        out = func(*args, **kwargs)
        if name in ("copy_", "__setitem__"):
            return out
        tag = dev_kw if dev_kw is not None else (tagged(args[0]) if name == "__getitem__" else bool(on))
        if tag:
            settag(out, True)
        return out


_orig_module_to = nn.Module.to
_orig_module_cpu = nn.Module.cpu
_orig_module_cuda = nn.Module.cuda


def _grad_hook(p):
    if p.grad is not None:
        p.grad._fc = getattr(p, "_fc", False)


def _retag(module, tag):
    for t in list(module.parameters()) + list(module.buffers()):
        t._fc = tag
        if t.requires_grad and not getattr(t, "_fc_hook", False):
            t.register_post_accumulate_grad_hook(_grad_hook)
            t._fc_hook = True
        if t.grad is not None:
            t.grad._fc = tag


def module_to(self, *args, **kwargs):
    device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
    if device is None:
        return _orig_module_to(self, *args, **kwargs)
    _retag(self, False)
    out = _orig_module_to(self, "cpu") if dtype is None else _orig_module_to(self, "cpu", dtype)
    _retag(self, device.type == "cuda")
    return out


def module_cpu(self):
    _retag(self, False)
    out = _orig_module_cpu(self)
    _retag(self, False)
    return out


def module_cuda(self, device=None):
    _retag(self, True)
    return self


def install():
    import torch._dynamo  # noqa: F401 (imported before the patches, as they would be on a GPU)
    import torch._inductor.config  # noqa: F401
    import torch.optim  # noqa: F401
    nn.Module.to = module_to
    nn.Module.cpu = module_cpu
    nn.Module.cuda = module_cuda
    torch.Generator = make_gen
    real_available = torch.cuda.is_available
    torch.cuda.is_available = lambda: True
    torch.cuda.device_count = lambda: 1
    torch.cuda.mem_get_info = lambda device=None: (80 * 2**30, 80 * 2**30)
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.get_device_name = lambda device=None: "FakeCUDA H100"
    torch.cuda.current_device = lambda: 0
    torch.cuda.set_device = lambda device: None
    torch.cuda.is_current_stream_capturing = lambda: False
    mode = FakeCuda()

    def outside(fn):  # exporters trace a model on the host; the simulation's mode would only get in their way
        def run(*args, **kwargs):
            for value in [*args, *kwargs.values()]:
                if isinstance(value, nn.Module) and any(tagged(t) for t in value.parameters()):
                    fail(f"{fn.__name__} of a model on the device")
            mode.__exit__(None, None, None)
            torch.cuda.is_available = real_available  # the exporters would look for CUDA kernels
            try:
                return fn(*args, **kwargs)
            finally:
                torch.cuda.is_available = lambda: True
                mode.__enter__()
        return run

    torch.export.export = outside(torch.export.export)
    torch.onnx.export = outside(torch.onnx.export)
    mode.__enter__()
    return mode
