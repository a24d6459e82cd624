"""The pickle opcode simulator against an oracle: a real unpickler that records what it imports.

The oracle (``_Recorder``) runs the pickle with ``find_class`` replaced by a recorder that
returns an inert stand-in, so nothing the pickle names is executed; every import the real
unpickler would make must be among the names the simulator reports.
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
import subprocess
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from bncheck._safe_pickle import RestrictedUnpickler, scan_pickle

_GETATTR_HELPERS = {"builtins.getattr", "__builtin__.getattr"}


class _Inert:
    def __init__(self, *args, **kwargs) -> None:
        pass

    def __call__(self, *args, **kwargs):
        return _Inert()

    def __getattr__(self, name):
        return _Inert()

    def __setstate__(self, state) -> None:
        pass


class _Recorder(pickle.Unpickler):
    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data))
        self.seen: list[str] = []

    def find_class(self, module: str, name: str):
        self.seen.append(f"{module}.{name}")
        if f"{module}.{name}" in _GETATTR_HELPERS:
            return lambda obj, attr: _Inert()
        return _Inert


class _Calls:
    """Pickles as a call of ``func`` (a real callable: only ever recorded, never run)."""

    def __init__(self, func, args) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


_CALLABLES = [os.system, shutil.rmtree, subprocess.call, Path.touch, os.path.join, eval]
plain = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary(),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=40, deadline=None)
@given(plain, st.integers(0, 5))
def test_plain_data_imports_nothing_and_loads_the_same(value, protocol):
    data = pickle.dumps(value, protocol=protocol)
    scan = scan_pickle(data)
    assert scan.unsafe() == [], scan
    assert RestrictedUnpickler(io.BytesIO(data)).load() == value


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.sampled_from(range(len(_CALLABLES))), min_size=1, max_size=4),
    plain,
    st.integers(0, 5),
    st.booleans(),
)
def test_every_import_the_unpickler_makes_is_reported(picks, filler, protocol, nest):
    payload = [filler] + [_Calls(_CALLABLES[i], ("x",)) for i in picks]
    data = pickle.dumps(payload, protocol=protocol)
    if nest:  # the same payload inside a nested pickle, handed to pickle.loads
        data = pickle.dumps(_Calls(pickle.loads, (data,)), protocol=protocol)
    recorder = _Recorder(data)
    recorder.load()
    scan = scan_pickle(data)
    reported = set(scan.imports)
    for name in set(recorder.seen) - _GETATTR_HELPERS:
        assert name in reported, (name, scan)
    if nest:  # the inner imports are reported although the outer pickle never makes them
        inner = _Recorder(pickle.dumps(payload, protocol=protocol))
        inner.load()
        assert set(inner.seen) - _GETATTR_HELPERS <= reported
