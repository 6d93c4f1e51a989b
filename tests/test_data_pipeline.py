"""Formats, splitting, determinism, resampling and resume of the streaming pipeline."""
import collections
import copy
import json
import multiprocessing
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.data_fixtures import (
    audio_samples,
    caption,
    data_config,
    image_samples,
    keys_of,
    make_tokenizer,
    write_shards,
    write_tar,
)
from xfast.config import ConfigError
from xfast.data import DataError, build_loader, expand_urls, pipeline, read_sizes, transfer
from xfast.data.pipeline import ShardStream


def _all_keys(n):
    return [f"{i:06d}" for i in range(n)]


# Formats -------------------------------------------------------------------------------------

def test_image_batches_eval(tmp_path, tokenizer):
    pattern = write_shards(tmp_path, [5, 5, 3])
    batches = list(build_loader(data_config(pattern), tokenizer, train=False))
    assert keys_of(batches) == _all_keys(13)  # file order, last batch kept
    assert [len(b["__key__"]) for b in batches] == [4, 4, 4, 1]
    batch = batches[0]
    assert set(batch) == {"__key__", "input_ids", "attention_mask", "pixel_values", "captions"}
    assert batch["pixel_values"].shape == (4, 3, 16, 16) and batch["pixel_values"].dtype == torch.float32
    ref = tokenizer([caption(i) for i in range(4)], padding="max_length", truncation=True, max_length=8,
                    return_tensors="pt")
    assert batch["input_ids"].dtype == torch.long and batch["attention_mask"].dtype == torch.long
    torch.testing.assert_close(batch["input_ids"], ref["input_ids"])
    torch.testing.assert_close(batch["attention_mask"], ref["attention_mask"])
    assert batch["captions"] == [[caption(i)] for i in range(4)]


def test_image_captions_from_txt_when_json_has_none(tmp_path, tokenizer):
    # img2dataset: KEY.jpg + KEY.txt + KEY.json without a "text" field.
    samples = image_samples(0, 3)
    for s in samples:
        s["txt"] = "from txt " + s["__key__"]
    write_tar(tmp_path / "a.tar", samples)
    batch = next(iter(build_loader(data_config(str(tmp_path / "a.tar")), tokenizer, train=False)))
    assert batch["captions"] == [[f"from txt {i:06d}"] for i in range(3)]


def test_audio_batches_logmel_waveform_and_captions(tmp_path, tokenizer):
    pattern = write_shards(tmp_path, [3, 3], make=audio_samples)
    cfg = data_config(pattern, modality="audio")
    batch = next(iter(build_loader(cfg, tokenizer, train=False)))
    assert batch["input_features"].shape == (4, 1, cfg.audio.num_frames, 16)
    assert batch["captions"] == [[caption(i), caption(i + 1000)] for i in range(4)]
    assert batch["tags"] == [[f"class{i % 3}"] for i in range(4)]
    train_batch = next(iter(build_loader(cfg, tokenizer, train=True)))
    assert "captions" not in train_batch and "tags" not in train_batch
    cfg = data_config(pattern, modality="audio", audio={"output": "waveform"})
    batch = next(iter(build_loader(cfg, tokenizer, train=False)))
    assert batch["waveform"].shape == (4, cfg.audio.num_samples) and "input_features" not in batch


def test_training_draws_one_caption_of_the_list(tmp_path, tokenizer):
    write_tar(tmp_path / "a.tar", [{"__key__": f"{i:03d}", "flac": audio_samples(0, 1)[0]["flac"],
                                    "json": {"text": ["dog", "cat", "rain"]}} for i in range(24)])
    cfg = data_config(str(tmp_path / "a.tar"), modality="audio", batch_size=24)
    ids = next(iter(build_loader(cfg, tokenizer)))["input_ids"][:, 0].tolist()
    words = {tokenizer.convert_ids_to_tokens(i) for i in ids}
    assert words == {"dog", "cat", "rain"}  # 24 random draws hit all three
    cfg = data_config(str(tmp_path / "a.tar"), modality="audio", batch_size=24, text={"train_caption": "first"})
    ids = next(iter(build_loader(cfg, tokenizer)))["input_ids"][:, 0].tolist()
    assert {tokenizer.convert_ids_to_tokens(i) for i in ids} == {"dog"}


