"""Bad data is skipped and counted per kind; an all-bad run stops with a clear error."""
import json
import tarfile

import pytest

from tests.data_fixtures import audio_samples, data_config, image_bytes, image_samples, keys_of, write_tar
from xfast.data import DataError, build_loader
from xfast.data.image import ImageTransform


def _nonzero(counts):
    return {k: v for k, v in counts.items() if v}


def test_every_bad_image_sample_kind_is_skipped_and_counted(tmp_path, tokenizer):
    samples = image_samples(0, 12)
    samples[0]["jpg"] = b"not an image"                                       # corrupt_image
    samples[1]["jpg"] = image_bytes(64, 64, fmt="JPEG")[:250]                 # truncated JPEG: corrupt_image
    del samples[2]["json"]; del samples[2]["txt"]                             # missing_caption
    samples[3]["json"] = {"text": []}; del samples[3]["txt"]                   # empty_caption_list
    del samples[4]["jpg"]                                                     # missing_media
    samples[5]["json"] = b"{not json"                                         # corrupt_metadata
    samples[6]["json"] = {"text": "   "}                                      # missing_caption (blank)
    samples[7]["json"] = {"text": 42}                                         # corrupt_metadata (not text)
    write_tar(tmp_path / "a.tar", samples)
    loader = build_loader(data_config(str(tmp_path / "a.tar")), tokenizer, train=False)
    assert keys_of(loader) == [f"{i:06d}" for i in range(8, 12)]
    assert _nonzero(loader.skip_counts()) == {"corrupt_image": 2, "missing_caption": 2, "empty_caption_list": 1,
                                              "missing_media": 1, "corrupt_metadata": 2}


def test_bad_audio_and_empty_caption_list(tmp_path, tokenizer):
    samples = audio_samples(0, 6)
    samples[0]["flac"] = b"fLaC broken"
    samples[1]["flac"] = b""
    samples[2]["json"] = {"text": [], "tag": ["x"]}
    samples[3]["json"] = {"tag": ["x"]}
    write_tar(tmp_path / "a.tar", samples)
    loader = build_loader(data_config(str(tmp_path / "a.tar"), modality="audio", batch_size=2), tokenizer,
                          train=False)
    assert keys_of(loader) == ["000004", "000005"]
    assert _nonzero(loader.skip_counts()) == {"corrupt_audio": 2, "empty_caption_list": 1, "missing_caption": 1}


def test_bad_shards_are_skipped(tmp_path, tokenizer):
    good = write_tar(tmp_path / "s-0.tar", image_samples(0, 4))
    with tarfile.open(good) as archive:
        members = archive.getmembers()  # 3 files a sample: sample 2 starts at member 6
    write_tar(tmp_path / "s-1.tar", image_samples(100, 4), cut_bytes=members[6].offset_data + 10)  # inside a file
    write_tar(tmp_path / "s-2.tar", image_samples(200, 4), cut_bytes=members[6].offset)  # at a file boundary
    (tmp_path / "s-3.tar").write_bytes(b"\x00garbage" * 100)                            # not a tar
    (tmp_path / "s-4.tar").write_bytes(b"")                                             # empty file
    urls = [good, str(tmp_path / "s-1.tar"), str(tmp_path / "s-2.tar"), str(tmp_path / "s-3.tar"),
            str(tmp_path / "s-4.tar"), str(tmp_path / "missing.tar"), "pipe:exit 3"]
    loader = build_loader(data_config(urls, batch_size=1), tokenizer, train=False)
    # Samples before a cut are kept; the one being read when the data ends may lack files: dropped.
    assert keys_of(loader) == ["000000", "000001", "000002", "000003", "000100", "000101", "000200"]
    assert _nonzero(loader.skip_counts()) == {"truncated_shard": 2, "unreadable_shard": 4}


