"""What a classifier pickle builds, checked while it is built and after.

`spacer_core.legacy` decides which callables a classifier pickle may name.
That is not enough: NumPy trusts a dtype's pickled state, so a pickle that
names only NumPy's own dtype, ``_reconstruct`` and ``scalar`` can still give
a dtype an object field over raw bytes. The arrays it makes then hold
"objects" that are arbitrary pointers, and the process crashes when they
are touched. So no state from the file reaches NumPy unchecked:

- ``numpy.dtype`` resolves to `PendingDtype`, which records the type code
  and accepts only the state of a plain dtype (no fields, no sub-array, no
  metadata); the real dtype is rebuilt from the type code and byte order;
- arrays are made by `checked_reconstruct` as `_PendingArray` (an ndarray
  subclass whose ``__setstate__`` checks dtype, shape, data type and size
  before NumPy reads the bytes), scalars by `checked_scalar` and protocol 5
  buffers by `checked_frombuffer`; only bool, integer, float, complex and
  text dtypes are built, never one that holds objects;
- Python 2's ``copy_reg._reconstructor`` only makes scikit-learn objects,
  and a scikit-learn class the pickle calls makes a bare object (`bare_class`):
  no ``__init__`` runs on the file's arguments (AdamOptimizer's would
  allocate a copy of every array it is given, however often one repeats);
- no allowed callable does work that grows faster than its arguments: the
  codec call is only what protocol 2 writes for bytes (`checked_encode`:
  text to latin-1, which is linear; punycode is quadratic), and random
  generators are seeded only with small seeds (`checked_mt19937`,
  `checked_seed_sequence`: a huge integer seed takes quadratic time to
  convert) or built as a pickle rebuilds them (`checked_bit_generator_ctor`,
  `checked_randomstate_ctor`, `checked_unpickle_seed_sequence`);
- what the checked constructors make (arrays, scalars, encoded bytes) is
  charged against a byte budget of the pickle's own size (`byte_budget`):
  a genuine pickle stores each array's data once, while a crafted one can
  name one string a thousand times and have each use copied;
- `check_graph` then walks everything the pickle built: only the types a
  trained classifier holds may appear (estimators, lists, tuples, dicts with
  string keys, numbers, strings, plain arrays), at most `MAX_DEPTH` levels
  deep, `_PendingArray` instances become plain ndarrays, and random
  generators hold a valid MT19937 state (624 words, position 0 to 624);
- `check_classifier` checks the arrays ``predict_proba`` reads have the
  dimensions and numeric types it expects, and agree with each other
  (classes, calibrators, weights, layers and input width).

Every refusal is an UnsafePickleError ("refused to load classifier: ...").
"""

from __future__ import annotations

import contextlib
import importlib
import math
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from functools import cache
from typing import Any

import numpy as np

from spacer_core.exceptions import UnsafePickleError

# Kinds of dtype a classifier's arrays and scalars may have: bool, signed
# and unsigned integers, floats, complex, bytes and unicode text.
SAFE_KINDS = frozenset("biufcSU")
MAX_DEPTH = 16
_MAX_NDIM = 8
_MAX_TYPECODE = 16

_NUMPY_CORE = "numpy._core" if int(np.__version__.split(".")[0]) >= 2 else "numpy.core"
_multiarray = importlib.import_module(f"{_NUMPY_CORE}.multiarray")
_numeric_module = importlib.import_module(f"{_NUMPY_CORE}.numeric")
_np_reconstruct = _multiarray._reconstruct
_np_scalar = _multiarray.scalar
_np_frombuffer = _numeric_module._frombuffer
_np_unpickle_seed_sequence = getattr(
    importlib.import_module("numpy.random.bit_generator"), "__pyx_unpickle_SeedSequence"
)
MT19937 = np.random.MT19937
SeedSequence = np.random.SeedSequence
RandomState = np.random.RandomState