def test_sentences_from_text_file_and_shards(tmp_path, tokenizer):
    lines = [caption(i) for i in range(10)]
    (tmp_path / "wiki.txt").write_text("\n".join(lines) + "\n")
    batches = list(build_loader(data_config(str(tmp_path / "wiki.txt"), modality="text"), tokenizer, train=False))
    assert set(batches[0]) == {"__key__", "input_ids", "attention_mask"}
    assert keys_of(batches) == [f"wiki.txt:{i}" for i in range(10)]
    ref = tokenizer(lines[:4], padding="max_length", truncation=True, max_length=8, return_tensors="pt")
    torch.testing.assert_close(batches[0]["input_ids"], ref["input_ids"])
    write_tar(tmp_path / "s.tar", [{"__key__": f"{i:03d}", "txt": line} for i, line in enumerate(lines)])
    batches = list(build_loader(data_config(str(tmp_path / "s.tar"), modality="text"), tokenizer, train=False))
    torch.testing.assert_close(batches[0]["input_ids"], ref["input_ids"])


def _nli_check(batches, tokenizer, triplets):
    batch = batches[0]
    assert set(batch) == {"__key__"} | {f"{r}_{k}" for r in ("anchor", "positive", "negative")
                                        for k in ("input_ids", "attention_mask")}
    for role, i in (("anchor", 0), ("positive", 1), ("negative", 2)):
        ref = tokenizer([t[i] for t in triplets[:4]], padding="max_length", truncation=True, max_length=8,
                        return_tensors="pt")
        torch.testing.assert_close(batch[f"{role}_input_ids"], ref["input_ids"])
        torch.testing.assert_close(batch[f"{role}_attention_mask"], ref["attention_mask"])
    assert sum(len(b["__key__"]) for b in batches) == len(triplets)


def test_nli_from_simcse_csv_jsonl_and_shards(tmp_path, tokenizer):
    triplets = [(caption(i), caption(i + 100), caption(i + 200)) for i in range(6)]
    (tmp_path / "nli.csv").write_text("sent0,sent1,hard_neg\n" + "".join(f"{a},{p},{n}\n" for a, p, n in triplets))
    _nli_check(list(build_loader(data_config(str(tmp_path / "nli.csv"), modality="nli"), tokenizer, train=False)),
               tokenizer, triplets)
    records = [{"anchor": a, "positive": p, "negative": n} for a, p, n in triplets]
    (tmp_path / "nli.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    _nli_check(list(build_loader(data_config(str(tmp_path / "nli.jsonl"), modality="nli"), tokenizer,
                                 train=False)), tokenizer, triplets)
    write_tar(tmp_path / "nli.tar", [{"__key__": f"{i:03d}", "json": r} for i, r in enumerate(records)])
    _nli_check(list(build_loader(data_config(str(tmp_path / "nli.tar"), modality="nli"), tokenizer, train=False)),
               tokenizer, triplets)


# Sources ------------------------------------------------------------------------------------

def test_url_expansion_sizes_and_pipe(tmp_path, tokenizer):
    pattern = write_shards(tmp_path, [5, 4, 3])
    first, rest = pattern.replace("{0000..0002}", "0000"), pattern.replace("{0000..0002}", "{0001..0002}")
    assert expand_urls(pattern) == expand_urls(f"{first}::{rest}") == expand_urls(str(tmp_path)) \
        == expand_urls([first, rest]) == [str(tmp_path / f"shards-{i:04d}.tar") for i in range(3)]
    assert read_sizes(expand_urls(pattern)) == 12
    assert read_sizes([str(tmp_path / "other.tar")]) is None
    with pytest.raises(ConfigError, match="pipe:aws s3 cp"):
        expand_urls("s3://bucket/shards-{0..3}.tar")
    piped = [f"pipe:cat {url}" for url in expand_urls(pattern)]
    batches = list(build_loader(data_config(piped), tokenizer, train=False))
    assert keys_of(batches) == _all_keys(12)


def test_num_batches_and_samples_from_sizes_json(tmp_path, tokenizer):
    pattern = write_shards(tmp_path, [5, 4, 3, 6])
    for train, workers in ((False, 0), (True, 0), (True, 3), (False, 3)):
        loader = build_loader(data_config(pattern, num_workers=workers), tokenizer, train=train)
        assert loader.num_samples == 18
        slots = max(1, workers)
        made = sum(1 for w in range(slots) for item in loader._dataset._run(0, w, slots, None) if "__key__" in item)
        assert loader.num_batches == made
    assert build_loader(data_config(write_shards(tmp_path / "n", [3], sizes_json=False)), tokenizer).num_batches \
        is None


