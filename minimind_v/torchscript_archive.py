"""Reading OpenAI's TorchScript archive (`ViT-B-16.pt`) without running any of its code.

Where it sits: under `clip_weights.py`, which loads CLIP's vision weights from every format.
`torch.jit.load` would build and run the archive's TorchScript; instead a restricted unpickler
that knows only tensors, storages and inert stand-ins for TorchScript classes reads the pickled
module tree, and the tensors' bytes are taken out of the zip directly.
"""
from __future__ import annotations

import collections
import pickle
import zipfile

import torch


class ArchiveError(ValueError):
    """A file that is not a readable TorchScript archive (the message names the file and key)."""


# The archive is a zip: `<name>/data.pkl` pickles the module tree (each TorchScript module is an
# object of a class `__torch__.<...>` whose state dict holds its parameters and submodules), and
# each tensor's bytes live in `<name>/data/<key>`, referenced from the pickle by a persistent id
# ('storage', <storage type>, key, location, numel). `<name>/code/` holds the TorchScript source,
# which we never read.

_STORAGE_DTYPES = {
    "HalfStorage": torch.float16, "FloatStorage": torch.float32, "DoubleStorage": torch.float64,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class _StorageType:
    """What the pickle's `torch.HalfStorage` etc. resolve to: just the dtype."""

    def __init__(self, name: str):
        self.name, self.dtype = name, _STORAGE_DTYPES[name]


class _ScriptObject:
    """Inert stand-in for any TorchScript class `__torch__.*`: it only records its attributes."""

    def __init__(self, *args):
        self.state = {}

    def __setstate__(self, state):
        self.state = state if isinstance(state, dict) else {}


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *rest):
    return data


def _as_list(values):               # torch.jit._pickle.build_intlist & co.: typed lists
    return list(values)


def _restore_type_tag(value, type_str=None):
    return value


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles a TorchScript `data.pkl`, allowing only the few harmless globals it needs.

    Any other global (`os.system`, `builtins.eval`, `torch.load`, ...) is refused when the pickle
    names it, before it could be called, so a crafted file cannot run code.
    """

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, path):
        super().__init__(file)
        self.archive, self.prefix, self.path = archive, prefix, path

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return self._rebuild_tensor
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if module == "torch.jit._pickle" and name.startswith("build_") and name.endswith("list"):
            return _as_list
        if (module, name) == ("torch.jit._pickle", "restore_type_tag"):
            return _restore_type_tag
        if module == "__torch__" or module.startswith("__torch__."):
            return _ScriptObject
        raise ArchiveError(f"{self.path}: refusing to load: its pickle asks for the global "
                               f"{module}.{name}, which a weights file never needs (nothing was run)")

    def persistent_load(self, pid):
        # pid = ('storage', storage_type, key, location, numel) -> a flat tensor over the bytes
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise ArchiveError(f"{self.path}: unexpected persistent id {pid!r} in data.pkl")
        _, storage_type, key, _location, numel = pid
        entry = f"{self.prefix}/data/{key}"
        try:
            raw = self.archive.read(entry)
        except KeyError:
            raise ArchiveError(f"{self.path}: storage {entry!r} is missing from the archive") from None
        itemsize = torch.empty((), dtype=storage_type.dtype).element_size()
        if len(raw) < numel * itemsize:
            raise ArchiveError(f"{self.path}: storage {entry!r} has {len(raw)} bytes, "
                                   f"expected {numel} x {itemsize} (truncated?)")
        if numel == 0:
            return torch.empty(0, dtype=storage_type.dtype)
        return torch.frombuffer(bytearray(raw[:numel * itemsize]), dtype=storage_type.dtype)

    def _rebuild_tensor(self, storage, offset, size, stride, requires_grad=False, hooks=None, *rest):
        size, stride = tuple(size), tuple(stride)
        last = offset + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else offset - 1
        if not isinstance(storage, torch.Tensor) or last >= storage.numel():
            raise ArchiveError(f"{self.path}: a tensor of size {size} reaches past its storage")
        return torch.as_strided(storage, size, stride, offset)


def _flatten_modules(obj, prefix: str, out: dict) -> None:
    """Module tree -> {'visual.conv1.weight': tensor, ...}, like `state_dict()` would."""
    for name, value in obj.state.items():
        if isinstance(value, torch.Tensor):
            out[prefix + name] = value
        elif isinstance(value, _ScriptObject):
            _flatten_modules(value, prefix + name + ".", out)


def read_torchscript_archive(path) -> dict[str, torch.Tensor]:
    """Tensors of a TorchScript archive (e.g. OpenAI's CLIP `.pt`), without executing anything."""
    try:
        with zipfile.ZipFile(path) as archive:
            pkls = [n for n in archive.namelist() if n.endswith("/data.pkl")]
            if len(pkls) != 1:
                raise ArchiveError(f"{path}: expected one */data.pkl in the archive, found {pkls}")
            prefix = pkls[0][: -len("/data.pkl")]
            with archive.open(pkls[0]) as f:
                root = _RestrictedUnpickler(f, archive, prefix, path).load()
    except (zipfile.BadZipFile, EOFError, pickle.UnpicklingError, OSError) as e:
        raise ArchiveError(f"{path}: corrupt or truncated archive ({e})") from None
    out = {}
    if isinstance(root, _ScriptObject):
        _flatten_modules(root, "", out)
    elif isinstance(root, dict):
        out = {k: v for k, v in root.items() if isinstance(v, torch.Tensor)}
    return out
