"""PyTorch ``torch.save`` checkpoints, read without importing torch and without executing pickle.

A ``torch.save`` file (PyTorch >= 1.6) is a ZIP archive ``<archive>/...`` holding ``data.pkl`` (the
object graph), one member ``data/<key>`` per storage (stored uncompressed, raw little-endian
elements), and small ``version``/``byteorder`` members. This adapter:

* reads the ZIP directory itself (:mod:`._zip`), never trusting a claimed size;
* tokenizes ``data.pkl`` with :func:`pickletools.genops` (which executes nothing) and evaluates the
  opcodes with a small interpreter of its own that builds plain records. It understands only the
  globals a tensor checkpoint needs (``torch._utils._rebuild_tensor*``, ``_rebuild_parameter``,
  ``torch.*Storage`` types through persistent ids ``('storage', type, key, location, numel)``,
  ``collections.OrderedDict``, ``torch.Size``, dtypes, ...). Nothing in the file is ever imported
  or called.

Result: one :class:`TensorRegion` per storage member that a tensor uses (shared storages, views
and tied weights give one region), named after the **first tensor that uses the storage** in
pickle order (dict insertion order; nested keys joined with "."). If that tensor covers the whole
storage contiguously the region has its shape, otherwise the region is the flat storage
``(numel,)``. Every tensor is recorded in ``Layout.metadata["views"]`` (name, path, dtype, shape,
stride, storage_offset in elements, storage key, region name), and every referenced storage in
``metadata["storages"]``; both are plain lists of dicts in pickle order (deterministic).

Fallbacks (documented, never exceptions):

* legacy (pre-1.6, non-zip) files and pickles that need globals outside the allow-list (a
  pickled ``nn.Module``, a TorchScript archive, custom classes) -> :func:`raw.parse` with a note:
  the file is stored opaque (content-defined chunks), byte-exact;
* a storage member that is compressed or encrypted stays in the skeleton (its views have
  ``region: None``).

Refused with :class:`FormatError`: a pickle naming a global that can run code when unpickled
(``os.system``, ``builtins.eval``, ``subprocess``, ...), torch's own loaders used as gadgets
(``torch.load``, ``torch.hub``, ``torch.utils.cpp_extension``, ...), protocol-4 dotted names that
walk to such a thing (``torch.serialization`` + ``os.system``, ``torch`` + ``load.__globals__``),
and a deflated ``data.pkl`` that expands more than a pickle does (a zip bomb). Malformed archives
and pickles are FormatErrors too.
"""

from __future__ import annotations

import math
import pickletools
import struct
import warnings
from collections.abc import Iterator
from typing import Any, BinaryIO

from ..errors import FormatError
from . import _zip, raw
from .base import CODEC_DTYPES, Layout, TensorRegion

NAME = "torch"
# ``.bin`` is claimed by content only (sniff): too many unrelated formats use that extension.
EXTENSIONS = (".pt", ".pth")
MAX_PICKLE = 256 << 20
# The most a deflated data.pkl may expand (its claimed size against its deflated size).
PICKLE_MAX_RATIO = 32
MAX_INT = 1 << 62

# pickle of the legacy magic number 0x1950a86a20f9469cfc6c (LONG1, 10 bytes), at the start of pre-1.6 files.
LEGACY_MAGIC = b"\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")

# storage class -> (dtype name, element size). Names of CODEC_DTYPES where one exists, else opaque names.
STORAGE_TYPES: dict[str, tuple[str, int]] = {
    "FloatStorage": ("F32", 4),
    "DoubleStorage": ("F64", 8),
    "HalfStorage": ("F16", 2),
    "BFloat16Storage": ("BF16", 2),
    "LongStorage": ("I64", 8),
    "IntStorage": ("I32", 4),
    "ShortStorage": ("I16", 2),
    "CharStorage": ("I8", 1),
    "ByteStorage": ("U8", 1),
    "BoolStorage": ("BOOL", 1),
    "ComplexFloatStorage": ("C64", 8),
    "ComplexDoubleStorage": ("C128", 16),
    "ComplexHalfStorage": ("C32", 4),
    "QInt8Storage": ("QI8", 1),
    "QUInt8Storage": ("QU8", 1),
    "QInt32Storage": ("QI32", 4),
    "QUInt4x2Storage": ("QU4x2", 1),
    "QUInt2x4Storage": ("QU2x4", 1),
}
# torch dtype global (torch.<name>) -> (dtype name, element size); used by _rebuild_tensor_v3.
TORCH_DTYPES: dict[str, tuple[str, int]] = {
    "float32": ("F32", 4),
    "float": ("F32", 4),
    "float64": ("F64", 8),
    "double": ("F64", 8),
    "float16": ("F16", 2),
    "half": ("F16", 2),
    "bfloat16": ("BF16", 2),
    "int64": ("I64", 8),
    "long": ("I64", 8),
    "int32": ("I32", 4),
    "int": ("I32", 4),
    "int16": ("I16", 2),
    "short": ("I16", 2),
    "int8": ("I8", 1),
    "uint8": ("U8", 1),
    "uint16": ("U16", 2),
    "uint32": ("U32", 4),
    "uint64": ("U64", 8),
    "bool": ("BOOL", 1),
    "float8_e4m3fn": ("F8_E4M3", 1),
    "float8_e5m2": ("F8_E5M2", 1),
    "float8_e4m3fnuz": ("F8_E4M3FNUZ", 1),
    "float8_e5m2fnuz": ("F8_E5M2FNUZ", 1),
    "float8_e8m0fnu": ("F8_E8M0", 1),
    "complex64": ("C64", 8),
    "cfloat": ("C64", 8),
    "complex128": ("C128", 16),
    "cdouble": ("C128", 16),
    "complex32": ("C32", 4),
    "chalf": ("C32", 4),
    "qint8": ("QI8", 1),
    "quint8": ("QU8", 1),
    "qint32": ("QI32", 4),
    "quint4x2": ("QU4x2", 1),
    "quint2x4": ("QU2x4", 1),
    "bits8": ("U8", 1),
    "bits16": ("U16", 2),
}