# Random generator seeds: what numpy draws itself (128 bits) or a user's
# small integers; a pickle of a trained classifier holds no other.
_MAX_SEED_BITS = 128
_MAX_SEED_WORDS = 32
_MAX_POOL_SIZE = 64
_MT_WORDS = 624


class _Budget:
    def __init__(self, nbytes: int):
        self.left = nbytes
        # Data objects arrays were built over, kept alive so their ids stay theirs.
        self.used: dict[int, Any] = {}


# Bytes the pickle being loaded may still have built for it (None: no budget).
_budget: ContextVar[_Budget | None] = ContextVar("pickle_guard_budget", default=None)


@contextlib.contextmanager
def byte_budget(nbytes: int) -> Iterator[None]:
    """Within this block, the checked constructors may make at most `nbytes` bytes in all."""
    token = _budget.set(_Budget(nbytes))
    try:
        yield
    finally:
        _budget.reset(token)


def _charge(nbytes: int, what: str) -> None:
    budget = _budget.get()
    if budget is None:
        return
    budget.left -= nbytes
    if budget.left < 0:
        raise refused(f"{what}: the pickle builds more bytes than it holds (its data reused to make copies)")


def _charge_data(data: bytes | str) -> None:
    """Charge an array's data when it may cost new memory: a str (NumPy copies it) or data
    an earlier array was built over (reused, so a copy: byte-swapped, or made writable).
    The first use of bytes is free: they are the file's own, or `checked_encode` charged them."""
    budget = _budget.get()
    if budget is None:
        return
    if isinstance(data, str) or id(data) in budget.used:
        _charge(len(data), "a NumPy array")
    budget.used[id(data)] = data


def _a(noun: str) -> str:
    return f"an {noun}" if noun[:1].lower() in "aeiou" else f"a {noun}"


def refused(what: str) -> UnsafePickleError:
    """The error for a pickle that builds ``what``."""
    return UnsafePickleError(
        f"refused to load classifier: the pickle builds {what}, which a trained classifier never holds."
    )


def _describe(dtype: np.dtype) -> str:
    # Only plain attributes: str() of a tampered dtype is not safe to call.
    if dtype.fields is not None:
        return "a NumPy dtype with fields"
    if dtype.subdtype is not None:
        return "a NumPy sub-array dtype"
    return f"a NumPy dtype of kind {dtype.kind!r}"


def check_dtype(dtype: Any) -> np.dtype:
    """A canonical copy of ``dtype`` if it is a plain dtype of a safe kind, else UnsafePickleError."""
    if not isinstance(dtype, np.dtype):
        raise refused(f"{_a(type(dtype).__name__)} where a NumPy dtype belongs")
    if (
        dtype.fields is not None
        or dtype.subdtype is not None
        or dtype.kind not in SAFE_KINDS
        or dtype.hasobject
    ):
        raise refused(_describe(dtype))
    canonical = np.dtype(dtype.str)
    if canonical.itemsize != dtype.itemsize:
        raise refused("a NumPy dtype whose size does not match its type")
    return canonical


def _typecode_dtype(typecode: Any) -> np.dtype:
    if isinstance(typecode, bytes):
        typecode = typecode.decode("latin1")
    if not isinstance(typecode, str) or not typecode or len(typecode) > _MAX_TYPECODE:
        raise refused(f"a NumPy dtype from {_a(type(typecode).__name__)} type code")
    try:
        dtype = np.dtype(typecode)
    except (TypeError, ValueError, SyntaxError):
        raise refused(f"a NumPy dtype from the unknown type code {typecode!r}") from None
    return check_dtype(dtype)


def resolve_dtype(value: Any) -> np.dtype:
    """The checked dtype a pickle means by ``value`` (a PendingDtype or a type code)."""
    if isinstance(value, PendingDtype):
        return value.dtype
    if isinstance(value, (str, bytes)):
        return _typecode_dtype(value)
    raise refused(f"{_a(type(value).__name__)} where a NumPy dtype belongs")