def test_all_bad_stops_with_a_clear_error(tmp_path, tokenizer):
    samples = image_samples(0, 6)
    for s in samples:
        s["jpg"] = b"broken"
    write_tar(tmp_path / "a.tar", samples)
    loader = build_loader(data_config(str(tmp_path / "a.tar")), tokenizer)
    with pytest.raises(DataError, match=r"every sample was unusable: \{'corrupt_image': 6\}"):
        list(loader)


def test_all_bad_in_resampled_mode_gives_up_instead_of_hanging(tmp_path, tokenizer):
    samples = image_samples(0, 6)
    for s in samples:
        del s["txt"], s["json"]
    write_tar(tmp_path / "a.tar", samples)
    cfg = data_config(str(tmp_path / "a.tar"), resampled=True, samples_per_epoch=100, max_consecutive_skips=50)
    with pytest.raises(DataError, match="50 unusable samples or shards in a row.*missing_caption"):
        list(build_loader(cfg, tokenizer))
    cfg = data_config([str(tmp_path / "gone-1.tar"), str(tmp_path / "gone-2.tar")], resampled=True,
                      samples_per_epoch=100, max_consecutive_skips=30)
    with pytest.raises(DataError, match="no readable shard in 30 tries.*unreadable_shard': 30"):
        list(build_loader(cfg, tokenizer))


def test_empty_data_is_an_error_not_a_silent_empty_epoch(tmp_path, tokenizer):
    write_tar(tmp_path / "a.tar", [])
    with pytest.raises(DataError, match="hold no samples"):
        list(build_loader(data_config(str(tmp_path / "a.tar")), tokenizer))


def test_unforeseen_decoder_exception_is_counted_not_fatal(tmp_path, tokenizer, monkeypatch):
    write_tar(tmp_path / "a.tar", image_samples(0, 5))
    original = ImageTransform.__call__

    def flaky(self, data, rng=None):
        if data == image_samples(1, 1)[0]["jpg"]:
            raise ZeroDivisionError("decoder bug")
        return original(self, data, rng)

    monkeypatch.setattr(ImageTransform, "__call__", flaky)
    loader = build_loader(data_config(str(tmp_path / "a.tar")), tokenizer, train=False)
    assert "000001" not in keys_of(loader)
    assert _nonzero(loader.skip_counts()) == {"corrupt_image": 1}


def test_text_bad_lines_and_nli_rows(tmp_path, tokenizer):
    (tmp_path / "s.txt").write_bytes(b"a dog runs\n\n\xff\xfe bad utf8\nthe cat sits\n")
    loader = build_loader(data_config(str(tmp_path / "s.txt"), modality="text", batch_size=1), tokenizer,
                          train=False)
    assert keys_of(loader) == ["s.txt:0", "s.txt:3"]
    assert _nonzero(loader.skip_counts()) == {"missing_text": 1, "corrupt_metadata": 1}
    (tmp_path / "n.csv").write_text("sent0,sent1,hard_neg\na dog,a cat,rain\nonly,two\n,x,y\n")
    loader = build_loader(data_config(str(tmp_path / "n.csv"), modality="nli", batch_size=1), tokenizer,
                          train=False)
    assert keys_of(loader) == ["n.csv:0"]
    assert _nonzero(loader.skip_counts()) == {"missing_text": 2}
    (tmp_path / "bad.csv").write_text("premise,hypothesis\na,b\n")
    loader = build_loader(data_config([str(tmp_path / "n.csv"), str(tmp_path / "bad.csv")], modality="nli",
                                      batch_size=1), tokenizer, train=False)
    assert len(keys_of(loader)) == 1 and loader.skip_counts()["unreadable_shard"] == 1
    (tmp_path / "n.jsonl").write_text(json.dumps({"anchor": "a", "positive": "b", "negative": "c"}) + "\n{oops\n")
    loader = build_loader(data_config(str(tmp_path / "n.jsonl"), modality="nli", batch_size=1), tokenizer,
                          train=False)
    assert keys_of(loader) == ["n.jsonl:0"] and _nonzero(loader.skip_counts()) == {"corrupt_metadata": 1}