# Globals the interpreter evaluates (module, name) -> role.
_ALLOWED: dict[tuple[str, str], str] = {
    ("collections", "OrderedDict"): "odict",
    ("torch._utils", "_rebuild_tensor"): "rebuild_v1",
    ("torch._utils", "_rebuild_tensor_v2"): "rebuild_v2",
    ("torch._utils", "_rebuild_tensor_v3"): "rebuild_v3",
    ("torch._utils", "_rebuild_parameter"): "parameter",
    ("torch._utils", "_rebuild_parameter_with_state"): "parameter",
    ("torch._tensor", "_rebuild_from_type_v2"): "from_type",
    ("torch._tensor", "_rebuild_from_type"): "from_type",
    ("torch", "Tensor"): "tensor_class",
    ("torch._tensor", "Tensor"): "tensor_class",
    ("torch.nn.parameter", "Parameter"): "tensor_class",
    ("torch", "Size"): "size",
    ("torch", "device"): "device",
    ("torch.serialization", "_get_layout"): "layout",
    ("torch.storage", "UntypedStorage"): "untyped_storage",
    ("torch", "UntypedStorage"): "untyped_storage",
    ("builtins", "set"): "set",
    ("__builtin__", "set"): "set",
    ("builtins", "frozenset"): "frozenset",
    ("__builtin__", "frozenset"): "frozenset",
    ("builtins", "complex"): "complex",
    ("__builtin__", "complex"): "complex",
    ("builtins", "bytearray"): "bytearray",
    ("__builtin__", "bytearray"): "bytearray",
    ("_codecs", "encode"): "encode",
}
_ALLOWED.update({("torch", n): "storage_type" for n in STORAGE_TYPES})
_ALLOWED.update({("torch", n): "dtype" for n in TORCH_DTYPES})

# Globals whose only purpose in a pickle is to run code: refused outright, with a clear message.
_DANGEROUS_MODULES = frozenset(
    {
        "os",
        "posix",
        "nt",
        "subprocess",
        "sys",
        "shutil",
        "socket",
        "pty",
        "importlib",
        "runpy",
        "code",
        "codeop",
        "ctypes",
        "multiprocessing",
        "webbrowser",
        "pickle",
        "_pickle",
        "cPickle",
        "marshal",
        "commands",
        "popen2",
        "platform",
        "asyncio",
        "signal",
        "tempfile",
        "pdb",
        "timeit",
        "trace",
        "profile",
        "cProfile",
        "bdb",
        "imp",
        "_posixsubprocess",
        "pydoc",
        "http",
        "urllib",
        "ftplib",
        "smtplib",
        "telnetlib",
        "zipimport",
        "distutils",
        "setuptools",
        "pip",
        "site",
    }
)
_DANGEROUS_BUILTINS = frozenset(
    {
        "eval",
        "exec",
        "execfile",
        "compile",
        "open",
        "file",
        "input",
        "raw_input",
        "getattr",
        "setattr",
        "delattr",
        "__import__",
        "globals",
        "locals",
        "vars",
        "breakpoint",
        "exit",
        "quit",
        "apply",
        "reload",
        "help",
        "memoryview",
    }
)


# torch's own callables that load or build code (another pickle, a TorchScript or C++ module, a hub
# repository): no tensor checkpoint names them.
_DANGEROUS_TORCH = frozenset(
    {"torch.load", "torch.serialization.load", "torch.jit.load", "torch.ops.load_library", "torch.classes.load_library"}
)
_DANGEROUS_TORCH_MODULES = ("torch.hub", "torch.utils.cpp_extension", "torch.package", "torch._dynamo")


def _gadget(module: str, name: str) -> bool:
    """Whether global `module.name` is one that runs code when the pickle is loaded: a dangerous
    module or builtin, torch's loaders, or a protocol-4 dotted name walking to one through another
    module's attributes (`torch.serialization` + `os.system`) or through a dunder (`__globals__`)."""
    full = f"{module}.{name}"
    root = module.split(".", 1)[0]
    if root in _DANGEROUS_MODULES or module.startswith("numpy.testing"):
        return True
    if root in ("builtins", "__builtin__") and name.split(".", 1)[0] in _DANGEROUS_BUILTINS:
        return True
    if root == "operator" and name in ("attrgetter", "methodcaller"):
        return True
    if full in _DANGEROUS_TORCH or any(full.startswith(m + ".") for m in _DANGEROUS_TORCH_MODULES):
        return True
    walk = name.split(".") if "." in name else []
    return any(a.startswith("__") or a.lstrip("_") in _DANGEROUS_MODULES or a in _DANGEROUS_BUILTINS for a in walk)


