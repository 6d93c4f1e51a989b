"""The periodic evaluation hook: xfast.eval tasks on the model being trained."""
from __future__ import annotations

from xfast.config import to_dict


def run_evaluation(engine, cfg, rank: int) -> dict[str, float]:
    """Metrics of cfg.eval.tasks on rank 0 ({} elsewhere or without tasks).

    Under ZeRO-3 the parameters are partitioned, so every rank runs the same evaluation in
    lockstep (each forward gathers the weights collectively); at stages 0-2 rank 0 runs it alone.
    """
    from xfast.eval.runner import evaluate

    if not cfg.eval.tasks:
        return {}
    if rank != 0 and cfg.deepspeed.zero_stage != 3:
        return {}
    model = engine.module.model
    metrics = evaluate(model, model.tokenizer, cfg.eval.tasks, batch_size=cfg.eval.batch_size,
                       max_items=cfg.eval.max_items, data_config=to_dict(cfg.data))
    return metrics if rank == 0 else {}