# Where each field of a pickled dtype state sits, by the state's length
# (NumPy's formats 0 to 4): (endian, structural fields that must be None, elsize).
_STATE_LAYOUTS = {
    9: (1, (2, 3, 4, 8), 5),
    8: (1, (2, 3, 4), 5),
    7: (1, (2, 3, 4), 5),
    6: (1, (2, 3), 4),
    5: (0, (1, 2), 3),
}


class PendingDtype:
    """What ``numpy.dtype`` resolves to in a classifier pickle: a dtype rebuilt from checked parts."""

    __slots__ = ("dtype",)

    def __init__(self, typecode: Any, align: Any = False, copy: Any = False):
        for flag in (align, copy):
            if not isinstance(flag, (bool, int)):
                raise refused(f"a NumPy dtype with {_a(type(flag).__name__)} flag")
        self.dtype = _typecode_dtype(typecode)
        if self.dtype.itemsize == 0 and self.dtype.kind not in "SU":
            raise refused("a NumPy dtype of size 0")

    def __setstate__(self, state: Any) -> None:
        layout = _STATE_LAYOUTS.get(len(state)) if isinstance(state, tuple) else None
        if layout is None:
            raise refused("a NumPy dtype with an unreadable state")
        endian_at, structural, elsize_at = layout
        endian, elsize = state[endian_at], state[elsize_at]
        if any(state[i] is not None for i in structural):
            raise refused("a NumPy dtype with fields, a sub-array or metadata")
        if endian not in ("<", ">", "|", "=") or not isinstance(elsize, int):
            raise refused("a NumPy dtype with an unreadable state")
        dtype = self.dtype
        if dtype.itemsize and elsize not in (-1, dtype.itemsize):
            raise refused("a NumPy dtype whose size does not match its type")
        if dtype.itemsize == 0:  # an unsized text type: the state gives the size
            if not 0 < elsize <= 1 << 20:
                raise refused("a NumPy text dtype without a size")
            dtype = np.dtype(f"{dtype.kind}{elsize // 4 if dtype.kind == 'U' else elsize}")
        if endian in "<>":
            dtype = dtype.newbyteorder(endian)
        self.dtype = check_dtype(dtype)


def _shape(value: Any) -> tuple[int, ...]:
    if not isinstance(value, tuple) or len(value) > _MAX_NDIM:
        raise refused("a NumPy array with an unreadable shape")
    dims = []
    for dim in value:
        if not isinstance(dim, (int, np.integer)) or isinstance(dim, bool) or dim < 0:
            raise refused("a NumPy array with an unreadable shape")
        dims.append(int(dim))
    return tuple(dims)


def _check_size(shape: tuple[int, ...], dtype: np.dtype, nbytes: int) -> None:
    if math.prod(shape) * dtype.itemsize != nbytes:
        raise refused(f"a NumPy array of shape {shape} over {nbytes} bytes of data")


class _PendingArray(np.ndarray):
    """An array being unpickled: its state is checked before NumPy reads it."""

    def __new__(cls, *args: Any, **kwargs: Any) -> _PendingArray:
        raise refused("a NumPy array from a direct call of numpy.ndarray")

    def __reduce_ex__(self, protocol: Any) -> Any:
        # One that check_graph cannot replace (a RandomState's seed pool) is
        # pickled again as the plain array it is.
        return self.view(np.ndarray).__reduce_ex__(protocol)

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise refused("a NumPy array with an unreadable state")
        shape, dtype_value, fortran, data = state[-4:]
        shape = _shape(shape)
        dtype = resolve_dtype(dtype_value)
        if not isinstance(fortran, (bool, int)):
            raise refused("a NumPy array with an unreadable state")
        if not isinstance(data, (bytes, str)):
            # A list is how NumPy pickles object arrays.
            raise refused(f"a NumPy array whose data is {_a(type(data).__name__)}")
        _check_size(shape, dtype, len(data))
        _charge_data(data)
        checked: Any = (1, shape, dtype, bool(fortran), data)
        np.ndarray.__setstate__(self, checked)


