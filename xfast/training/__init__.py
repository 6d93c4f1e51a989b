"""The trainer's components; trainer.Trainer wires them together (xfast/train.py is the entry point).

trainer       Trainer: train_step / train over the components below, each built from its section
config        TrainConfig: the run's JSON schema, built-in configs, --set overrides (no torch import)
run_dir       a run folder across invocations: resume allowed or refused, steps extension (no torch import)
engine        process group, DeepSpeed engine with torch AdamW, parameter groups, warmup+cosine
task          the module DeepSpeed wraps: model features + objective
accumulation  whole-batch (GradCache) gradient accumulation across micro-batches and ranks
streams       endless data streams with data-wait timing, skip totals, resumable position
checkpoint    atomic save, keep-K, resume, consolidated fp32 export
evaluation    the periodic xfast.eval hook (PeriodicEvaluation)
logging       progress bar, TensorBoard, metrics.jsonl
demo_data     the procedural demo dataset; demo: the README's main job
"""
