"""DeepSpeed's Muon module imported without torch.compile at import (xfast/training/deepspeed_muon.py)."""
import os
import subprocess
import sys

import pytest
import torch

from xfast.training import deepspeed_muon


def test_functions_compile_once_on_first_call_and_are_traced_into_when_compiling(monkeypatch):
    compiled = []

    def fake_compile(fn):
        compiled.append(fn)
        return lambda *args, **kwargs: ("compiled", fn(*args, **kwargs))

    def double(x, *, times=2):
        return x * times

    monkeypatch.setattr(torch, "compile", fake_compile)
    lazy = deepspeed_muon._compile_on_first_call(double)
    assert compiled == [] and lazy.__wrapped__ is double and lazy.__name__ == "double"
    assert lazy(3, times=3) == ("compiled", 9) and lazy(4) == ("compiled", 8)
    assert compiled == [double]  # once
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert lazy(5) == 10  # inside another compiled function: the plain function, for dynamo to trace


PROBE = """
import sys
import deepspeed
from deepspeed.runtime import compiler
before = compiler.compile
from xfast.training.deepspeed_muon import import_muon
import_muon()
from deepspeed.runtime.zero.muon import original_muon
from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam
assert compiler.compile is before, "compiler.compile not restored"
assert original_muon.muon_update.__wrapped__.__name__ == "muon_update"
assert original_muon.zeropower_via_newtonschulz5.__wrapped__.__name__ == "zeropower_via_newtonschulz5"
print(sorted(m for m in ("torch._inductor.codecache", "torch._functorch.aot_autograd") if m in sys.modules))
"""


@pytest.mark.slow
@pytest.mark.multiprocess
def test_import_leaves_inductor_unimported_and_restores_the_compiler():
    """In a fresh interpreter (this one may have imported Muon already)."""
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