def checked_reconstruct(subtype: Any, shape: Any, typecode: Any) -> np.ndarray:
    """``numpy.core.multiarray._reconstruct``: an empty array whose state comes next."""
    if subtype is not _PendingArray or _shape(shape) != (0,):
        raise refused("a NumPy array from unexpected arguments")
    return _np_reconstruct(_PendingArray, (0,), resolve_dtype(typecode))


def checked_scalar(dtype_value: Any, data: Any = None) -> Any:
    """``numpy.core.multiarray.scalar``: a NumPy scalar from its bytes."""
    dtype = resolve_dtype(dtype_value)
    if not isinstance(data, (bytes, str)) or len(data) != dtype.itemsize:
        raise refused(f"a NumPy scalar from {_a(type(data).__name__)} of the wrong size")
    _charge(len(data), "a NumPy scalar")
    return _np_scalar(dtype, data)


def checked_frombuffer(buffer: Any, dtype_value: Any, shape: Any, order: Any) -> np.ndarray:
    """``numpy.core.numeric._frombuffer`` (pickle protocol 5): an array over an out-of-band buffer."""
    dtype = resolve_dtype(dtype_value)
    shape = _shape(shape)
    if order not in ("C", "F"):
        raise refused("a NumPy array with an unknown memory order")
    try:
        nbytes = memoryview(buffer).nbytes
    except TypeError:
        raise refused(f"a NumPy array over {_a(type(buffer).__name__)}") from None
    _check_size(shape, dtype, nbytes)
    return _np_frombuffer(buffer, dtype, shape, order)


def checked_reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """Python 2's ``copy_reg._reconstructor``, limited to making scikit-learn objects."""
    cls = getattr(cls, "_bare_of", cls)
    if not (
        isinstance(cls, type)
        and cls.__module__.startswith("sklearn.")
        and cls.__new__ is object.__new__
        and base is object
        and state is None
    ):
        raise refused(f"{_a(getattr(cls, '__name__', type(cls).__name__))} through copy_reg")
    return object.__new__(cls)


@cache
def bare_class(cls: type) -> type:
    """What a scikit-learn class resolves to: calling it makes an object without running ``__init__``.

    A pickle makes its objects with ``cls.__new__(cls)`` and sets their
    state; calling the class instead (REDUCE) would run ``__init__`` on the
    file's arguments. Called either way, this subclass returns a bare
    instance of ``cls`` itself, whose state the pickle then sets.
    """

    def __new__(klass: type, *args: Any, **kwargs: Any) -> Any:
        return object.__new__(cls)

    return type(cls.__name__, (cls,), {"__new__": __new__, "__module__": __name__, "_bare_of": cls})


def checked_encode(obj: Any, encoding: Any = "utf-8", errors: Any = "strict") -> bytes:
    """``_codecs.encode`` as pickle protocol 2 writes bytes: ``encode(text, 'latin1')``, nothing else."""
    if (
        type(obj) is not str
        or type(encoding) is not str
        or encoding.lower() not in ("latin1", "latin-1")
        or errors != "strict"
    ):
        raise refused(
            f"{_a(type(obj).__name__)} encoded other than as protocol 2 writes bytes (text to latin-1)"
        )
    _charge(len(obj), "encoded bytes")
    return obj.encode("latin-1")


def _small_int(value: Any) -> bool:
    # bit_length is constant time, however large the integer.
    return bool(
        isinstance(value, (int, np.integer))
        and not isinstance(value, (bool, np.bool_))
        and 0 <= value
        and int(value).bit_length() <= _MAX_SEED_BITS
    )


