"""ZeRO-1/2 fast path: four of DeepSpeed's per-step optimizer methods done with less Python.

DeepSpeed 0.19's ZeRO-1/2 optimizer (deepspeed/runtime/zero/stage_1_and_2.py) spends a fixed few
milliseconds of Python per optimizer step on loops over the parameter tensors; with small towers
that is a large share of the step (benchmarks/bench_deepspeed_step.py). `install` replaces four of
those methods on one optimizer instance (instance attributes: the class, other engines and other
stages are untouched), each with the same arithmetic:

- process_gradients (the per-parameter backward hook), installed at ZeRO-2 with
  contiguous_gradients false (xfast's CPU default), no overlap_comm and no gradient accumulation
  attributes: DeepSpeed appends the parameter's gradient to the reduce bucket through three nested
  calls, one of which formats a memory-report message that is then thrown away (see_memory_usage
  without force). Here the same bucket bookkeeping in one function; per call, a full bucket,
  autocast or a transient gradient (ds_grad_is_ready false) goes to DeepSpeed's method.
- get_grad_norm_direct (2-norm): DeepSpeed takes one `vector_norm` per gradient in the norm dtype
  (float64 where the device has it), moves each to the device, stacks, squares, sums, casts to
  float32, all-reduces, takes the root and masks inf/NaN to -1. Here the per-tensor norms are one
  `torch._foreach_norm` in the same dtype (each tensor's norm computed alone, as vector_norm does),
  then the same stack / pow / sum / all-reduce / root / mask through DeepSpeed's own helpers.
- _update_model_bit16_weights: DeepSpeed re-points every parameter at its slice of the flat
  bit16 buffer after each step ("TODO: we probably don't need this?"). When every parameter
  already is exactly that slice (same address, shape, stride, dtype) re-pointing changes nothing
  (`set_data` with the same storage view keeps the version counter and the grad accumulator), so
  it is skipped; otherwise DeepSpeed's method runs.
- buffered_reduce_fallback at one data-parallel rank: the gradients are flattened, divided by the
  world size 1, all-reduced alone and copied back: the same values (x / 1.0 == x and a one-rank
  sum is the identity in IEEE arithmetic). Skipped when the communication dtype is the gradients'
  own (else the round trip through it would round them) and DeepSpeed's correctness-test mode is off.

Each replacement runs only where every condition the original branches on holds; otherwise it
calls DeepSpeed's own method. Nothing is replaced on another DeepSpeed version than the tested one,
with CPU offload, MoE layers, model or sequence parallelism, pipeline-replicated parameters or
ZenFlow. `deepspeed.fast_path: false` in the run config turns it off.
"""
from __future__ import annotations

import types

import torch

TESTED_DEEPSPEED = "0.19.8"
METHODS = ("get_grad_norm_direct", "_update_model_bit16_weights", "buffered_reduce_fallback", "process_gradients")


def install(optimizer) -> tuple[list[str], str]:
    """Replace METHODS on this ZeRO-1/2 optimizer where it qualifies; returns (the names replaced,
    why nothing or not everything was)."""
    import deepspeed
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if not isinstance(optimizer, DeepSpeedZeroOptimizer):
        return [], "not a ZeRO-1/2 optimizer"
    if deepspeed.__version__ != TESTED_DEEPSPEED:
        return [], f"DeepSpeed {deepspeed.__version__}, tested with {TESTED_DEEPSPEED}"
    unsupported = _unsupported(optimizer)
    if unsupported:
        return [], unsupported
    replaced, notes = [], []
    # (method, its replacement's factory, whether the replacement can run here, why it is kept if not)
    choices = (
        ("get_grad_norm_direct", _grad_norm_direct, True, ""),
        ("_update_model_bit16_weights", _update_model_bit16_weights, _params_are_their_round_robin_selves(optimizer),
         "parameters are not their round-robin entries"),
        ("buffered_reduce_fallback", _buffered_reduce_fallback, _single_rank(optimizer),
         "more than one data-parallel rank"),
        ("process_gradients", _process_gradients, _separate_gradient_buckets(optimizer),
         "ZeRO-1, contiguous_gradients, overlap_comm or accumulation attributes"),
    )
    for name, replacement, applies, why_kept in choices:
        if applies:
            setattr(optimizer, name, types.MethodType(replacement(getattr(optimizer, name)), optimizer))
            replaced.append(name)
        else:
            notes.append(f"{name} kept: {why_kept}")
    return replaced, "; ".join(notes)