def test_missing_pad_token_is_a_clear_error(tmp_path):
    tok = copy.deepcopy(make_tokenizer())
    tok.pad_token = None
    with pytest.raises(ValueError, match="no pad token"):
        build_loader(data_config(write_shards(tmp_path, [2])), tok)


# Order, splitting -----------------------------------------------------------------------------

def test_order_is_determined_by_seed_and_epoch(tmp_path, tokenizer):
    pattern = write_shards(tmp_path, [6, 6, 6, 6])

    def order(seed, epoch):
        cfg = data_config(pattern, seed=seed, drop_last=False)
        return keys_of(build_loader(cfg, tokenizer, epoch=epoch))

    first = order(0, 0)
    assert sorted(first) == _all_keys(24) and first != _all_keys(24)
    assert order(0, 0) == first
    assert order(1, 0) != first and order(0, 1) != first


def _slot_keys(dataset: ShardStream, epoch: int, worker: int, num_workers: int) -> list[str]:
    return [k for item in dataset._run(epoch, worker, num_workers, None) if "__key__" in item for k in item["__key__"]]


@pytest.mark.parametrize("per_shard", [[5, 3, 4, 6, 2, 5], [7, 5, 6], [9]])
def test_split_by_rank_and_worker_reads_every_sample_once(tmp_path, tokenizer, per_shard):
    """4 slots (2 ranks x 2 workers); also with fewer shards than slots. Slots run in process."""
    pattern = write_shards(tmp_path, per_shard)
    cfg = data_config(pattern, drop_last=False)
    seen = []
    for rank in range(2):
        loader = build_loader(cfg, tokenizer, rank=rank, world_size=2)
        for worker in range(2):
            keys = _slot_keys(loader._dataset, 0, worker, 2)
            assert keys, f"slot {rank}/{worker} got nothing"
            seen.extend(keys)
    assert sorted(seen) == _all_keys(sum(per_shard))


def test_two_ranks_with_two_worker_processes(tmp_path, tokenizer):
    """The real thing: DataLoader workers, 2 ranks, a bad sample counted in one worker."""
    samples = image_samples(0, 22)
    samples[5]["jpg"] = b"broken"
    for shard in range(3):
        write_tar(tmp_path / f"s-{shard}.tar", samples[shard * 8:(shard + 1) * 8])
    cfg = data_config(str(tmp_path / "s-{0..2}.tar"), num_workers=2, drop_last=False)
    seen, skips = [], collections.Counter()
    for rank in range(2):
        loader = build_loader(cfg, tokenizer, rank=rank, world_size=2)
        seen.extend(keys_of(loader))
        skips.update(loader.skip_counts())
    assert sorted(seen) == [k for k in _all_keys(22) if k != "000005"]
    assert skips["corrupt_image"] == 1 and sum(skips.values()) == 1


# Resampling ------------------------------------------------------------------------------------

def test_resampled_epoch_length_and_source_weights(tmp_path, tokenizer):
    a = write_shards(tmp_path / "a", [4, 4])
    b_samples = image_samples(1000, 8)
    write_tar(tmp_path / "b.tar", b_samples)
    cfg = data_config(None, sources=[{"urls": a, "weight": 3.0}, {"urls": str(tmp_path / "b.tar"), "weight": 1.0}],
                      resampled=True, samples_per_epoch=200, shuffle_buffer=0, num_workers=2)
    loader = build_loader(cfg, tokenizer, world_size=2)
    # open_clip's rounding: ceil(200 / (4 * 2)) = 25 batches, ceil(25 / 2) = 13 per worker.
    assert loader.num_batches == 26
    keys = [k for w in range(2) for k in _slot_keys(loader._dataset, 0, w, 2)]
    assert len(keys) == 26 * 4
    from_b = sum(k >= "001000" for k in keys) / len(keys)
    assert 0.1 < from_b < 0.45  # weight 1 of 4, drawn per shard


# Position and resume -------------------------------------------------------------------------

