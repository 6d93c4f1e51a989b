"""Settings and fixtures shared by the whole suite.

Helper modules hold plain functions and are imported as `from tests.<module> import ...`
(setup.cfg puts the repository root on sys.path):
  tests/loss_cases.py     inputs and tolerance rules of the loss tests
  tests/dist_utils.py     run_ranks: a gloo process group of spawned ranks
  tests/data_fixtures.py  small media, shards and a word-level tokenizer made on the fly
  tests/model_cases.py    tiny towers, models, batches and a trained WordPiece tokenizer
  tests/forkserver.py     single-process `python -m xfast.train` runs forked from a process
                          that imported the training stack once (the `launcher` fixture)
Fixtures used by several files live here. Markers (registered in setup.cfg): `slow` and
`multiprocess`; `make test-fast` runs -m "not slow and not multiprocess".
"""
import os

# Triton kernels run on CPU tensors in the interpreter; this must be set before any module
# defining @triton.jit functions is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from tests import data_fixtures, model_cases  # noqa: E402


@pytest.fixture
def tokenizer():
    """A word-level fast tokenizer over data_fixtures.WORDS (built once, offline)."""
    return data_fixtures.make_tokenizer()


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
    """Folder of a tiny WordPiece tokenizer trained on model_cases.CAPTIONS, for the model tests."""
    return model_cases.make_tokenizer(tmp_path_factory.mktemp("tok"))


# What a single-process training run imports: forked children of the launcher start with it.
TRAINING_STACK = ["xfast.training.trainer", "xfast.models.io", "xfast.training.demo", "safetensors.torch",
                  "transformers.models.bert.modeling_bert", "transformers.models.vit.modeling_vit"]


@pytest.fixture(scope="session")
def launcher():
    """A fork server for `python -m xfast.train` runs (tests/forkserver.py), started once."""
    from tests.forkserver import ForkServer
    from tests.test_train_run import clean_env
    server = ForkServer(TRAINING_STACK, env=clean_env())
    yield server
    server.close()