class _Global:
    """An allowed global, as a value (a dtype, a storage type) or a callable the interpreter knows."""

    __slots__ = ("module", "name", "role")

    def __init__(self, module: str, name: str, role: str) -> None:
        self.module, self.name, self.role = module, name, role

    @property
    def full(self) -> str:
        return f"{self.module}.{self.name}"


class _Unknown:
    """A global outside the allow-list (never imported) and anything built from it (inert)."""

    __slots__ = ("full",)

    def __init__(self, full: str) -> None:
        self.full = full


class _Storage:
    __slots__ = ("dtype", "elem", "key", "location", "nbytes", "numel", "type_name")

    def __init__(self, key: str, type_name: str, dtype: str | None, elem: int, numel: int, location: str) -> None:
        self.key, self.type_name, self.dtype, self.elem, self.numel, self.location = key, type_name, dtype, elem, numel, location
        self.nbytes = numel * elem


class _Tensor:
    __slots__ = ("dtype", "elem", "offset", "shape", "storage", "stride")

    def __init__(self, storage: _Storage, offset: int, shape: tuple[int, ...], stride: tuple[int, ...], dtype: str, elem: int) -> None:
        self.storage, self.offset, self.shape, self.stride, self.dtype, self.elem = storage, offset, shape, stride, dtype, elem


class _ODict(dict[Any, Any]):
    """collections.OrderedDict (a dict: insertion order is kept); BUILD state goes to ``attrs``."""

    attrs: Any = None


class _Refusal(FormatError):
    """A global that exists to run code: always reported, never downgraded to the opaque fallback."""


class _Opaque(Exception):
    """The pickle needs globals outside the allow-list: the file is kept opaque."""

    def __init__(self, names: list[str]) -> None:
        super().__init__(", ".join(names))
        self.names = names


# Opcodes that make the interpreter keep a new object (a container or a memo entry). A checkpoint's
# pickle spends several bytes on each, a hostile one may make one per byte (and each costs this
# interpreter far more than a byte): more than one per OBJECT_BYTES (beyond MIN_OBJECTS) is refused.
_BUILDS = frozenset(
    {"EMPTY_LIST", "EMPTY_DICT", "EMPTY_SET", "LIST", "DICT", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "FROZENSET"}
    | {"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"}
)
OBJECT_BYTES = 3
MIN_OBJECTS = 65536
_MEMO_PUT = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_MEMO_GET = frozenset({"GET", "BINGET", "LONG_BINGET"})
_PUSH_ARG = frozenset(
    {
        "INT",
        "BININT",
        "BININT1",
        "BININT2",
        "LONG",
        "LONG1",
        "LONG4",
        "FLOAT",
        "BINFLOAT",
        "STRING",
        "BINSTRING",
        "SHORT_BINSTRING",
        "UNICODE",
        "SHORT_BINUNICODE",
        "BINUNICODE",
        "BINUNICODE8",
    }
)


def sniff(head: bytes, size: int) -> bool:
    """torch.save writes ``<archive>/data.pkl`` as the first member; legacy files start with a pickled magic number.

    Other zips that merely contain such a member (TorchScript archives, which end up opaque anyway)
    are parsed only when their extension is .pt/.pth, so a random zip is never refused as a bad checkpoint.
    """
    name = _zip.first_local_name(head)
    if name is not None:
        prefix, sep, rest = name.partition("/")
        return bool(prefix) and sep == "/" and rest == "data.pkl"
    return _is_legacy(head)


def _is_legacy(head: bytes) -> bool:
    return head[:1] == b"\x80" and LEGACY_MAGIC in head[:32]


def parse(path: str, f: BinaryIO, size: int) -> Layout:
    f.seek(0)
    head = f.read(32)
    if _is_legacy(head):
        return raw.parse(
            path,
            f,
            size,
            note="legacy (pre-1.6, non-zip) torch.save file: stored opaque (content-defined chunks); "
            "re-save it with a current torch.save to get per-tensor storage",
        )
    if head[:4] not in (_zip.LOCAL_SIG, _zip.EOCD_SIG):
        raise FormatError(path, "header", "is neither a torch.save ZIP archive nor a legacy torch pickle", hint="is this a PyTorch file?")
    prefix, by_name, pkl = _archive(path, f, size)
    byteorder = "little"
    bo = by_name.get(f"{prefix}/byteorder")
    if bo is not None:
        text = _zip.read_member(path, f, bo, 64).decode("ascii", "replace").strip()
        if text not in ("little", "big"):
            raise FormatError(path, f"zip entry {bo.name!r}", f"is {text!r}, expected 'little' or 'big'")
        byteorder = text
    if not pkl.stored and pkl.size > PICKLE_MAX_RATIO * pkl.compressed_size + (64 << 10):
        # torch.save stores data.pkl uncompressed; a re-zipped pickle deflates maybe 10:1.
        raise FormatError(
            path,
            f"zip entry {pkl.name!r}",
            f"claims {pkl.size} bytes deflated into {pkl.compressed_size}, more than a pickle compresses "
            f"(~{PICKLE_MAX_RATIO}:1 at most): refusing to inflate it",
            hint="the archive is corrupt or hostile (zip bomb)",
        )
    data = _zip.read_member(path, f, pkl, MAX_PICKLE)
    where = f"zip entry {pkl.name!r}"
    try:
        root, storages = _Interpreter(path, where, data).run()
    except _Opaque as e:
        shown = ", ".join(e.names[:5]) + (", ..." if len(e.names) > 5 else "")
        return raw.parse(
            path,
            f,
            size,
            note=f"torch.save pickle uses globals outside the tensor allow-list ({shown}): a pickled module or custom "
            "objects; stored opaque (content-defined chunks), never unpickled",
        )
    return _layout(path, size, prefix, byteorder, by_name, root, storages)