def _check_seed(seed: Any, what: str) -> None:
    if seed is None or _small_int(seed):
        return
    if (
        isinstance(seed, (list, tuple, np.ndarray))
        and len(seed) <= _MAX_SEED_WORDS
        and all(_small_int(word) for word in seed)
    ):
        return
    if isinstance(seed, int):
        raise refused(f"{what} seeded with an integer of {seed.bit_length()} bits")
    raise refused(f"{what} seeded with {_a(type(seed).__name__)}")


def checked_mt19937(seed: Any = None) -> Any:
    """``numpy.random.MT19937``: only small seeds."""
    _check_seed(seed, "a random generator")
    return MT19937(seed)


def checked_seed_sequence(entropy: Any = None) -> Any:
    """``numpy.random.SeedSequence``: only small seeds."""
    _check_seed(entropy, "a seed sequence")
    return SeedSequence(entropy)


def checked_bit_generator_ctor(bit_generator: Any = "MT19937") -> Any:
    """numpy's ``__bit_generator_ctor``: an MT19937 (its state comes next), named or by class."""
    if not (bit_generator is checked_mt19937 or (type(bit_generator) is str and bit_generator == "MT19937")):
        raise refused(f"a random generator from {_a(type(bit_generator).__name__)}")
    return MT19937()


def checked_randomstate_ctor(
    bit_generator_name: Any = "MT19937", bit_generator_ctor: Any = checked_bit_generator_ctor
) -> Any:
    """numpy's ``__randomstate_ctor``: a RandomState over an MT19937 (its state comes next)."""
    if type(bit_generator_name) is MT19937:
        return RandomState(bit_generator_name)
    if bit_generator_ctor is not checked_bit_generator_ctor:
        raise refused(f"a RandomState from {_a(type(bit_generator_ctor).__name__)}")
    return RandomState(checked_bit_generator_ctor(bit_generator_name))


def checked_unpickle_seed_sequence(cls: Any, checksum: Any, state: Any = None) -> Any:
    """numpy's ``__pyx_unpickle_SeedSequence``: an empty SeedSequence (checked with the rest after loading)."""
    if (
        cls is not checked_seed_sequence
        or not isinstance(checksum, int)
        or not (state is None or type(state) is tuple)
    ):
        raise refused("a seed sequence from unexpected arguments")
    return _np_unpickle_seed_sequence(SeedSequence, checksum, state)


# (module, name) of the callables above, as a pickle names what they replace.
REPLACEMENTS: dict[tuple[str, str], Any] = {
    ("numpy", "dtype"): PendingDtype,
    ("numpy", "ndarray"): _PendingArray,
    (f"{_NUMPY_CORE}.multiarray", "_reconstruct"): checked_reconstruct,
    (f"{_NUMPY_CORE}.multiarray", "scalar"): checked_scalar,
    (f"{_NUMPY_CORE}.numeric", "_frombuffer"): checked_frombuffer,
    ("copyreg", "_reconstructor"): checked_reconstructor,
    ("_codecs", "encode"): checked_encode,
    ("numpy.random._mt19937", "MT19937"): checked_mt19937,
    ("numpy.random.bit_generator", "SeedSequence"): checked_seed_sequence,
    ("numpy.random.bit_generator", "__pyx_unpickle_SeedSequence"): checked_unpickle_seed_sequence,
    ("numpy.random._pickle", "__bit_generator_ctor"): checked_bit_generator_ctor,
    ("numpy.random._pickle", "__randomstate_ctor"): checked_randomstate_ctor,
}


# ------------------------------------------------------------ after loading

_LEAVES = (type(None), bool, int, float, str)


@cache
def _object_types(allowed: frozenset[tuple[str, str]]) -> frozenset[type]:
    """Classes in the allowlist whose instances may appear in a classifier (plus RandomState)."""
    found: set[type] = {np.random.RandomState}
    for module, name in allowed:
        value = getattr(importlib.import_module(module), name, None)
        if isinstance(value, type) and value not in (np.ndarray, np.dtype, object):
            found.add(value)
    return frozenset(found)


