"""A second device on a CPU-only machine, to catch a tensor left on the wrong device without a GPU.

`accelerator()` is a context in which the `meta` device stands for an accelerator whose tensors hold real data:
`x.to("meta")`, `module.to("meta")` and `torch.zeros(..., device="meta")` give tensors that report
`device == meta` but compute on the CPU (a wrapper subclass, `DeviceTensor`), so code runs to the end with
real numbers, `.item()`, `.tolist()` and boolean masks included. Every operation checks its tensors the way a
GPU does: one that mixes a device tensor with a CPU tensor of one element or more raises
`RuntimeError("Expected all tensors to be on the same device ...")` naming the operation, and `.numpy()` of a
device tensor fails as it does for CUDA. Copies (`.to`, `.cpu()`, `copy_`) and indexing with a CPU index are
allowed, as CUDA allows them. So a factory call inside the library that ignores its input's device, or a model
input never moved to `lm.device`, fails here as it would on the GPU.
"""

from __future__ import annotations

import contextlib
import threading

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

DEVICE = torch.device("meta")
CPU = torch.device("cpu")
_COPIES = {torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default, torch.ops.aten.to.device}
# ops whose index arguments may stay on the CPU (CUDA accepts a CPU index tensor for these)
_INDEXING = {torch.ops.aten.index.Tensor, torch.ops.aten.index_put_.default, torch.ops.aten.index_put.default}


class DeviceTensor(torch.Tensor):
    """A tensor that says it is on the simulated accelerator and keeps its data (`elem`) on the CPU."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor):
        r = torch.Tensor._make_wrapper_subclass(
            cls,
            elem.size(),
            strides=elem.stride(),
            storage_offset=elem.storage_offset(),
            dtype=elem.dtype,
            layout=elem.layout,
            device=DEVICE,
            requires_grad=elem.requires_grad,
        )
        r.elem = elem
        return r

    def __repr__(self) -> str:
        return f"DeviceTensor({self.elem!r})"

    def tolist(self):
        return self.elem.tolist()

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return NotImplemented  # the mode below handles every op while `accelerator()` is active


def _is_device(d) -> bool:
    if isinstance(d, str):
        d = torch.device(d)
    return isinstance(d, torch.device) and d.type == DEVICE.type


def _to_cpu_device(x):
    return CPU if isinstance(x, torch.device) and x.type == DEVICE.type else x


class _Dispatch(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat, _ = tree_flatten((args, kwargs))
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        on_dev = any(isinstance(t, DeviceTensor) for t in tensors)
        if any(t.device.type == DEVICE.type and not isinstance(t, DeviceTensor) for t in tensors):
            raise AssertionError(f"{func} got a {DEVICE} tensor without data: a factory the simulator misses")
        if on_dev and func not in _COPIES:
            checked = tensors if func not in _INDEXING else [args[0], *[a for a in args[2:]]]
            stray = [t for t in checked if isinstance(t, torch.Tensor) and not isinstance(t, DeviceTensor)]
            if any(t.dim() > 0 for t in stray):
                raise RuntimeError(
                    f"Expected all tensors to be on the same device, but found at least two devices, "
                    f"{DEVICE} (the simulated accelerator) and cpu! (in {func})"
                )
        devices = [x for x in flat if isinstance(x, torch.device)] + (
            [kwargs["device"]] if isinstance(kwargs.get("device"), str) else []
        )
        to_dev = on_dev if not devices else _is_device(devices[-1])
        first = args[0] if args else None
        plain = tuple(_to_cpu_device(a) for a in args)
        plain_kw = {k: CPU if k == "device" and _is_device(v) else _to_cpu_device(v) for k, v in kwargs.items()}
        plain, plain_kw = tree_map(lambda t: t.elem if isinstance(t, DeviceTensor) else t, (plain, plain_kw))
        out = func(*plain, **plain_kw)
        if _writes_first(func) and isinstance(first, torch.Tensor):
            return first  # an in-place op returns its own (wrapped) self
        return tree_map(lambda t: DeviceTensor(t) if to_dev and isinstance(t, torch.Tensor) else t, out)


def _writes_first(func) -> bool:
    a = func._schema.arguments
    return bool(a) and a[0].alias_info is not None and a[0].alias_info.is_write


def _index(i):
    if isinstance(i, list):
        return torch.tensor(i) if i and not any(isinstance(v, torch.Tensor) for v in i) else i
    if isinstance(i, tuple):
        return tuple(_index(v) for v in i)
    return i


def _value(v, dtype):
    return torch.tensor(v, dtype=dtype) if isinstance(v, (int, float, bool)) else v


class _Factories(TorchFunctionMode):
    """`torch.tensor(data, device=meta)` builds on the CPU first (below the dispatcher): keep its data."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.tensor, torch.as_tensor, torch.asarray) and _is_device(kwargs.get("device")):
            t = func(*args, **{**kwargs, "device": CPU})
            return t.to(DEVICE)
        if func is torch.Tensor.new_tensor and isinstance(args[0], DeviceTensor):
            kw = {"dtype": args[0].dtype, **kwargs}
            on = _is_device(kw.pop("device", DEVICE))
            t = torch.tensor(*args[1:], **kw)
            return t.to(DEVICE) if on else t
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and isinstance(args[0], DeviceTensor):
            # C++ turns a list index or a number value into a tensor on the device below the dispatcher (no data
            # for the simulator): make them CPU tensors first, which CUDA accepts the same way
            args = (args[0], _index(args[1]), *[_value(v, args[0].dtype) for v in args[2:]])
        if func is torch.Tensor.numpy and isinstance(args[0], DeviceTensor):
            raise TypeError(f"can't convert {DEVICE} device type tensor to numpy. Use Tensor.cpu() first")
        return func(*args, **kwargs)