@pytest.mark.parametrize("stop_after", [1, 3, 5])
def test_resume_continues_exactly_in_process(tmp_path, tokenizer, stop_after):
    pattern = write_shards(tmp_path, [7, 5, 6, 4])
    cfg = data_config(pattern, drop_last=False)
    full = [b["__key__"] for b in build_loader(cfg, tokenizer, epoch=2)]
    loader = build_loader(cfg, tokenizer, epoch=2)
    head = []
    for batch in loader:
        head.append(batch["__key__"])
        if len(head) == stop_after:
            break
    state = json.loads(json.dumps(loader.state_dict()))  # what a checkpoint stores
    resumed = build_loader(cfg, tokenizer)  # built for epoch 0: the state sets the epoch
    resumed.load_state_dict(state)
    assert resumed.epoch == 2
    tail = [b["__key__"] for b in resumed]
    assert head + tail == full
    assert resumed.epoch == 3 and resumed.state_dict()["workers"][0]["drawn"] == 0


def test_resume_with_worker_processes_and_skips(tmp_path, tokenizer):
    samples = image_samples(0, 30)
    samples[2]["jpg"] = samples[17]["jpg"] = b"broken"
    for shard in range(4):
        write_tar(tmp_path / f"s-{shard}.tar", samples[shard * 8:(shard + 1) * 8])
    cfg = data_config(str(tmp_path / "s-{0..3}.tar"), num_workers=2, drop_last=False)
    loader = build_loader(cfg, tokenizer)
    head = []
    for batch in loader:
        head.extend(batch["__key__"])
        if len(head) >= 12:
            break
    state = loader.state_dict()
    resumed = build_loader(cfg, tokenizer)
    resumed.load_state_dict(state)
    tail = keys_of(resumed)
    assert sorted(head + tail) == [k for k in _all_keys(30) if k not in ("000002", "000017")]
    assert resumed.skip_counts()["corrupt_image"] == 2  # counted once, across the resume


def test_leaving_a_loop_early_and_iterating_again_continues(tmp_path, tokenizer):
    pattern = write_shards(tmp_path, [6, 6])
    cfg = data_config(pattern, drop_last=False)
    loader = build_loader(cfg, tokenizer)
    first = next(iter(loader))["__key__"]
    rest = keys_of(loader)
    assert sorted(first + rest) == _all_keys(12)
    assert loader.epoch == 1
    second_epoch = keys_of(loader)
    assert sorted(second_epoch) == _all_keys(12) and second_epoch != first + rest
    loader.set_epoch(1)
    assert keys_of(loader) == second_epoch


def test_resampled_resume(tmp_path, tokenizer):
    pattern = write_shards(tmp_path, [5, 5, 5])
    cfg = data_config(pattern, resampled=True, samples_per_epoch=40)
    full = keys_of(build_loader(cfg, tokenizer))
    assert len(full) == 40
    loader = build_loader(cfg, tokenizer)
    it = iter(loader)
    head = next(it)["__key__"] + next(it)["__key__"]
    resumed = build_loader(cfg, tokenizer)
    resumed.load_state_dict(loader.state_dict())
    assert head + keys_of(resumed) == full


def test_state_from_another_layout_is_rejected(tmp_path, tokenizer):
    pattern = write_shards(tmp_path, [6, 6])
    loader = build_loader(data_config(pattern), tokenizer)
    next(iter(loader))
    state = loader.state_dict()
    with pytest.raises(DataError, match="num_workers: saved 1, now 2"):
        build_loader(data_config(pattern, num_workers=2), tokenizer).load_state_dict(state)
    with pytest.raises(DataError, match="seed"):
        build_loader(data_config(pattern, seed=3), tokenizer).load_state_dict(state)
    with pytest.raises(DataError, match="shards_sha1"):
        build_loader(data_config(pattern.replace("{0000..0001}", "0000")), tokenizer).load_state_dict(state)
    with pytest.raises(DataError, match="not a data loader state"):
        loader.load_state_dict({"epoch": 0})


def test_shuffle_buffer_mixes_across_shards(tmp_path, tokenizer):
    pattern = write_shards(tmp_path, [10, 10])
    keys = keys_of(build_loader(data_config(pattern, shuffle_buffer=16, shard_shuffle=False, drop_last=False),
                                tokenizer))
    first_half = keys[:10]
    assert any(k >= "000010" for k in first_half) and sorted(keys) == _all_keys(20)
    keys = keys_of(build_loader(data_config(pattern, shuffle_buffer=0, shard_shuffle=False, drop_last=False),
                                tokenizer))
    assert keys == _all_keys(20)