def _check_plain(dtype: np.dtype) -> None:
    # The wrappers built every array and scalar from checked dtypes; this
    # cheaper check (no canonical copy) makes sure nothing else slipped in.
    if (
        dtype.fields is not None
        or dtype.subdtype is not None
        or dtype.kind not in SAFE_KINDS
        or dtype.hasobject
    ):
        raise refused(_describe(dtype))


class _Walk:
    def __init__(self, allowed: frozenset[tuple[str, str]]):
        self.types = _object_types(allowed)
        self.done: dict[int, Any] = {}

    def check(self, obj: Any, where: str, depth: int) -> Any:
        key = id(obj)
        if key in self.done:
            return self.done[key]
        kind = type(obj)
        if kind in _LEAVES:
            return obj
        if depth > MAX_DEPTH:
            raise refused(f"objects nested more than {MAX_DEPTH} levels deep (at {where})")
        if kind is _PendingArray or kind is np.ndarray:
            _check_plain(obj.dtype)
            out = obj.view(np.ndarray) if kind is _PendingArray else obj
        elif isinstance(obj, np.generic) and kind.__module__ == "numpy":
            _check_plain(obj.dtype)
            out = obj
        elif kind is RandomState or kind is MT19937 or kind is SeedSequence:
            _check_random(obj, where)
            out = obj
        elif kind is list:
            obj[:] = self._items(obj, where, depth)
            out = obj
        elif kind is tuple:
            out = tuple(self._items(obj, where, depth))
        elif kind is dict:
            self._members(obj, where, depth)
            out = obj
        elif kind in self.types:
            members = getattr(obj, "__dict__", None)
            if members is not None:  # scikit-learn objects; Cython ones have none
                self._members(members, where, depth)
            out = obj
        else:
            raise refused(f"{_a(kind.__name__)} (at {where})")
        self.done[key] = out
        return out

    def _items(self, items: Iterable[Any], where: str, depth: int) -> list[Any]:
        return [self.check(item, f"{where}[{i}]", depth + 1) for i, item in enumerate(items)]

    def _members(self, members: dict[Any, Any], where: str, depth: int) -> None:
        for name in list(members):
            if type(name) is not str:
                raise refused(f"{_a(type(name).__name__)} attribute name (at {where})")
            members[name] = self.check(members[name], f"{where}.{name}", depth + 1)


def _check_seed_sequence(seq: Any, where: str) -> None:
    try:
        pool, pool_size, entropy = seq.pool, seq.pool_size, seq.entropy
        spawn_key, children = seq.spawn_key, seq.n_children_spawned
    except (AttributeError, ValueError, TypeError):
        raise refused(f"a seed sequence without a state (at {where})") from None
    _check_seed(entropy, f"a seed sequence (at {where})")
    if not (
        0 < pool_size <= _MAX_POOL_SIZE
        and np.shape(pool) == (pool_size,)
        and type(spawn_key) is tuple
        and len(spawn_key) <= _MAX_SEED_WORDS
        and all(_small_int(k) for k in spawn_key)
        and _small_int(children)
    ):
        raise refused(f"a seed sequence with an invalid state (at {where})")


def _check_random(obj: Any, where: str) -> None:
    """A RandomState, MT19937 or SeedSequence holds a state NumPy can use without reading out of bounds."""
    if type(obj) is SeedSequence:
        _check_seed_sequence(obj, where)
        return
    if type(obj) is RandomState:
        generator = obj._bit_generator
        if type(generator) is not MT19937:
            raise refused(f"a RandomState over {_a(type(generator).__name__)} (at {where})")
        full = obj.get_state(legacy=False)
        if full.get("has_gauss") not in (0, 1) or not isinstance(full.get("gauss"), float):
            raise refused(f"a RandomState with an invalid state (at {where})")
        obj, state = generator, full["state"]
    else:
        state = obj.state["state"]
    key, pos = state["key"], state["pos"]
    if np.shape(key) != (_MT_WORDS,) or not isinstance(pos, int) or not 0 <= pos <= _MT_WORDS:
        raise refused(f"a random generator at position {pos} of its {_MT_WORDS}-word state (at {where})")
    seq = obj._seed_seq
    if seq is not None:
        if type(seq) is not SeedSequence:
            raise refused(f"a random generator seeded from {_a(type(seq).__name__)} (at {where})")
        _check_seed_sequence(seq, where)