def _archive(path: str, f: BinaryIO, size: int) -> tuple[str, dict[str, _zip.ZipEntry], _zip.ZipEntry]:
    """(prefix, members by name, the data.pkl member) of a torch.save ZIP archive."""
    members = _zip.read_directory(path, f, size)
    if not members:
        raise FormatError(path, "zip directory", "the archive is empty: not a torch.save file")
    prefix = members[0].name.split("/", 1)[0]
    by_name = {e.name: e for e in members}
    pkl = by_name.get(f"{prefix}/data.pkl")
    if pkl is None:
        raise FormatError(path, "zip directory", f"has no {prefix + '/data.pkl'!r} member: not a torch.save archive")
    return prefix, by_name, pkl


MAX_ENTRIES = 10_000


def entries(path: str, f: BinaryIO, size: int) -> dict[str, Any]:
    """The plain values (ints, floats, strings, bools, None) a torch.save archive keeps beside its
    tensors, by dotted key path in pickle order: an epoch, an optimizer's step and learning rate,
    hyperparameters. At most MAX_ENTRIES; none for a file this adapter stores opaque. Reads the
    ZIP directory and data.pkl only; raises FormatError as `parse` does."""
    f.seek(0)
    head = f.read(32)
    if _is_legacy(head) or head[:4] not in (_zip.LOCAL_SIG, _zip.EOCD_SIG):
        return {}
    _, _, pkl = _archive(path, f, size)
    data = _zip.read_member(path, f, pkl, MAX_PICKLE)
    try:
        root, _ = _Interpreter(path, f"zip entry {pkl.name!r}", data).run()
    except _Opaque:
        return {}
    out: dict[str, Any] = {}
    seen: set[int] = set()
    stack: list[tuple[str, int, Any]] = [("", 0, root)]
    while stack and len(out) < MAX_ENTRIES:
        key, depth, v = stack.pop()
        if v is None or isinstance(v, (bool, int, float, str)):
            if key:
                out[key] = v
        elif isinstance(v, (dict, list, tuple)) and id(v) not in seen and depth < MAX_PATH_DEPTH:
            seen.add(id(v))
            items = list(v.items()) if isinstance(v, dict) else list(enumerate(v))
            for k, child in reversed(items):
                stack.append((f"{key}.{k}" if key else str(k), depth + 1, child))
    return out


# ----------------------------------------------------------------------------- the pickle interpreter
def _ops(path: str, where: str, data: bytes) -> Iterator[tuple[str, Any, int]]:
    it = pickletools.genops(data)
    pos = 0
    while True:
        try:
            op, arg, p = next(it)
        except StopIteration:
            return
        except (ValueError, OverflowError, struct.error, EOFError, IndexError, KeyError) as e:
            raise FormatError(path, f"{where} after byte {pos}", f"is not a valid pickle: {e}") from None
        pos = p if p is not None else pos
        yield op.name, arg, pos


