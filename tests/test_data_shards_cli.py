"""`xfast shards`: write shards from a media folder + caption table, read them back, --check."""
import csv
import json
import os
import tarfile

import pytest

from tests.data_fixtures import audio_bytes, data_config, image_bytes, image_samples, write_tar
from xfast.data import build_loader
from xfast.data.shards import main


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--captions", "--out", "--shard-size", "--modality", "--prefix", "--file-column",
                   "--caption-column", "--tag-column", "--no-verify", "--check", "--max-listed"):
        assert option in out


def test_image_folder_to_shards_and_back(tmp_path, tokenizer, capsys):
    media = tmp_path / "photos"
    (media / "sub").mkdir(parents=True)
    rows = []
    for i in range(7):
        name = f"sub/p{i}.png" if i % 2 else f"p{i}.jpg"
        (media / name).write_bytes(image_bytes(30 + i, 20, seed=i, fmt="PNG" if i % 2 else "JPEG"))
        rows.append({"file": name, "caption": f"a red dog {i}"})
    (media / "broken.jpg").write_bytes(b"nope")
    rows += [{"file": "broken.jpg", "caption": "broken"}, {"file": "absent.jpg", "caption": "gone"},
             {"file": "p0.jpg", "caption": ""}]
    with open(tmp_path / "captions.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["file", "caption"])
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "shards"
    assert main([str(media), "--captions", str(tmp_path / "captions.csv"), "--out", str(out),
                 "--shard-size", "3"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 7 samples in 3 shards" in printed and "corrupt_image" in printed and "unreadable" in printed
    assert json.loads((out / "sizes.json").read_text()) == {"shards-0000.tar": 3, "shards-0001.tar": 3,
                                                            "shards-0002.tar": 1}
    with tarfile.open(out / "shards-0000.tar") as archive:
        assert archive.getnames()[:3] == ["000000000.jpg", "000000000.txt", "000000000.json"]
        assert archive.getnames()[4] == "000000001.txt"
    loader = build_loader(data_config(str(out / "shards-{0000..0002}.tar")), tokenizer, train=False)
    batches = list(loader)
    assert [c for b in batches for c in b["captions"]] == [[f"a red dog {i}"] for i in range(7)]
    assert loader.num_samples == 7 and sum(loader.skip_counts().values()) == 0
    assert main(["--check", str(out / "shards-{0000..0002}.tar")]) == 0
    assert "3 shards, 7 samples" in capsys.readouterr().out


def test_audio_jsonl_with_caption_lists_and_tags(tmp_path, tokenizer):
    media = tmp_path / "clips"
    media.mkdir()
    with open(tmp_path / "clips.jsonl", "w") as f:
        for i, fmt in enumerate(["FLAC", "WAV", "OGG", "MP3"]):
            name = f"c{i}.{fmt.lower()}"
            (media / name).write_bytes(audio_bytes(0.3, 16000, fmt, seed=i))
            f.write(json.dumps({"file": name, "caption": [f"dog barks {i}", f"loud dog {i}"], "tag": ["dog"]}) + "\n")
    out = tmp_path / "out"
    assert main([str(media), "--captions", str(tmp_path / "clips.jsonl"), "--out", str(out), "--modality", "audio",
                 "--prefix", "audio"]) == 0
    assert sorted(os.listdir(out)) == ["audio-0000.tar", "sizes.json"]
    batch = next(iter(build_loader(data_config(str(out / "audio-0000.tar"), modality="audio"), tokenizer,
                                   train=False)))
    assert batch["captions"] == [[f"dog barks {i}", f"loud dog {i}"] for i in range(4)]
    assert batch["tags"] == [["dog"]] * 4


def test_check_reports_bad_shards(tmp_path, capsys):
    out = tmp_path / "shards"
    out.mkdir()
    samples = image_samples(0, 4)
    samples[1]["jpg"] = b"broken"
    write_tar(out / "shards-0000.tar", samples)
    write_tar(out / "shards-0001.tar", image_samples(4, 4), cut_bytes=3000)
    (out / "sizes.json").write_text(json.dumps({"shards-0000.tar": 5, "shards-0001.tar": 4}))
    assert main(["--check", str(out / "shards-{0000..0001}.tar")]) == 1
    printed = capsys.readouterr().out
    assert "corrupt_image: 1" in printed and "truncated_shard: 1" in printed
    assert "sizes.json says 5, read 4" in printed


def test_bad_arguments_are_explained(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([str(tmp_path)])
    assert "needs MEDIA_DIR, --captions and --out" in capsys.readouterr().err
    (tmp_path / "c.csv").write_text("path,text\na.jpg,x\n")
    with pytest.raises(SystemExit, match="needs columns 'file' and 'caption'"):
        main([str(tmp_path), "--captions", str(tmp_path / "c.csv"), "--out", str(tmp_path / "o")])


def test_modality_is_inferred_and_every_left_out_file_is_named(tmp_path, capsys):
    media = tmp_path / "clips"
    media.mkdir()
    rows = []
    for i in range(3):
        (media / f"c{i}.flac").write_bytes(audio_bytes(0.3, 16000, "FLAC", seed=i))
        rows.append({"file": f"c{i}.flac", "caption": f"dog {i}"})
    (media / "bad.wav").write_bytes(b"RIFF but not audio")
    rows += [{"file": "bad.wav", "caption": "bad"}, {"file": "gone.mp3", "caption": "gone"},
             {"file": "c0.flac", "caption": ""}, {"file": "notes.txt", "caption": "text"}]
    with open(tmp_path / "c.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["file", "caption"])
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "out"
    assert main([str(media), "--captions", str(tmp_path / "c.csv"), "--out", str(out), "--max-listed", "3"]) == 0
    printed = capsys.readouterr().out
    assert "modality: audio (inferred from the files: 4 .flac, 1 .mp3, 1 .wav" in printed  # c0 twice
    assert "wrote 3 samples in 1 shards" in printed
    assert "  bad.wav (line 5): corrupt_audio: " in printed
    assert "  gone.mp3 (line 6): unreadable file: No such file or directory" in printed
    assert "  c0.flac (line 7): missing_caption: empty caption" in printed
    assert "notes.txt" not in printed and "... and 1 more" in printed  # --max-listed 3 of 4
    with open(out / "left_out.csv", newline="") as f:
        listed = list(csv.DictReader(f))
    assert [(r["file"], r["line"]) for r in listed] == [("bad.wav", "5"), ("gone.mp3", "6"), ("c0.flac", "7"),
                                                       ("notes.txt", "8")]
    assert listed[3]["reason"] == "not an audio file: extension not one of flac|wav|mp3|ogg|opus"
    # A clean rerun into the same folder drops the stale list.
    with open(tmp_path / "c.csv", "w", newline="") as f:
        f.write("file,caption\nc1.flac,dog\n")
    assert main([str(media), "--captions", str(tmp_path / "c.csv"), "--out", str(out)]) == 0
    assert not (out / "left_out.csv").exists()


def test_modality_that_cannot_be_inferred_is_asked_for(tmp_path, capsys):
    (tmp_path / "c.csv").write_text("file,caption\na.jpg,x\nb.flac,y\n")
    assert main([str(tmp_path), "--captions", str(tmp_path / "c.csv"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "image files (1 .jpg) and audio files (1 .flac)" in err and "give --modality image or --modality audio" in err
    (tmp_path / "c.csv").write_text("file,caption\na.txt,x\n")
    assert main([str(tmp_path), "--captions", str(tmp_path / "c.csv"), "--out", str(tmp_path / "o")]) == 2
    assert "no file in the table has an image (" in capsys.readouterr().err


def test_check_names_unreadable_shards_and_bad_samples(tmp_path, capsys):
    out = tmp_path / "shards"
    out.mkdir()
    samples = image_samples(0, 3)
    samples[2]["jpg"] = b"broken"
    write_tar(out / "shards-0000.tar", samples)
    missing = out / "shards-0001.tar"
    assert main(["--check", str(out / "shards-{0000..0001}.tar")]) == 1
    printed = capsys.readouterr().out
    assert "unreadable_shard: 1" in printed and "corrupt_image: 1" in printed
    assert f"  unreadable_shard: {missing}: [Errno 2] No such file or directory" in printed
    assert f"  corrupt_image: {out / 'shards-0000.tar'} sample 000002: " in printed
