"""The periodic evaluation hook: xfast.eval tasks on the model being trained."""
from __future__ import annotations


class PeriodicEvaluation:
    """cfg.eval's tasks run every `every_steps` steps, before training if asked, and at the end.

    Under ZeRO-3 the parameters are partitioned, so every rank runs the same evaluation in
    lockstep (each forward gathers the weights collectively); at stages 0-2 rank 0 runs it alone.
    The training data section (typed) supplies the preprocessing of the evaluation data.
    """

    def __init__(self, cfg, data, *, zero_stage: int, rank: int):
        self.cfg, self.data, self.rank = cfg, data, rank
        self.participates = bool(cfg.tasks) and (rank == 0 or zero_stage == 3)

    def due(self, step: int, last_step: int) -> bool:
        """Whether to evaluate after optimizer step `step` (the final evaluation is the trainer's)."""
        return bool(self.cfg.every_steps) and step % self.cfg.every_steps == 0 and step < last_step

    def due_before_training(self, step: int) -> bool:
        return self.cfg.before_training and step == 0

    def __call__(self, model) -> dict[str, float]:
        """Metrics of the tasks on rank 0 ({} elsewhere or without tasks)."""
        from xfast.eval.runner import evaluate

        if not self.participates:
            return {}
        metrics = evaluate(model, model.tokenizer, self.cfg.tasks, batch_size=self.cfg.batch_size,
                           max_items=self.cfg.max_items, data_config=self.data)
        return metrics if self.rank == 0 else {}