_Generator = torch.Generator


class _DeviceGenerator(_Generator):
    """`torch.Generator(device=meta)`: a CPU generator (the simulated device's random numbers come from the CPU)."""

    def __new__(cls, device=None):
        return _Generator(device=CPU if _is_device(device) else (device or CPU))


_inference_mode = torch.inference_mode
_autocast = torch.autocast


class _DeviceAutocast(_autocast):
    """`torch.autocast("meta", ...)`: autocast as on the CPU (no CUDA autocast without CUDA)."""

    def __init__(self, device_type: str, *args, **kwargs):
        super().__init__("cpu" if device_type == DEVICE.type else device_type, *args, **kwargs)


class _NoGradInference(torch.no_grad):
    """`torch.inference_mode()` as `no_grad` (wrapper tensors cannot be inference tensors); same device rules."""

    def __init__(self, mode: bool = True):
        super().__init__()


_load = torch.load


def _device_load(f, map_location=None, **kw):
    """`torch.load(..., map_location=meta)` would build data-less meta tensors: load on the CPU, then move."""
    if map_location is None or not _is_device(map_location):
        return _load(f, map_location=map_location, **kw)
    obj = _load(f, map_location=CPU, **kw)
    return tree_map(lambda t: t.to(DEVICE) if isinstance(t, torch.Tensor) else t, obj)


_thread_body = threading.Thread._bootstrap_inner  # runs the thread's `run`, a subclass's own included


def _body_with_modes(self) -> None:
    """Torch's modes are per thread: a thread started inside `accelerator()` (a server's worker) enters them too."""
    with _Factories(), _Dispatch():
        _thread_body(self)


@contextlib.contextmanager
def accelerator():
    """Run the body with `meta` standing for an accelerator (see the module's docstring); threads started inside
    run with it too."""
    torch.Generator, torch.inference_mode, torch.autocast = _DeviceGenerator, _NoGradInference, _DeviceAutocast
    torch.load = _device_load
    threading.Thread._bootstrap_inner = _body_with_modes
    try:
        with _Factories(), _Dispatch():
            yield
    finally:
        torch.Generator, torch.inference_mode, torch.autocast = _Generator, _inference_mode, _autocast
        torch.load = _load
        threading.Thread._bootstrap_inner = _thread_body
