"""The benchmark's peers compute what our ops compute (else comparing their speed means nothing),
and the bench CLI runs and names the machine."""

import pytest
import torch

from semask_fast import _bench
from semask_fast.__main__ import main

CASES = [c for c in _bench.bench_cases("small") if c.peers]


@pytest.mark.parametrize("case", CASES, ids=[c.op for c in CASES])
def test_peers_match_reference(case):
    torch.manual_seed(0)
    tensors = case.make(torch.device("cpu"), torch.float64)
    want = case.call("reference", **tensors)
    want = want if isinstance(want, tuple) else (want,)
    for name, peer in case.peers.items():
        got = peer(**tensors)
        got = got if isinstance(got, tuple) else (got,)
        assert len(got) == len(want), name
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10, msg=lambda m: f"{case.op} {name}: {m}")


def test_every_attention_op_has_a_peer():
    assert {c.op for c in CASES} == {"window_attention", "semantic_attention", "atm_attention"}


def test_bench_cli_names_machine_and_peers(capsys, monkeypatch):
    # Time only the peers and the reference of one case (the CLI filters nothing else: keep it quick).
    monkeypatch.setattr(_bench, "bench_cases", lambda scale: CASES[:1])
    monkeypatch.setattr(_bench, "time_call", lambda fn, device, **kw: (fn(), 1e-3)[1])
    assert main(["bench"]) == 0
    out = capsys.readouterr().out
    assert "timings" in out and " on " in out.splitlines()[0]
    assert "peer: timm fused (torch SDPA)" in out and "reference" in out