def test_rank_out_of_range(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="rank 2"):
        build_loader(data_config(write_shards(tmp_path, [2])), tokenizer, rank=2, world_size=2)


def test_waveforms_differ_per_sample_and_are_finite(tmp_path, tokenizer):
    pattern = write_shards(tmp_path, [4], make=audio_samples)
    cfg = data_config(pattern, modality="audio")
    batch = next(iter(build_loader(cfg, tokenizer, train=False)))
    features = batch["input_features"]
    assert torch.isfinite(features).all()
    assert not torch.allclose(features[0], features[1])
    # the 0.3 s clips are longer than 0.25 s: no padding, so no -100 dB floor frames at the end
    assert features[:, :, -1].max() > -60
    np.testing.assert_array_less(-100.01, features.numpy())
    assert os.path.exists(tmp_path / "sizes.json")


def test_persistent_workers_follow_the_epoch(tmp_path, tokenizer):
    pattern = write_shards(tmp_path, [6, 6, 6, 6])
    cfg = data_config(pattern, num_workers=2, drop_last=False)
    loader = build_loader(cfg, tokenizer)
    epoch0, epoch1 = keys_of(loader), keys_of(loader)
    assert loader._loader is not None and loader._loader.persistent_workers
    assert sorted(epoch0) == sorted(epoch1) == _all_keys(24) and epoch0 != epoch1
    for worker in range(2):  # the second pass used epoch 1's plan in the same worker processes
        planned = _slot_keys(loader._dataset, 1, worker, 2)
        assert [k for k in epoch1 if k in planned] == planned


def _batch_keys(loader, stop_after=None) -> list[list[str]]:
    keys = []
    for batch in loader:
        keys.append(batch["__key__"])
        if len(keys) == stop_after:
            break
    return keys


def test_training_workers_run_ahead_into_the_next_epoch_and_keep_its_order(tmp_path, tokenizer):
    """Persistent workers of a training loader go on into the next epoch while the others finish
    the current one: worker 0 (shard 0, 2 batches) makes epoch 1's first prefetch_factor batches
    while worker 1 (shard 1, 8 batches) ends epoch 0, and no more. Every epoch still gives the
    batches, in the order, of workers started afresh for it; also when a loop is left early."""
    pattern = write_shards(tmp_path, [4, 16])
    layout = dict(num_workers=2, batch_size=2, shard_shuffle=False, drop_last=False)
    fresh = build_loader(data_config(pattern, persistent_workers=False, **layout), tokenizer)
    expected = [_batch_keys(fresh) for _ in range(3)]
    loader = build_loader(data_config(pattern, **layout), tokenizer)
    epochs = [_batch_keys(loader)]
    waiting = [[(item["__epoch__"], "__end__" in item) for item in queue] for queue in loader._turns.waiting]
    assert waiting == [[(1, False), (1, False)], []]
    head = _batch_keys(loader, stop_after=3)
    assert loader.epoch == 1 and loader._started()
    epochs.append(head + _batch_keys(loader))  # the same workers continue where the loop stood
    epochs.append(_batch_keys(loader))
    assert epochs == expected
    assert sorted(k for batch in expected[1] for k in batch) == _all_keys(20) and expected[1] != expected[2]


def test_chained_workers_resume_mid_epoch_and_at_an_epoch_boundary(tmp_path, tokenizer):
    pattern = write_shards(tmp_path, [6, 6, 4])
    cfg = data_config(pattern, num_workers=2, batch_size=2, drop_last=False)
    loader = build_loader(cfg, tokenizer)
    epoch0 = _batch_keys(loader)
    boundary = loader.state_dict()  # epoch 1 not started; its first batches already made
    head = _batch_keys(loader, stop_after=3)
    middle = loader.state_dict()
    tail = _batch_keys(loader)
    epoch2 = _batch_keys(loader)
    for state, rest in ((boundary, head + tail), (middle, tail)):
        resumed = build_loader(cfg, tokenizer)
        resumed.load_state_dict(state)
        assert _batch_keys(resumed) == rest
        assert _batch_keys(resumed) == epoch2
    assert sorted(k for batch in epoch0 for k in batch) == _all_keys(16)


