"""A Trainer used as a library: close() / `with` / dropping it frees its engine, optimizer state,
model and loader workers, and a second Trainer in the same process trains exactly as the first.

Each case runs in a process of its own (a Trainer sets process-wide state: the process group,
torch's threads, deterministic algorithms), forked from the `launcher` (tests/forkserver.py),
which imported the training stack once and ran no torch op. Without the release, at ZeRO-1/2
the ZeRO optimizer's gradient hooks keep the model alive: torch's C++ autograd nodes hold them
(and the parameters) out of the garbage collector's sight. ZeRO-0 was freed without it; it is tested for
the release's other parts and so that it stays so.
"""
import json
import re
import textwrap
from pathlib import Path

import pytest

from tests.test_train_compile import DEMO, compile_threads
from xfast.training import demo_data
from xfast.training.trainer import CLOSED

PROBE = textwrap.dedent("""
    import gc, json, multiprocessing, sys, weakref
    import torch
    from xfast.config import parse
    from xfast.training.config import TrainConfig
    from xfast.training.trainer import Trainer
    from tests.test_train_run import tiny_config

    root, compiled, cases, threads = sys.argv[1], sys.argv[2] == "1", sys.argv[3].split(","), int(sys.argv[4])

    def config(name):
        raw = tiny_config(f"{root}/demo/images/train", f"{root}/demo/tokenizer", deepspeed={"zero_stage": stage},
                          train={"compile": compiled}, data={"num_workers": 1})
        return parse(TrainConfig, dict(raw, output_dir=f"{root}/{name}"), "config")

    def steps(trainer):
        if threads:  # an override of the Trainer's own choice, for inductor's cache key (see _probe)
            torch.set_num_threads(threads)
        losses = [float(trainer.train_step().loss) for _ in range(3)]
        weights = {k: v.detach().clone() for k, v in trainer.engine.module.state_dict().items()}
        held = [weakref.ref(x) for x in (trainer.engine, trainer.engine.optimizer, trainer.model,
                                         next(trainer.model.parameters()))]
        return losses, weights, held

    def run(name, how):
        refused = None
        if how == "with":
            with Trainer(config(name)) as trainer:
                losses, weights, held = steps(trainer)
        else:
            trainer = Trainer(config(name))
            losses, weights, held = steps(trainer)
            if how == "close":
                trainer.close()
                trainer.close()  # a second close does nothing
                refused = []
                for use in (trainer.train_step, trainer.save, trainer.engine.step, lambda: trainer.engine({})):
                    try:
                        use()
                    except RuntimeError as err:
                        refused.append(str(err))
        workers = len(multiprocessing.active_children())  # before the drop: close()/`with` stopped them
        del trainer
        gc.collect()
        return {"losses": losses, "freed": [ref() is None for ref in held], "workers_left": workers,
                "refused": refused}, weights

    results = {}
    for case in cases:  # one after the other in this process: nothing carries over between them
        stage, how = case.split(":")
        stage = int(stage)
        first, weights_a = run(f"{case}a", how)
        second, weights_b = run(f"{case}b", how)
        same = weights_a.keys() == weights_b.keys() and all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
        results[case] = {"first": first, "second": second, "same_weights": same}
    print(json.dumps(results))
""")


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    """test_train_compile's demo data (its tokenizer fixes the compiled graphs' shapes)."""
    root = tmp_path_factory.mktemp("release")
    demo_data.generate(root / "demo", **DEMO)
    return root


def _probe(launcher, root: Path, name: str, compiled: bool, cases: list[str]) -> dict:
    from tests.test_train_run import clean_env
    out_dir = root / name
    out_dir.mkdir()
    (out_dir / "demo").symlink_to(root / "demo")
    # Compiled: each Trainer's thread count (its own choice: 1 with one loader worker) is overridden
    # after it is built with the one test_train_compile compiles with, a key of inductor's cache: on
    # the same data and settings its graphs need no second cold compile here. What this test checks
    # (release, refusals, equal steps) does not depend on the thread count.
    threads = compile_threads() if compiled else 0
    result = launcher.run_code(PROBE, [out_dir, int(compiled), ",".join(cases), threads], cwd=root,
                               env=dict(clean_env(), PYTHONPATH=str(Path(__file__).resolve().parents[1])),
                               timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _check(result: dict, how: str) -> None:
    for run in ("first", "second"):
        # engine, its optimizer, the model and one of its parameters
        assert result[run]["freed"] == [True] * 4, (run, result[run])
        if how != "drop":
            assert result[run]["workers_left"] == 0, (run, result[run])
    assert result["first"]["losses"] == result["second"]["losses"], result
    assert result["same_weights"], result
    if how == "close":  # train_step, save, and the engine itself (a step without its ZeRO hooks)
        assert result["first"]["refused"] == [CLOSED, CLOSED, f"DeepSpeed engine: {CLOSED}",
                                              f"DeepSpeed engine: {CLOSED}"], result["first"]


@pytest.mark.multiprocess
def test_a_released_trainer_frees_its_model_and_the_next_one_trains_the_same(demo_root, launcher):
    """ZeRO-0 closed, ZeRO-2 in a `with` block, ZeRO-2 dropped: two Trainers each, in one process."""
    cases = ["0:close", "2:with", "2:drop"]
    results = _probe(launcher, demo_root, "eager", False, cases)
    for case in cases:
        _check(results[case], case.split(":")[1])


def test_release_frees_the_engine_even_when_a_part_fails_to_close():
    """A loader or log writer that fails to close must not leave DeepSpeed's hooks in place: the
    engine is still destroyed (and refuses to run), the other parts closed, the error raised."""
    from xfast.training.trainer import _release
    done = []

    class Engine:
        def destroy(self):
            done.append("destroy")

    def broken():
        raise OSError("disk full")

    engine = Engine()
    with pytest.raises(OSError, match="disk full"):
        _release(engine, [broken, lambda: done.append("logger")])
    assert done == ["logger", "destroy"]
    with pytest.raises(RuntimeError, match=re.escape(f"DeepSpeed engine: {CLOSED}")):
        engine.step()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_released_compiled_trainer_frees_its_model_and_the_next_one_trains_the_same(demo_root, launcher):
    """Dynamo's caches (kept on the code objects it compiled) do not keep the towers alive, and the
    second Trainer's compile gives the same steps. ZeRO-2 only: what the stage changes (the ZeRO
    optimizer's hooks) is the eager test's; a ZeRO-0 case would add ~20 s and nothing else."""
    _check(_probe(launcher, demo_root, "compiled", True, ["2:close"])["2:close"], "close")