def check_graph(obj: Any, allowed: frozenset[tuple[str, str]]) -> Any:
    """``obj`` with every array a plain ndarray, or UnsafePickleError for anything a classifier never holds."""
    return _Walk(allowed).check(obj, "classifier", 0)


# ------------------------------------------------------------ what predict_proba reads


def _bad(what: str) -> UnsafePickleError:
    return UnsafePickleError(f"refused to load classifier: {what}.")


def _need(ok: bool, what: str) -> None:
    if not ok:
        raise _bad(what)


def _numeric_array(value: Any, ndim: int, name: str) -> np.ndarray:
    _need(
        isinstance(value, np.ndarray) and value.ndim == ndim and value.dtype.kind in "biuf",
        f"'{name}' is not a {ndim}-D numeric array",
    )
    # NaN or infinite weights would score every point NaN, not fail: refuse them here.
    _need(value.dtype.kind != "f" or bool(np.isfinite(value).all()), f"'{name}' holds NaN or infinite values")
    return value


def _labels(value: Any, name: str) -> None:
    # Class labels: numbers (CoralNet's label ids) or text.
    _need(isinstance(value, np.ndarray) and value.ndim == 1 and value.dtype.kind in "biuUS",
          f"'{name}' is not a 1-D array of class labels")  # fmt: skip


def _check_linear(est: Any) -> None:
    coef = _numeric_array(getattr(est, "coef_", None), 2, "coef_")
    intercept = _numeric_array(getattr(est, "intercept_", None), 1, "intercept_")
    _need(intercept.shape[0] == coef.shape[0], "'intercept_' does not match 'coef_'")


def _check_mlp(est: Any) -> None:
    from sklearn.neural_network._base import ACTIVATIONS

    coefs, intercepts = getattr(est, "coefs_", None), getattr(est, "intercepts_", None)
    if not (isinstance(coefs, list) and isinstance(intercepts, list) and len(coefs) == len(intercepts) > 0):
        raise _bad("'coefs_' and 'intercepts_' are not matching lists")
    for i, (coef, intercept) in enumerate(zip(coefs, intercepts)):
        _numeric_array(coef, 2, f"coefs_[{i}]")
        _numeric_array(intercept, 1, f"intercepts_[{i}]")
        _need(intercept.shape[0] == coef.shape[1], f"'intercepts_[{i}]' does not match 'coefs_[{i}]'")
        if i:
            _need(coefs[i - 1].shape[1] == coef.shape[0], f"'coefs_[{i}]' does not follow 'coefs_[{i - 1}]'")
    _need(getattr(est, "n_layers_", None) == len(coefs) + 1, "'n_layers_' does not match 'coefs_'")
    for name in ("activation", "out_activation_"):
        _need(getattr(est, name, None) in ACTIVATIONS, f"'{name}' is not a known activation")


def _width(est: Any) -> int:
    """The number of features ``est`` reads (its weights checked already)."""
    coef = getattr(est, "coef_", None)
    return int(coef.shape[1]) if isinstance(coef, np.ndarray) else int(est.coefs_[0].shape[0])


def _outputs(est: Any) -> int:
    """The number of score columns ``est`` computes."""
    coef = getattr(est, "coef_", None)
    return int(coef.shape[0]) if isinstance(coef, np.ndarray) else int(est.coefs_[-1].shape[1])