@pytest.mark.slow
def test_resume_after_one_worker_finished(tmp_path, tokenizer):
    write_tar(tmp_path / "s-0.tar", image_samples(0, 8))
    write_tar(tmp_path / "s-1.tar", image_samples(8, 2))
    cfg = data_config(str(tmp_path / "s-{0..1}.tar"), num_workers=2, batch_size=2, drop_last=False,
                      shard_shuffle=False, shuffle_buffer=0)
    loader = build_loader(cfg, tokenizer)
    head = []
    for batch in loader:
        head.extend(batch["__key__"])
        if len(head) == 8:  # worker 1 (1 batch) has ended by now; worker 0 has 1 batch to go
            break
    state = loader.state_dict()
    assert [w["done"] for w in state["workers"]] == [False, True]
    assert [w["batches"] for w in state["workers"]] == [3, 1]
    resumed = build_loader(cfg, tokenizer)
    resumed.load_state_dict(state)
    assert head == ["000000", "000001", "000008", "000009", "000002", "000003", "000004", "000005"]
    assert keys_of(resumed) == ["000006", "000007"]


def test_a_program_exits_while_a_loader_with_workers_is_still_referenced(tmp_path):
    """Workers ignore SIGTERM; before the loader stopped them at exit, multiprocessing's exit
    handler (terminate, then join) waited for them forever."""
    pattern = write_shards(tmp_path, [8, 8])
    script = (f"from tests.data_fixtures import data_config, make_tokenizer\n"
              f"from xfast.data import build_loader\n"
              f"loader = build_loader(data_config({pattern!r}, batch_size=2, num_workers=1), make_tokenizer())\n"
              f"batches = iter(loader)\n"
              f"print(next(batches)['input_ids'].shape[0])\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # `python -c` puts the working directory first on sys.path: tests/ and xfast/ import from root.
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=root)
    assert done.returncode == 0 and done.stdout.strip() == "2", done.stderr[-2000:]


@pytest.mark.parametrize("seed", [0, 7, 2**32 - 1, 2**32 + 5, 2**70])
def test_augmentation_generator_is_the_seed_sequence_of_seed_epoch_sample(seed):
    """Seeds below 2**32 pass SeedSequence their uint32 words directly (faster); every seed must
    give the generator of default_rng([seed, epoch, crc32(url NUL key)]), the documented draw."""
    import zlib

    stream = ShardStream(data_config("unused.tar", seed=seed), make_tokenizer(), [["unused.tar"]], rank=0,
                         world_size=1, train=True, shared_epoch=None)
    for epoch, key in [(0, "000001"), (3, "a/b"), (2**31, "x" * 40)]:
        sample = {"__url__": "shards/s-0007.tar", "__key__": key}
        ident = zlib.crc32(f"shards/s-0007.tar\0{key}".encode())
        want = np.random.default_rng([seed, epoch, ident])
        got = stream._augment_rng(epoch, sample)
        np.testing.assert_array_equal(got.integers(0, 2**63, size=8), want.integers(0, 2**63, size=8))


@pytest.mark.parametrize("modality", ["image", "audio"])
@pytest.mark.parametrize("route", ["pipe", "shared memory"])
def test_a_worker_sends_the_batches_the_main_process_makes(tmp_path, tokenizer, modality, route, monkeypatch):
    """Small batches travel through the worker's pipe as arrays, large ones in shared memory
    (TENSOR_BUDGET 0 sends these small ones that way): either way 1 worker (one slot, the same order)
    gives exactly the tensors of the in-process loader."""
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("the worker inherits the patched budget only when forked")
    # Forked workers inherit the patched budget whatever the platform's default start method.
    monkeypatch.setattr(pipeline, "large_pipe_context", lambda: transfer.large_pipe_context("fork"))
    if route == "shared memory":
        monkeypatch.setattr(transfer, "TENSOR_BUDGET", 0)
    make = image_samples if modality == "image" else audio_samples
    pattern = write_shards(tmp_path, [5, 6], make=make)
    runs = []
    for workers in (0, 1):
        cfg = data_config(pattern, modality=modality, num_workers=workers, persistent_workers=False, drop_last=False)
        runs.append(list(build_loader(cfg, tokenizer, train=True)))
    media = "pixel_values" if modality == "image" else "input_features"
    assert len(runs[0]) == len(runs[1]) == 3
    for in_process, from_worker in zip(*runs):
        assert in_process.keys() == from_worker.keys() and in_process["__key__"] == from_worker["__key__"]
        for key in (media, "input_ids", "attention_mask"):
            want, got = in_process[key], from_worker[key]
            assert got.dtype == want.dtype and torch.equal(got, want)
            assert got.is_shared() == (route == "shared memory")
            if route == "pipe":  # the shared-memory batch is built contiguous
                assert got.stride() == want.stride()