class _Interpreter:
    """Evaluates pickle opcodes into plain records; never imports, never calls anything from the file."""

    def __init__(self, path: str, where: str, data: bytes) -> None:
        self.path, self.where, self.data = path, where, data
        self.stack: list[Any] = []
        self.marks: list[int] = []
        self.memo: dict[Any, Any] = {}
        self.storages: dict[str, _Storage] = {}
        self.unknown: set[str] = set()
        self.pos = 0

    def fail(self, problem: str) -> FormatError:
        return FormatError(self.path, f"{self.where} at pickle byte {self.pos}", problem)

    def pop(self) -> Any:
        if not self.stack or (self.marks and len(self.stack) <= self.marks[-1]):
            raise self.fail("pops from an empty stack")
        return self.stack.pop()

    def top(self) -> Any:
        if not self.stack or (self.marks and len(self.stack) <= self.marks[-1]):
            raise self.fail("reads an empty stack")
        return self.stack[-1]

    def pop_mark(self) -> list[Any]:
        if not self.marks:
            raise self.fail("needs a MARK but there is none")
        m = self.marks.pop()
        items = self.stack[m:]
        del self.stack[m:]
        return items

    def run(self) -> tuple[Any, dict[str, _Storage]]:
        # One filter for the whole run, not one per opcode (setting it is dearer than most opcodes):
        # a hostile STRING opcode with bad escapes makes pickletools warn, not the user's concern.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return self._run()

    def _run(self) -> tuple[Any, dict[str, _Storage]]:
        budget = len(self.data) // OBJECT_BYTES + MIN_OBJECTS
        for name, arg, pos in _ops(self.path, self.where, self.data):
            self.pos = pos
            if name in _BUILDS:
                budget -= 1
                if budget < 0:
                    raise self.fail(
                        f"builds more containers and memo entries than {len(self.data) // OBJECT_BYTES + MIN_OBJECTS} "
                        f"(a checkpoint's pickle builds one per ~8 bytes, this one of {len(self.data)} bytes more than one per "
                        f"{OBJECT_BYTES}): refusing it"
                    )
            if name == "STOP":
                result = self.pop()
                if self.unknown:
                    raise _Opaque(sorted(self.unknown))
                return result, self.storages
            try:
                self.step(name, arg)
            except _Refusal:
                raise
            except FormatError:
                if self.unknown:  # objects of unknown classes do things this interpreter does not model
                    raise _Opaque(sorted(self.unknown)) from None
                raise
        raise self.fail("ends without a STOP opcode")

    def step(self, name: str, arg: Any) -> None:
        st = self.stack
        if name in _MEMO_PUT:  # the most frequent opcodes first
            self.memo[arg] = self.top()
        elif name in _PUSH_ARG:
            st.append(arg)
        elif name in _MEMO_GET:
            if arg not in self.memo:
                raise self.fail(f"memo entry {arg} is read before it is written")
            st.append(self.memo[arg])
        elif name in ("PROTO", "FRAME"):
            return
        elif name in ("BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8"):
            st.append(bytes(arg))
        elif name == "NONE":
            st.append(None)
        elif name == "NEWTRUE":
            st.append(True)
        elif name == "NEWFALSE":
            st.append(False)
        elif name == "MARK":
            self.marks.append(len(st))
        elif name == "POP":
            self.pop()
        elif name == "POP_MARK":
            self.pop_mark()
        elif name == "DUP":
            st.append(self.top())
        elif name == "EMPTY_TUPLE":
            st.append(())
        elif name == "TUPLE":
            st.append(tuple(self.pop_mark()))
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            n = int(name[-1])
            items = [self.pop() for _ in range(n)]
            st.append(tuple(reversed(items)))
        elif name == "EMPTY_LIST":
            st.append([])
        elif name == "LIST":
            st.append(self.pop_mark())
        elif name == "APPEND":
            v = self.pop()
            self._extend(self.top(), [v])
        elif name == "APPENDS":
            items = self.pop_mark()
            self._extend(self.top(), items)
        elif name == "EMPTY_DICT":
            st.append({})
        elif name == "DICT":
            items = self.pop_mark()
            d: dict[Any, Any] = {}
            self._setitems(d, items)
            st.append(d)
        elif name == "SETITEM":
            v = self.pop()
            k = self.pop()
            self._setitems(self.top(), [k, v])
        elif name == "SETITEMS":
            items = self.pop_mark()
            self._setitems(self.top(), items)
        elif name == "EMPTY_SET":
            st.append(set())
        elif name == "ADDITEMS":
            items = self.pop_mark()
            s = self.top()
            if isinstance(s, _Unknown):
                return
            if not isinstance(s, set):
                raise self.fail(f"ADDITEMS on a {type(s).__name__}, not a set")
            s.update(self._key(x) for x in items)
        elif name == "FROZENSET":
            st.append(frozenset(self._key(x) for x in self.pop_mark()))
        elif name == "MEMOIZE":
            self.memo[len(self.memo)] = self.top()
        elif name == "GLOBAL":
            module, _, gname = str(arg).partition(" ")
            st.append(self._global(module, gname))
        elif name == "STACK_GLOBAL":
            gname = self.pop()
            module = self.pop()
            if not isinstance(module, str) or not isinstance(gname, str):
                raise self.fail("STACK_GLOBAL operands are not strings")
            st.append(self._global(module, gname))
        elif name == "INST":
            module, _, gname = str(arg).partition(" ")
            args = tuple(self.pop_mark())
            st.append(self._call(self._global(module, gname), args))
        elif name == "OBJ":
            items = self.pop_mark()
            if not items:
                raise self.fail("OBJ without a class")
            st.append(self._call(items[0], tuple(items[1:])))
        elif name == "REDUCE":
            args = self.pop()
            func = self.pop()
            if not isinstance(args, tuple):
                raise self.fail(f"REDUCE arguments are a {type(args).__name__}, not a tuple")
            st.append(self._call(func, args))
        elif name == "NEWOBJ":
            args = self.pop()
            cls = self.pop()
            if not isinstance(args, tuple):
                raise self.fail("NEWOBJ arguments are not a tuple")
            st.append(self._call(cls, args))
        elif name == "NEWOBJ_EX":
            kwargs = self.pop()
            args = self.pop()
            cls = self.pop()
            if not isinstance(args, tuple) or not isinstance(kwargs, dict):
                raise self.fail("NEWOBJ_EX operands are not (tuple, dict)")
            if kwargs and not isinstance(cls, _Unknown):
                raise self.fail(f"keyword arguments to {self._describe(cls)} are not supported")
            st.append(self._call(cls, args))
        elif name == "BUILD":
            state = self.pop()
            obj = self.top()
            if isinstance(obj, _ODict):
                obj.attrs = state
            elif not isinstance(obj, (_Tensor, _Unknown)):
                raise self.fail(f"BUILD on a {self._describe(obj)} is not supported")
        elif name == "BINPERSID":
            st.append(self._persistent(self.pop()))
        elif name == "PERSID":
            raise self.fail("text persistent ids (PERSID) are not used by torch.save")
        elif name in ("EXT1", "EXT2", "EXT4"):
            raise self.fail(f"{name} (copyreg extension registry) is not supported")
        elif name in ("NEXT_BUFFER", "READONLY_BUFFER"):
            raise self.fail(f"{name} (out-of-band buffers) is not supported")
        else:
            raise self.fail(f"opcode {name} is not supported")

    # -- helpers
    def _describe(self, v: Any) -> str:
        if isinstance(v, (_Global, _Unknown)):
            return v.full
        return type(v).__name__

    def _key(self, k: Any) -> Any:
        """A dict key / set item: only plain hashable values (no containers of unbounded depth)."""
        if k is None or isinstance(k, (bool, float, str, bytes)):
            return k
        if isinstance(k, int):
            if k.bit_length() > 64:
                raise self.fail(f"integer key with {k.bit_length()} bits is not supported")
            return k
        if isinstance(k, tuple) and len(k) <= 16 and all(x is None or isinstance(x, (bool, int, float, str, bytes)) for x in k):
            if any(isinstance(x, int) and x.bit_length() > 64 for x in k):
                raise self.fail("integer key with more than 64 bits is not supported")
            return k
        if isinstance(k, (_Global, _Unknown)):
            return k  # hashable by identity; an unknown one makes the whole file opaque anyway
        raise self.fail(f"a {type(k).__name__} used as a dict key or set item is not supported")

    def _setitems(self, d: Any, items: list[Any]) -> None:
        if isinstance(d, _Unknown):
            return
        if not isinstance(d, dict):
            raise self.fail(f"SETITEM(S) on a {self._describe(d)}, not a dict")
        if len(items) % 2:
            raise self.fail("SETITEMS with an odd number of items")
        for i in range(0, len(items), 2):
            d[self._key(items[i])] = items[i + 1]

    def _extend(self, lst: Any, items: list[Any]) -> None:
        if isinstance(lst, _Unknown):
            return
        if not isinstance(lst, list):
            raise self.fail(f"APPEND(S) on a {self._describe(lst)}, not a list")
        lst.extend(items)

    def _global(self, module: str, name: str) -> _Global | _Unknown:
        role = _ALLOWED.get((module, name))
        if role is not None:
            return _Global(module, name, role)
        full = f"{module}.{name}"
        if _gadget(module, name):
            raise _Refusal(
                self.path,
                f"{self.where} at pickle byte {self.pos}",
                f"imports {full}, which runs code when the pickle is loaded: refusing this file (nothing was executed)",
                hint="this is what a malicious checkpoint looks like; torch.load(weights_only=True) refuses it too",
            )
        self.unknown.add(full)
        return _Unknown(full)

    def _int(self, v: Any, what: str) -> int:
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= MAX_INT:
            raise self.fail(f"{what} is {v!r}, not a non-negative integer")
        return v

    def _ints(self, v: Any, what: str) -> tuple[int, ...]:
        if not isinstance(v, (tuple, list)) or len(v) > 64:
            raise self.fail(f"{what} is a {type(v).__name__}, not a tuple of at most 64 integers")
        return tuple(self._int(x, what) for x in v)

    def _persistent(self, pid: Any) -> Any:
        if isinstance(pid, _Unknown):
            return pid
        if not isinstance(pid, tuple) or len(pid) != 5:
            raise self.fail("persistent id is not a 5-tuple ('storage', type, key, location, numel)")
        kind, stype, key, location, numel = pid
        kind, key, location = (x.decode("ascii", "replace") if isinstance(x, bytes) else x for x in (kind, key, location))
        if kind != "storage":
            raise self.fail(f"persistent id kind {kind!r} is not 'storage'")
        if isinstance(stype, _Unknown):
            return stype
        if not isinstance(stype, _Global) or stype.role not in ("storage_type", "untyped_storage"):
            raise self.fail(f"persistent id storage type is {self._describe(stype)}, not a torch storage class")
        if not isinstance(key, str) or not key or "/" in key or not isinstance(location, str):
            raise self.fail(f"persistent id key {key!r} / location {location!r} are not valid")
        numel = self._int(numel, f"numel of storage {key!r}")
        if stype.role == "storage_type":
            dtype: str | None
            dtype, elem = STORAGE_TYPES[stype.name]
        else:
            dtype, elem = None, 1  # UntypedStorage: numel counts bytes; the dtype comes from the tensors
        prev = self.storages.get(key)
        if prev is None:
            prev = self.storages[key] = _Storage(key, stype.name, dtype, elem, numel, location)
        elif (prev.type_name, prev.numel) != (stype.name, numel):
            raise self.fail(f"storage {key!r} is declared as {prev.type_name}[{prev.numel}] and as {stype.name}[{numel}]")
        return prev

    def _call(self, func: Any, args: tuple[Any, ...]) -> Any:
        if isinstance(func, _Unknown) or any(isinstance(a, _Unknown) for a in args):
            return _Unknown(func.full if isinstance(func, (_Global, _Unknown)) else "?")
        if not isinstance(func, _Global):
            raise self.fail(f"calls a {type(func).__name__}, which is not a known global")
        role = func.role
        if role == "odict":
            d = _ODict()
            if args:
                if len(args) != 1 or not isinstance(args[0], (list, tuple)):
                    raise self.fail("OrderedDict() argument is not a list of pairs")
                for pair in args[0]:
                    if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                        raise self.fail("OrderedDict() item is not a pair")
                    d[self._key(pair[0])] = pair[1]
            return d
        if role in ("rebuild_v1", "rebuild_v2", "rebuild_v3"):
            return self._rebuild(func, args)
        if role == "parameter":
            if len(args) not in (3, 4) or not isinstance(args[0], _Tensor):
                raise self.fail(f"{func.full} arguments are not (tensor, requires_grad, hooks[, state])")
            return args[0]
        if role == "from_type":
            if len(args) != 4 or not isinstance(args[2], tuple):
                raise self.fail(f"{func.full} arguments are not (func, type, args, state)")
            inner, cls = args[0], args[1]
            if not isinstance(cls, _Global) or cls.role != "tensor_class":
                raise self.fail(f"{func.full} rebuilds a {self._describe(cls)}, not a tensor")
            if not isinstance(inner, _Global) or inner.role not in ("rebuild_v1", "rebuild_v2", "rebuild_v3", "parameter"):
                raise self.fail(f"{func.full} calls {self._describe(inner)}, not a tensor rebuild function")
            return self._call(inner, args[2])
        if role == "size":
            if len(args) != 1:
                raise self.fail("torch.Size() takes one argument")
            return self._ints(args[0], "torch.Size")
        if role in ("device", "layout"):
            if not 1 <= len(args) <= 2 or not isinstance(args[0], str):
                raise self.fail(f"{func.full}() arguments are not a name")
            return args[0] if len(args) == 1 else f"{args[0]}:{args[1]}"
        if role in ("set", "frozenset"):
            if len(args) > 1 or (args and not isinstance(args[0], (list, tuple, set, frozenset))):
                raise self.fail(f"{func.full}() argument is not a list")
            items = [self._key(x) for x in (args[0] if args else ())]
            return set(items) if role == "set" else frozenset(items)
        if role == "complex":
            if not 1 <= len(args) <= 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
                raise self.fail("complex() arguments are not numbers")
            try:
                return complex(*args)
            except OverflowError:
                raise self.fail("complex() argument is out of range") from None
        if role in ("bytearray", "encode"):
            return self._encode(func, args)
        raise self.fail(f"{func.full} is not callable")

    def _encode(self, func: _Global, args: tuple[Any, ...]) -> bytes:
        if func.role == "bytearray" and len(args) == 1 and isinstance(args[0], (bytes, list)):
            if isinstance(args[0], bytes):
                return args[0]
            if all(isinstance(x, int) and 0 <= x < 256 for x in args[0]):
                return bytes(args[0])
            raise self.fail("bytearray() argument is not a list of bytes")
        if len(args) in (1, 2) and isinstance(args[0], str):
            enc = args[1] if len(args) == 2 else "utf-8"
            codec = {"latin1": "latin-1", "latin-1": "latin-1", "utf-8": "utf-8", "utf8": "utf-8", "ascii": "ascii"}.get(str(enc).lower())
            if codec is None:
                raise self.fail(f"{func.full}() with encoding {enc!r} is not supported")
            try:
                return args[0].encode(codec)
            except UnicodeEncodeError as e:
                raise self.fail(f"{func.full}() argument cannot be encoded: {e}") from None
        raise self.fail(f"{func.full}() arguments are not (str, encoding)")

    def _rebuild(self, func: _Global, args: tuple[Any, ...]) -> _Tensor:
        counts = {"rebuild_v1": (4, 4), "rebuild_v2": (4, 7), "rebuild_v3": (7, 8)}[func.role]
        if not counts[0] <= len(args) <= counts[1]:
            raise self.fail(f"{func.full} takes {counts[0]}-{counts[1]} arguments, got {len(args)}")
        storage = args[0]
        if not isinstance(storage, _Storage):
            raise self.fail(f"{func.full} first argument is a {self._describe(storage)}, not a storage")
        offset = self._int(args[1], "storage_offset")
        shape = self._ints(args[2], "tensor size")
        stride = self._ints(args[3], "tensor stride")
        if len(shape) != len(stride):
            raise self.fail(f"tensor size {list(shape)} and stride {list(stride)} differ in length")
        if func.role == "rebuild_v3":
            dt = args[6]
            if not isinstance(dt, _Global) or dt.role != "dtype":
                raise self.fail(f"{func.full} dtype argument is a {self._describe(dt)}, not a torch dtype")
            dtype, elem = TORCH_DTYPES[dt.name]
            if storage.dtype is not None and storage.dtype != dtype:
                raise self.fail(f"tensor of dtype {dtype} built on a {storage.type_name}")
        elif storage.dtype is None:
            raise self.fail(f"{func.full} on an UntypedStorage needs a dtype (only _rebuild_tensor_v3 has one)")
        else:
            dtype, elem = storage.dtype, storage.elem
        if storage.dtype is None and storage.numel % elem:
            raise self.fail(f"UntypedStorage {storage.key!r} of {storage.numel} bytes does not hold whole {dtype} elements")
        numel_elems = storage.nbytes // elem
        if all(shape):
            last = offset + sum((n - 1) * s for n, s in zip(shape, stride, strict=True))
            if last >= numel_elems:
                raise self.fail(
                    f"tensor (offset {offset}, size {list(shape)}, stride {list(stride)}) reaches element {last} "
                    f"of storage {storage.key!r}, which has {numel_elems}"
                )
        return _Tensor(storage, offset, shape, stride, dtype, elem)