def _unsupported(opt) -> str:
    """Why the fast path does not apply to this optimizer ('' when it does)."""
    from deepspeed.runtime.constants import PIPE_REPLICATED
    from deepspeed.utils import groups

    if opt.cpu_offload:
        return "CPU offload"
    if opt.has_moe_layers:
        return "MoE layers"
    if opt.zenflow:
        return "ZenFlow"
    if opt.model_parallel_group is not None or opt.model_parallel_rank != 0:
        return "model parallelism"
    if groups._get_sequence_parallel_world_size() != 1 or opt.sequence_parallel_size != 1:
        return "sequence parallelism"
    if any(getattr(p, PIPE_REPLICATED, False) and p.ds_pipe_replicated for g in opt.bit16_groups for p in g):
        return "pipeline-replicated parameters"
    return ""


def _grad_norm_direct(original):
    """DeepSpeedZeroOptimizer.get_grad_norm_direct with the per-tensor norms as one foreach call
    (2-norm only; other norms go to DeepSpeed's). Checked against DeepSpeed's in
    tests/test_zero_fastpath.py: equal bit for bit, inf/NaN masked alike."""
    from deepspeed.runtime.utils import mask_nan_or_inf_with_val_inplace
    from deepspeed.runtime.zero import stage_1_and_2 as zero12
    from deepspeed.runtime.zero.utils import get_norm_dtype

    def get_grad_norm_direct(self, gradients, params, norm_type=2):
        if float(norm_type) != 2.0:
            return original(gradients, params, norm_type)
        # DeepSpeed zips the gradients that are not alignment padding with the parameters.
        grads = [g.data for g in gradients if not getattr(g, "_zero_padding", False)][:len(params)]
        if grads:
            norms = torch._foreach_norm(grads, 2.0, dtype=get_norm_dtype())
            total_norm = torch.stack(norms).to(self.device).pow(2.0).sum().float()
        else:
            total_norm = torch.tensor(0.0, dtype=torch.float32).to(self.device)
        zero12.dist.all_reduce(total_norm, op=zero12.dist.ReduceOp.SUM, group=self.dp_process_group)
        self._model_parallel_all_reduce(tensor=total_norm, op=zero12.dist.ReduceOp.SUM)
        total_norm = total_norm.pow(1. / 2.0)
        mask_nan_or_inf_with_val_inplace(total_norm, device=self.device)
        return total_norm

    return get_grad_norm_direct


def _params_are_their_round_robin_selves(opt) -> bool:
    """DeepSpeed's second loop in _update_model_bit16_weights sets each parameter's data to its
    round-robin entry's; with the entries being the parameters themselves (ZeRO-1/2 reorders the
    same objects) that is `p.data = p.data`."""
    for group, reordered, index in zip(opt.bit16_groups, opt.round_robin_bit16_groups,
                                       opt.round_robin_bit16_indices):
        if any(reordered[index[k]] is not p for k, p in enumerate(group)):
            return False
    return True


def _slices(opt, group_index: int) -> list[tuple]:
    """What each parameter of the group looks like when it is its slice of the flat buffer:
    (byte offset from the buffer's start, shape, stride, dtype)."""
    flat = opt.bit16_groups_flat[group_index]
    size = flat.element_size()
    return [(offset * size, tuple(meta.shape), torch.empty(meta.shape, device="meta").stride(), flat.dtype)
            for meta, offset in zip(opt.round_robin_bit16_meta[group_index], opt.round_robin_bit16_offsets[group_index])]


