"""ZeRO-1/2 fast path: some of DeepSpeed's per-step optimizer methods done with less Python.

DeepSpeed 0.19's ZeRO-1/2 optimizer (deepspeed/runtime/zero/stage_1_and_2.py) spends a fixed few
milliseconds of Python per optimizer step on loops over the parameter tensors; with small towers
that is a large share of the step (benchmarks/bench_deepspeed_step.py). `install` replaces six of
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
  then the same stack / pow / sum / all-reduce / root / mask through DeepSpeed's own helpers; with
  one data-parallel rank without the all-reduce (a one-rank sum is the value itself).
- _update_model_bit16_weights: DeepSpeed re-points every parameter at its slice of the flat
  bit16 buffer after each step ("TODO: we probably don't need this?"). When every parameter
  already is exactly that slice (same address, shape, stride, dtype) re-pointing changes nothing
  (`set_data` with the same storage view keeps the version counter and the grad accumulator), so
  it is skipped; otherwise DeepSpeed's method runs.
- buffered_reduce_fallback at one data-parallel rank: the gradients are flattened, divided by the
  world size 1, all-reduced alone and copied back: the same values (x / 1.0 == x and a one-rank
  sum is the identity in IEEE arithmetic). Skipped when the communication dtype is the gradients'
  own (else the round trip through it would round them) and DeepSpeed's correctness-test mode is off.
- should_refresh_expected_hook_count + update_hook_state_and_maybe_run_epilogue: at the first
  gradient hook of each backward DeepSpeed counts the parameters that backward reaches
  (count_used_parameters_in_backward: a `view_as` per parameter to find its gradient-accumulator
  node). The two methods around that call in the hook hand the count to _UsedParameters, which
  holds the nodes and asks torch the same question about them (see there).

Each replacement runs only where every condition the original branches on holds; otherwise it
calls DeepSpeed's own method. Nothing is replaced on another DeepSpeed version than the tested one,
with CPU offload, MoE layers, model or sequence parallelism, pipeline-replicated parameters or
ZenFlow. `deepspeed.fast_path: false` in the run config turns it off.
"""
from __future__ import annotations

import functools
import types

import torch

TESTED_DEEPSPEED = "0.19.8"
METHODS = ("get_grad_norm_direct", "_update_model_bit16_weights", "buffered_reduce_fallback", "process_gradients",
           "should_refresh_expected_hook_count", "update_hook_state_and_maybe_run_epilogue")


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
    used = _UsedParameters(optimizer)
    counted = _hooks_count_leaf_parameters(optimizer)
    # (method, its replacement's factory, whether the replacement can run here, why it is kept if not)
    choices = (
        ("get_grad_norm_direct", functools.partial(_grad_norm_direct, single_rank=_single_rank(optimizer)), True, ""),
        ("_update_model_bit16_weights", _update_model_bit16_weights, _params_are_their_round_robin_selves(optimizer),
         "parameters are not their round-robin entries"),
        ("buffered_reduce_fallback", _buffered_reduce_fallback, _single_rank(optimizer),
         "more than one data-parallel rank"),
        ("process_gradients", _process_gradients, _separate_gradient_buckets(optimizer),
         "ZeRO-1, contiguous_gradients, overlap_comm or accumulation attributes"),
        ("should_refresh_expected_hook_count", used.should_refresh, counted, "no gradient hooks or non-leaf parameters"),
        ("update_hook_state_and_maybe_run_epilogue", used.update_hook_state, counted,
         "no gradient hooks or non-leaf parameters"),
    )
    for name, replacement, applies, why_kept in choices:
        if applies:
            setattr(optimizer, name, types.MethodType(replacement(getattr(optimizer, name)), optimizer))
            replaced.append(name)
        else:
            notes.append(f"{name} kept: {why_kept}")
    if counted:  # the held accumulator nodes hold their parameters: destroying the optimizer lets them go
        destroy = optimizer.destroy

        def destroy_and_release_nodes(opt):
            try:
                destroy()
            finally:
                used.release()

        optimizer.destroy = types.MethodType(destroy_and_release_nodes, optimizer)
    return replaced, "; ".join(notes)


def install_stage0(engine) -> tuple[list[str], str]:
    """At ZeRO-0 (no ZeRO optimizer): DeepSpeed's engine.zero_grad, which fp32 steps call to drop
    the gradients (`for name, param in module.named_parameters(): param.grad = None`), as the same
    loop over module_parameters(module). Returns (the names replaced, why not)."""
    import deepspeed

    if deepspeed.__version__ != TESTED_DEEPSPEED:
        return [], f"DeepSpeed {deepspeed.__version__}, tested with {TESTED_DEEPSPEED}"

    def zero_grad(self):
        for param in module_parameters(self.module):
            param.grad = None

    engine.zero_grad = types.MethodType(zero_grad, engine)
    return ["zero_grad"], ""


# What torch.nn.Module.parameters() goes through; a module class that defines its own gets module.parameters().
_PARAMETER_LISTING = ("parameters", "named_parameters", "_named_members", "named_modules")


