"""DeepSpeed's Muon module, imported without compiling its kernels at import time.

deepspeed.initialize (ZeRO's optimizer check, the ZeRO-1/2/3 and bf16 optimizers) imports
deepspeed.runtime.zero.muon to test `isinstance(optimizer, MuonWithAuxAdam)`. That module wraps
its three Newton-Schulz/update functions in torch.compile when it is imported, and torch.compile
imports dynamo, functorch's AOT autograd and inductor: about 4 s of CPU in every training
process, for an optimizer xfast never builds (its optimizer is torch's AdamW). Imported through
`import_muon()`, the same functions are compiled on their first call instead, so a Muon
optimizer still runs compiled, and nobody else pays for it.
"""
from __future__ import annotations

import functools
import importlib
import sys

import torch

MUON_MODULE = "deepspeed.runtime.zero.muon.original_muon"


def _compile_on_first_call(fn):
    compiled = None

    @functools.wraps(fn)
    def call(*args, **kwargs):
        nonlocal compiled
        if torch.compiler.is_compiling():  # called from another compiled function: trace into it
            return fn(*args, **kwargs)
        if compiled is None:
            compiled = torch.compile(fn)
        return compiled(*args, **kwargs)

    return call


def import_muon() -> None:
    """Imports DeepSpeed's Muon module with torch.compile deferred to each function's first call
    (no-op if it is imported already). DeepSpeed decorates them with `compiler.compile()`, a
    factory returning torch.compile; it is swapped only while the module is imported."""
    if MUON_MODULE in sys.modules:
        return
    from deepspeed.runtime import compiler

    eager = getattr(compiler, "compile", None)
    if eager is None:  # another DeepSpeed layout: import it as it is
        importlib.import_module(MUON_MODULE)
        return
    compiler.compile = lambda: _compile_on_first_call
    try:
        importlib.import_module(MUON_MODULE)
    except ImportError:  # DeepSpeed's own imports of it tolerate this too
        pass
    finally:
        compiler.compile = eager