def _in_worker(monkeypatch):
    monkeypatch.setattr(transfer, "get_worker_info", lambda: object())


def test_only_batches_that_fit_the_pipe_are_sent_as_arrays():
    shared = torch.arange(6.0).share_memory_()
    batch = {"__key__": ["a", "b"], "ids": torch.arange(4), "pixels": shared, "mask": torch.ones(2, 3),
             "ids_as_array": np.arange(3)}
    sent = transfer.for_pipe(batch)
    assert isinstance(sent["ids"], np.ndarray) and isinstance(sent["mask"], np.ndarray)
    assert sent["pixels"] is shared and sent["__key__"] == ["a", "b"]  # already shared: its handle is sent
    back = transfer.from_pipe(sent)
    assert back.keys() == batch.keys() and back["__key__"] == ["a", "b"] and back["pixels"] is shared
    assert isinstance(back["ids_as_array"], np.ndarray)  # only what for_pipe made turns back into tensors
    for key in ("ids", "mask"):
        assert back[key].dtype == batch[key].dtype and torch.equal(back[key], batch[key])
    large = {"x": torch.zeros(transfer.TENSOR_BUDGET // 4 + 1), "y": torch.zeros(1)}  # float32: 4 bytes over
    assert transfer.for_pipe(large) is large


def test_tensors_numpy_cannot_hold_take_torchs_route():
    """bfloat16 (no numpy dtype), a tensor that requires grad, a conjugate view, a view with gaps
    and a broadcast one stay tensors (torch's route keeps them exact); the rest of the batch still
    goes as arrays."""
    plain = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    odd = {"bf16": plain.to(torch.bfloat16), "grad": plain.clone().requires_grad_(),
           "conj": torch.complex(plain, plain).conj(), "gaps": plain[:, ::2], "broadcast": plain[:1].expand(4, 3)}
    sent = transfer.for_pipe({"plain": plain, **odd})
    assert isinstance(sent["plain"], np.ndarray) and list(sent[transfer.PIPED]) == ["plain"]
    for key, value in odd.items():
        assert sent[key] is value
    back = transfer.from_pipe(sent)
    assert torch.equal(back["plain"], plain) and back["bf16"].dtype == torch.bfloat16


def test_permuted_tensors_arrive_with_their_strides():
    """The log-mel batch is a transposed view: it travels as its block of memory and arrives with
    the same shape and strides (also a size-1 dimension's), through a real pickle."""
    from multiprocessing.reduction import ForkingPickler

    base = torch.randn(4, 16, 32)
    batch = {"features": base.transpose(1, 2)[:, None], "ids": torch.arange(6).reshape(2, 3).t(),
             "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3)}
    sent = pickle.loads(ForkingPickler.dumps(transfer.for_pipe(batch)))
    assert list(sent[transfer.PIPED]) == list(batch)
    back = transfer.from_pipe(sent)
    for key, want in batch.items():
        got = back[key]
        assert got.dtype == want.dtype and got.shape == want.shape and got.stride() == want.stride()
        assert torch.equal(got, want)


@pytest.mark.parametrize("over", [0, 1])
def test_build_shared_and_for_pipe_apply_one_budget(monkeypatch, over):
    """A media tensor that, with the batch's text, fits TENSOR_BUDGET exactly is built privately and
    the whole batch goes through the pipe; one byte more and the media is built in shared memory while
    the text still goes through the pipe (it never ends up copied by torch's shared-memory path)."""
    _in_worker(monkeypatch)
    batch = {"__key__": ["a"], "input_ids": torch.zeros(2 << 10, dtype=torch.long)}  # 16 KiB of text
    media = transfer.TENSOR_BUDGET - batch["input_ids"].nbytes + over
    shared = transfer.build_shared(batch, media)
    assert shared == bool(over)
    batch["pixels"] = torch.zeros(media, dtype=torch.uint8)
    if shared:
        batch["pixels"].share_memory_()
    sent = transfer.for_pipe(batch)
    assert isinstance(sent["input_ids"], np.ndarray)
    assert isinstance(sent["pixels"], np.ndarray) != shared


def test_a_batch_at_the_budget_fits_the_pipe_pickled():
    """The headroom of TENSOR_BUDGET holds the pickle's framing and a tiny eval batch's keys and
    captions: the message the worker writes is at most PIPE_BYTES."""
    from multiprocessing.reduction import ForkingPickler

    keys = [f"{i:09d}" for i in range(32)]
    batch = {"__key__": keys, "captions": [[f"a caption of sample {k}, long enough to count" * 2] for k in keys],
             "input_ids": torch.zeros(32, 77, dtype=torch.long), "attention_mask": torch.ones(32, 77, dtype=torch.long)}
    text = batch["input_ids"].nbytes * 2
    batch["pixel_values"] = torch.zeros((transfer.TENSOR_BUDGET - text) // 4)
    sent = transfer.for_pipe(batch)
    assert list(sent[transfer.PIPED]) == ["input_ids", "attention_mask", "pixel_values"]
    counters = {"__worker__": 3, "__epoch__": 12, "__drawn__": 10**9, "__batches__": 10**7,
                "__skips__": {f"skip_kind_{i}": 10**6 for i in range(12)}}
    message = ForkingPickler.dumps((10**9, {**sent, **counters}))  # torch sends (index, batch)
    assert len(message) <= transfer.PIPE_BYTES


def _pipe_size(fcntl, queue):
    return fcntl.fcntl(queue._writer.fileno(), fcntl.F_GETPIPE_SZ)


def test_the_loaders_result_pipe_holds_pipe_bytes_and_only_it_is_enlarged():
    fcntl = pytest.importorskip("fcntl")
    if not hasattr(fcntl, "F_SETPIPE_SZ"):
        pytest.skip("pipe sizes are Linux's")
    probe, other = os.pipe()
    try:
        fcntl.fcntl(other, fcntl.F_SETPIPE_SZ, transfer.PIPE_BYTES)
    except OSError as error:  # above pipe-max-size, or this user's pipe quota is spent
        pytest.skip(f"this system does not give this user a pipe of {transfer.PIPE_BYTES} bytes: {error}")
    finally:
        os.close(probe)
        os.close(other)

    class Numbers(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield from range(2)

    loader = torch.utils.data.DataLoader(Numbers(), batch_size=None, num_workers=2,
                                         multiprocessing_context=transfer.large_pipe_context())
    for _ in range(2):  # the second iterator as well (non-persistent workers: a new one per epoch)
        batches = iter(loader)
        assert _pipe_size(fcntl, batches._worker_result_queue) == transfer.PIPE_BYTES
        default = _pipe_size(fcntl, batches._index_queues[0])
        assert default < transfer.PIPE_BYTES
        assert all(_pipe_size(fcntl, queue) == default for queue in batches._index_queues)
        assert sorted(batches) == [0, 0, 1, 1]
        del batches


def test_a_refused_enlargement_is_logged_once(monkeypatch, caplog):
    fcntl = pytest.importorskip("fcntl")
    if not hasattr(fcntl, "F_SETPIPE_SZ"):
        pytest.skip("pipe sizes are Linux's")

    def refuse(fd, command, *args):
        if command == fcntl.F_SETPIPE_SZ:
            raise PermissionError(1, "Operation not permitted")
        return fcntl.fcntl(fd, command, *args)

    monkeypatch.setattr(transfer, "fcntl", type("Refusing", (), {"fcntl": staticmethod(refuse),
                                                                 "F_SETPIPE_SZ": fcntl.F_SETPIPE_SZ}))
    monkeypatch.setattr(transfer, "_refusal_logged", False)
    queues = []
    for _ in range(3):
        context = transfer.large_pipe_context()
        queues.append(context.Queue())
        context.Event()
    refusals = [r for r in caplog.records if r.name == "xfast.data.transfer" and "refused" in r.getMessage()]
    assert len(refusals) == 1 and "Operation not permitted" in refusals[0].getMessage()
    for queue in queues:
        queue.close()


def test_transfer_imports_without_fcntl():
    """Not a POSIX system: the module imports, and the context is the plain one."""
    script = ("import sys; sys.modules['fcntl'] = None\n"
              "import multiprocessing\n"
              "from xfast.data import transfer\n"
              "assert transfer.fcntl is None\n"
              "assert type(transfer.large_pipe_context()) is type(multiprocessing.get_context())\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=root)
    assert done.returncode == 0, done.stderr[-2000:]