# ----------------------------------------------------------------------------- from records to a Layout
MAX_PATH_DEPTH = 256


def _walk(path: str, root: Any) -> Iterator[tuple[list[str | int], Any]]:
    """Tensors and storages reachable from ``root``, depth-first in pickle order; each container once.

    Paths are parent-linked while walking (deep containers cost O(1) per level), and each level
    holds an iterator over its container, not a copy of its children; a tensor nested deeper than
    MAX_PATH_DEPTH is a FormatError (no checkpoint nests like that, and its name would be absurd).
    """
    seen: set[int] = set()
    Chain = tuple[Any, str | int] | None  # (parent chain, key)
    top = object()
    stack: list[tuple[Chain, int, Iterator[tuple[Any, Any]]]] = [(None, -1, iter([(top, root)]))]
    while stack:
        chain, depth, children = stack[-1]
        item = next(children, None)
        if item is None:
            stack.pop()
            continue
        k, v = item
        if k is not top:
            chain = (chain, k if isinstance(k, (str, int)) and not isinstance(k, bool) else str(k))
        if isinstance(v, (_Tensor, _Storage)):
            if depth + 1 > MAX_PATH_DEPTH:
                raise FormatError(path, "data.pkl", f"a tensor is nested {depth + 1} containers deep (limit {MAX_PATH_DEPTH})")
            keys: list[str | int] = []
            while chain is not None:
                chain, key = chain
                keys.append(key)
            keys.reverse()
            yield keys, v
        elif isinstance(v, (dict, list, tuple)) and id(v) not in seen:
            seen.add(id(v))
            stack.append((chain, depth + 1, iter(v.items()) if isinstance(v, dict) else enumerate(v)))