def module_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """list(module.parameters()): the same tensors in the same order (modules depth first, each
    one's own parameters before its children's, every module and parameter once), without the
    dotted names torch.nn.Module builds for each (~0.1 ms of a tiny tower's step, twice per step at
    ZeRO-0: clipping and DeepSpeed's engine.zero_grad). Where a module in the tree defines its own
    parameter listing, that module's parameters() is what counts: the whole list comes from it."""
    params: list[torch.nn.Parameter] = []
    seen_params: set[int] = set()
    seen_modules: set[int] = set()

    def visit(m: torch.nn.Module) -> bool:
        if id(m) in seen_modules:
            return True
        kind = type(m)
        if any(getattr(kind, name) is not getattr(torch.nn.Module, name) for name in _PARAMETER_LISTING):
            return False
        seen_modules.add(id(m))
        for p in m._parameters.values():
            if p is not None and id(p) not in seen_params:
                seen_params.add(id(p))
                params.append(p)
        return all(visit(child) for child in m._modules.values() if child is not None)

    return params if visit(module) else list(module.parameters())


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


def _grad_norm_direct(original, single_rank: bool = False):
    """DeepSpeedZeroOptimizer.get_grad_norm_direct with the per-tensor norms as one foreach call
    (2-norm only; other norms go to DeepSpeed's) and, with one data-parallel rank (single_rank),
    without the all-reduce of the sum: a sum over one rank is that rank's value, and gloo's
    one-rank all-reduce of a scalar costs ~0.2 ms of the CPU step. Checked against DeepSpeed's in
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
        if not single_rank:
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


def _hooks_count_leaf_parameters(opt) -> bool:
    """DeepSpeed's gradient hooks are there and count leaf parameters (whose gradient-accumulator
    nodes torch keeps for as long as someone holds them)."""
    return bool(opt._grad_acc_hooks) and all(p.grad_fn is None for g in opt.bit16_groups for p in g)


class _UsedParameters:
    """count_used_parameters_in_backward with the accumulator nodes looked up once.

    DeepSpeed's gradient hook (create_gradient_handling_hooks) asks at the first hook of each
    backward how many parameters the running backward will reach:
    count_used_parameters_in_backward(all parameters requiring grad) looks up each leaf parameter's
    gradient-accumulator node through a fresh `view_as` under enable_grad (~10 us each) and counts
    those the autograd engine will execute. The hook calls that module function itself, so it is
    replaced through the two instance methods around it: should_refresh_expected_hook_count says
    "no" and remembers that DeepSpeed would have counted, and update_hook_state_and_maybe_run_epilogue
    then gets the count instead of the value the hook passed. The count is the same: the same
    question (torch._C._will_engine_execute_node) about the same nodes, at the same point of the same
    hook. Torch gives a leaf tensor the same accumulator node while one is alive, and this object
    holds them (as DDP's reducer does); torch drops a tensor's node only when `.data` is set to
    another dtype or device (even if set back later), and a graph built after that holds the new
    node, so a held node the engine will not execute may be stale: that parameter's node is looked
    up again, DeepSpeed's way, before it counts as unused (in training every parameter is used, so
    nothing is looked up). Counted outside a backward it raises as DeepSpeed's does. One limit: a
    dtype change between a forward and its backward (the graph holds the old node, DeepSpeed's
    lookup finds a new one) would count that parameter where DeepSpeed does not."""

    def __init__(self, opt):
        # the hooks' list: parameters requiring grad when DeepSpeed registered them
        self.params = [p for group in opt.bit16_groups for p in group if p.requires_grad]
        self.nodes: list = []  # each parameter's accumulator node, None where it needs no gradient
        self.looked_up_for = None
        self.pending = False

    def count(self) -> int:
        from deepspeed.runtime.zero import stage_1_and_2 as zero12
        from torch.autograd.graph import _get_grad_fn_or_grad_acc

        if torch._C._current_graph_task_id() == -1:
            raise RuntimeError("count_used_parameters_in_backward must be called during backward execution")
        now = [(p.requires_grad, p.grad_fn is None) for p in self.params]
        if now != self.looked_up_for:
            if not all(leaf for _, leaf in now):  # a non-leaf's node is new in every graph
                self.looked_up_for = None
                return zero12.count_used_parameters_in_backward(self.params)
            with torch.enable_grad():
                self.nodes = [_get_grad_fn_or_grad_acc(p) if p.requires_grad else None for p in self.params]
            self.looked_up_for = now
        executes = torch._C._will_engine_execute_node
        used = 0
        for i, node in enumerate(self.nodes):
            if node is None:
                continue
            if not executes(node):  # unused, or stale: torch's node for it now
                with torch.enable_grad():
                    node = self.nodes[i] = _get_grad_fn_or_grad_acc(self.params[i])
                if not executes(node):
                    continue
            used += 1
        return used

    def release(self) -> None:
        """Drop the parameters and nodes (engine.destroy(): a released Trainer frees its model)."""
        self.params, self.nodes, self.looked_up_for, self.pending = [], [], None, False

    def should_refresh(self, original):
        def should_refresh_expected_hook_count(opt):
            self.pending = original()
            return False  # the hook passes _max_expected_hooks_seen on, replaced below by the count

        return should_refresh_expected_hook_count

    def update_hook_state(self, original):
        def update_hook_state_and_maybe_run_epilogue(opt, current_expected_count):
            if self.pending:
                self.pending = False
                current_expected_count = self.count()
            return original(current_expected_count)

        return update_hook_state_and_maybe_run_epilogue