def _declared_width(holder: Any, width: int, name: str) -> None:
    declared = getattr(holder, "n_features_in_", None)
    if declared is None:
        return
    _need(
        isinstance(declared, (int, np.integer)) and not isinstance(declared, bool) and declared == width,
        f"'{name}n_features_in_' is {declared!r} but the weights read {width} features",
    )


def _check_agreement(clf: Any, one: Any, est: Any, i: int, known: set[Any]) -> int:
    """Classes, calibrators, score columns and input width of one calibrated estimator agree; its width.

    `known`: the labels of ``clf.classes_``.
    """
    n = len(clf.classes_)
    where = f"calibrated_classifiers_[{i}]"
    _need(n >= 2, f"'classes_' has {n} class(es); a classifier needs at least 2")
    _labels(getattr(one, "classes", None), f"{where}.classes")
    for name, labels in ((f"{where}.classes", one.classes), (f"{where}.estimator.classes_", est.classes_)):
        _need(len(labels) == n, f"'{name}' has {len(labels)} classes but 'classes_' has {n}")
        _need(known.issuperset(labels.tolist()), f"'{name}' holds labels that 'classes_' does not")
    columns = 1 if n == 2 else n  # a binary classifier scores one column
    outputs = _outputs(est)
    _need(outputs == columns, f"'{where}.estimator' computes {outputs} score columns for {n} classes")
    if isinstance(getattr(est, "coefs_", None), list):
        _need(
            getattr(est, "n_outputs_", None) == outputs,
            f"'{where}.estimator.n_outputs_' does not match its last layer",
        )
    calibrators = len(one.calibrators)
    _need(calibrators == columns, f"'{where}' has {calibrators} calibrators for {columns} score columns")
    width = _width(est)
    _need(width > 0, f"'{where}.estimator' reads no features")
    _declared_width(est, width, f"{where}.estimator.")
    return width


def check_classifier(clf: Any) -> None:
    """The arrays and numbers ``predict_proba`` reads have the shapes and types it expects, and agree."""
    from sklearn.calibration import _CalibratedClassifier, _SigmoidCalibration
    from sklearn.linear_model import SGDClassifier
    from sklearn.neural_network import MLPClassifier

    _labels(getattr(clf, "classes_", None), "classes_")
    calibrated = getattr(clf, "calibrated_classifiers_", None)
    if not (isinstance(calibrated, list) and calibrated):
        raise _bad("'calibrated_classifiers_' is not a list of classifiers")
    widths = set()
    known = set(clf.classes_.tolist())
    for i, one in enumerate(calibrated):
        _need(
            isinstance(one, _CalibratedClassifier),
            "'calibrated_classifiers_' holds something else than classifiers",
        )
        est = getattr(one, "estimator", None)
        if isinstance(est, SGDClassifier):
            _check_linear(est)
        elif isinstance(est, MLPClassifier):
            _check_mlp(est)
        else:
            raise _bad(f"its estimator is a {type(est).__name__}")
        _labels(getattr(est, "classes_", None), "estimator.classes_")
        calibrators = getattr(one, "calibrators", None)
        if not (
            isinstance(calibrators, list) and all(isinstance(c, _SigmoidCalibration) for c in calibrators)
        ):
            raise _bad("'calibrators' is not a list of sigmoid calibrations")
        for calibrator in calibrators:
            for name in ("a_", "b_"):
                value = getattr(calibrator, name, None)
                _need(isinstance(value, (float, int, np.floating, np.integer)) and not isinstance(value, bool)
                      and math.isfinite(value), f"calibration '{name}' is not a finite number")  # fmt: skip
        widths.add(_check_agreement(clf, one, est, i, known))
    _need(
        len(widths) == 1, f"its calibrated classifiers read different numbers of features ({sorted(widths)})"
    )
    _declared_width(clf, widths.pop(), "")