def _contiguous(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    expect = 1
    for n, s in zip(reversed(shape), reversed(stride), strict=True):
        if n != 1 and s != expect:
            return False
        expect *= n
    return True


def _layout(
    path: str,
    size: int,
    prefix: str,
    byteorder: str,
    members: dict[str, _zip.ZipEntry],
    root: Any,
    storages: dict[str, _Storage],
) -> Layout:
    views: list[dict[str, Any]] = []
    first: dict[str, tuple[str, _Tensor | None]] = {}  # storage key -> (name, first tensor) in walk order
    for keys, v in _walk(path, root):
        name = ".".join(str(k) for k in keys)
        st = v.storage if isinstance(v, _Tensor) else v
        if st.key not in first:
            first[st.key] = (name, v if isinstance(v, _Tensor) else None)
        if isinstance(v, _Tensor):
            views.append(
                {
                    "name": name,
                    "path": keys,
                    "dtype": v.dtype,
                    "shape": list(v.shape),
                    "stride": list(v.stride),
                    "storage_offset": v.offset,
                    "storage": st.key,
                }
            )

    regions: list[TensorRegion] = []
    region_of: dict[str, str | None] = {}
    used_names: set[str] = set()
    storage_meta: list[dict[str, Any]] = []
    order = {k: i for i, k in enumerate(first)}
    for key in sorted(storages, key=lambda k: (order.get(k, len(order)), k)):
        st = storages[key]
        name, t = first.get(key, (f"storage:{key}", None))
        member_name = f"{prefix}/data/{key}"
        entry = members.get(member_name)
        where = f"storage {key!r} (zip entry {member_name!r})"
        if entry is None:
            raise FormatError(path, where, "is referenced by the pickle but missing from the archive")
        if entry.size != st.nbytes:
            raise FormatError(
                path,
                where,
                f"holds {entry.size} bytes but the pickle declares {st.numel} x {st.type_name} = {st.nbytes} bytes",
            )
        dtype, elem = (st.dtype, st.elem) if st.dtype is not None else (t.dtype, t.elem) if t is not None else ("U8", 1)
        if st.dtype is None and st.nbytes % elem:
            dtype, elem = "U8", 1
        if byteorder == "big" and elem > 1:
            dtype = f"{dtype}_BE"  # opaque: the codecs assume little-endian elements
        while name in used_names:  # two key paths that join to the same dotted name
            name = f"{name}#storage:{key}"
        region_name: str | None = None
        if entry.stored:
            used_names.add(name)
            region_name = name
            covers = t is not None and t.offset == 0 and math.prod(t.shape) * t.elem == st.nbytes and _contiguous(t.shape, t.stride)
            shape = t.shape if covers and t is not None else (st.nbytes // elem,)
            regions.append(TensorRegion(name, dtype, tuple(shape), entry.data_offset, entry.size, elem))
        region_of[key] = region_name
        storage_meta.append(
            {
                "key": key,
                "type": st.type_name,
                "dtype": dtype,
                "numel": st.numel,
                "nbytes": st.nbytes,
                "location": st.location,
                "member": member_name,
                "region": region_name,
            }
        )
    for view in views:
        view["region"] = region_of[view["storage"]]
    regions.sort(key=lambda r: (r.offset, r.length))
    unknown_dtypes = {r.dtype for r in regions if r.dtype not in CODEC_DTYPES}
    meta: dict[str, Any] = {"archive": prefix, "byteorder": byteorder, "views": views, "storages": storage_meta}
    note = f"opaque element types: {', '.join(sorted(unknown_dtypes))}" if unknown_dtypes else ""
    return Layout(NAME, size, regions, metadata=meta, note=note)