def _update_model_bit16_weights(original):
    """Skips DeepSpeed's re-pointing when every parameter already is its slice of the flat buffer."""
    expected: dict[int, list[tuple]] = {}

    def update_model_bit16_weights(self, group_index):
        if group_index not in expected:
            expected[group_index] = _slices(self, group_index)
        base = self.bit16_groups_flat[group_index].data_ptr()
        now = [(p.data_ptr() - base, tuple(p.shape), p.stride(), p.dtype)
               for p in self.round_robin_bit16_groups[group_index]]
        if now != expected[group_index]:
            original(group_index)

    return update_model_bit16_weights


def _single_rank(opt) -> bool:
    from deepspeed.runtime.zero import stage_1_and_2 as zero12
    groups = [opt.dp_process_group, *opt.real_dp_process_group]
    return all(zero12.dist.get_world_size(group=g) == 1 for g in groups)


def _buffered_reduce_fallback(original):
    """At one rank the averaged all-reduce returns every gradient unchanged: skip it when no
    dtype round trip or correctness-test mode would change them (and without overlap_comm, whose
    path also clears gradients reduced earlier)."""
    from deepspeed.runtime.zero import stage_1_and_2 as zero12

    def buffered_reduce_fallback(self, rank, grads, communication_data_type, elements_per_buffer=500000000,
                                 log=None):
        if (rank is not None or self.overlap_comm or zero12.pg_correctness_test
                or any(g.dtype != communication_data_type for g in grads)):
            return original(rank, grads, communication_data_type, elements_per_buffer, log)

    return buffered_reduce_fallback


def _separate_gradient_buckets(opt) -> bool:
    """The settings under which every hook would take the replacement's own path (fixed for the
    optimizer's life): ZeRO-2 with separate gradient tensors in the bucket, no overlap."""
    return (opt.partition_gradients and not opt.contiguous_gradients and not opt.overlap_comm
            and not opt.use_grad_accum_attribute and not opt.zenflow)


def _process_gradients(original):
    """The hook's bucket bookkeeping (DeepSpeed's process_gradients ->
    reduce_ready_partitions_and_remove_grads -> reduce_independent_p_g_buckets_and_remove_grads)
    for ZeRO-2 with separate gradient tensors: the gradient joins the bucket of the communication
    dtype, to be reduced by the epilogue. Every other case runs DeepSpeed's method."""
    from deepspeed.moe.utils import is_moe_param
    from deepspeed.runtime.torch_autocast import is_autocast_initialized

    def process_gradients(self, param, i):
        if (self._coalesce_grad_reduction or not self.partition_gradients or self.contiguous_gradients
                or self.overlap_comm or self.use_grad_accum_attribute or self.zenflow
                or self.autoep_folding_tp_group is not None or self._offload_gradient_safety_enabled
                or is_autocast_initialized()):
            return original(param, i)
        self.setup_buckets()
        numel = param.numel()
        if numel == 0:
            return
        bucket = self.ipg_buckets[self.communication_data_type]
        if bucket.elements + numel > self.reduce_bucket_size or not getattr(param, "ds_grad_is_ready", True):
            return original(param, i)  # reduces the full bucket first / leaves a transient gradient out
        param_id = self.param_id[id(param)]
        assert not self.params_already_reduced[param_id], \
            f"parameter {param_id} has already been reduced: gradient computed twice for this partition"
        grad = param.grad
        assert grad is not None, f"parameter {param_id} has no gradient to reduce"
        bucket.elements += numel
        bucket.grads.append(grad)
        bucket.params.append((i, param.param_idx_in_group, param_id))
        if is_moe_param(param):
            bucket.has_moe_params = True

    return process_gradients
