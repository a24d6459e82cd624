"""bncheck's restricted reader against ``torch.load`` as the oracle, on checkpoints that hold only
tensors and plain data: every format and protocol gives the same tensors (values, dtypes,
shapes, strides, shared storages)."""

from __future__ import annotations

import pickle
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from bncheck._readers import read_legacy, read_torch_zip
from bncheck._safe_pickle import scan_pickle
from bncheck.errors import LoadError

DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.float8_e4m3fn,
    torch.uint16,
]


def _read(path: Path, fmt: str):
    size = path.stat().st_size
    if fmt == "zip":
        return read_torch_zip(path, path, size, False)[0]
    return read_legacy(path, size, False)[0]


def _same(got, want) -> None:
    assert type(got) is type(want) or isinstance(got, type(want)), (type(got), type(want))
    if isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert got.stride() == want.stride()
        torch.testing.assert_close(got.double(), want.double(), rtol=0, atol=0, equal_nan=True)
    elif isinstance(want, dict):
        assert list(got) == list(want)
        for key in want:
            _same(got[key], want[key])
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want)
        for a, b in zip(got, want):
            _same(a, b)
    else:
        assert got == want


tensors = st.builds(
    lambda dtype, shape, seed, transpose: (
        lambda t: t.transpose(0, 1) if transpose and t.dim() >= 2 else t
    )((torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 10).to(dtype)),
    st.sampled_from(DTYPES),
    st.lists(st.integers(0, 4), max_size=3).map(tuple),
    st.integers(0, 1000),
    st.booleans(),
)


@settings(max_examples=15, deadline=None)
@given(
    st.dictionaries(st.text("abc.", min_size=1, max_size=6), tensors, min_size=1, max_size=5),
    st.sampled_from(["zip", "legacy", "plain"]),
    st.sampled_from([2, 4]),
    st.booleans(),
)
def test_restricted_reader_matches_torch_load(tmp_path_factory, sd, fmt, protocol, share):
    new_dtypes = (torch.float8_e4m3fn, torch.uint16)  # torch.load cannot read them in legacy
    assume(fmt == "zip" or all(t.dtype not in new_dtypes for t in sd.values()))
    assume(fmt != "plain" or not share)  # pickle.dumps copies each storage on its own
    sd = OrderedDict(sd)
    if share and len(sd) >= 1:  # a view sharing the first tensor's storage, at an offset
        first = next(iter(sd.values()))
        if first.numel() >= 2 and first.is_contiguous():
            sd["view"] = first.view(-1)[1:]
    path = tmp_path_factory.mktemp("ckpt") / "sd.pt"
    if fmt == "plain":
        path.write_bytes(pickle.dumps(sd, protocol=protocol))
        want = pickle.loads(path.read_bytes())  # the oracle: files made by this test only
    else:
        zipped = fmt == "zip"
        torch.save(sd, path, pickle_protocol=protocol, _use_new_zipfile_serialization=zipped)
        want = torch.load(path, weights_only=False)
    got = _read(path, fmt)
    _same(got, want)
    if "view" in sd:  # shared storage stays shared
        first_key = next(iter(sd))
        assert (
            got["view"].untyped_storage().data_ptr() == got[first_key].untyped_storage().data_ptr()
        )


def test_parameters_and_plain_values_beside_tensors(tmp_path):
    param = torch.nn.Parameter(torch.randn(3))
    obj = {"w": param, "n": 3, "lr": 0.1, "names": ["a", "b"], "t": (1, 2), "s": {1, 2}}
    path = tmp_path / "mixed.pt"
    torch.save(obj, path)
    got = _read(path, "zip")
    assert isinstance(got["w"], torch.nn.Parameter) and torch.equal(got["w"], param)
    assert got["n"] == 3 and got["names"] == ["a", "b"] and got["t"] == (1, 2)
    assert got["s"] == {1, 2}


def test_a_pickle_with_too_many_opcodes_is_refused(tmp_path, monkeypatch):
    import bncheck._safe_pickle

    monkeypatch.setattr(bncheck._safe_pickle, "MAX_OPCODES", 1000)
    data = b"\x80\x02]" + b"N" * 2000 + b"."
    assert scan_pickle(data).too_long
    path = tmp_path / "long.pkl"
    path.write_bytes(data)
    with pytest.raises(LoadError, match=r"more than \d+ opcodes"):
        read_legacy(path, path.stat().st_size, False)


def test_plain_pickle_holding_a_list_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "list.pkl"
    path.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(
        LoadError, match=r"a pickle but not a PyTorch checkpoint \(it holds a list\)"
    ):
        read_legacy(path, path.stat().st_size, False)
