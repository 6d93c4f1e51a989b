"""`xfast eval` end to end on tiny saved models: table, JSON, PNGs, run-folder resolution, errors."""
import json

import pytest
import torch

from xfast.config import parse
from xfast.eval import cli, retrieval_metrics, runner, sts_correlation, zeroshot_classify
from xfast.models import ModelConfig, build_model, train_tokenizer

SENTENCES = ["a cat sits on the mat", "a dog runs in the park", "the bird flies", "a man plays guitar",
             "two dogs play", "a woman is cooking", "a child rides a horse", "the sun is shining"]
STS_ROWS = [(0, 1, 1.0), (1, 4, 4.2), (2, 3, 0.4), (5, 6, 2.0), (7, 2, 1.6), (0, 4, 2.5), (3, 5, 4.5), (6, 1, 3.1)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    train_tokenizer(SENTENCES * 3, 80, str(root / "tok"))
    raw = {"text": {"type": "bert", "preset": "tiny", "tokenizer": str(root / "tok")},
           "image": {"type": "vit", "preset": "tiny"}, "embed_dim": 16}
    paths = []
    for seed, folder in ((0, root / "base"), (1, root / "run" / "final")):
        torch.manual_seed(seed)
        build_model(parse(ModelConfig, raw, "model")).save_pretrained(str(folder))
        paths.append(folder)
    (root / "run" / "config.json").write_text(json.dumps({"data": {"image": {"size": 32}}}))
    sts = root / "sts.tsv"
    sts.write_text("sentence1\tsentence2\tscore\n"
                   + "".join(f"{SENTENCES[a]}\t{SENTENCES[b]}\t{s}\n" for a, b, s in STS_ROWS))
    return {"export": str(paths[0]), "run": str(root / "run"), "sts": str(sts)}


def test_help_explains_every_option(capsys):
    parser = cli.build_parser()
    for action in parser._actions:
        assert action.help, f"{action.option_strings} has no help"
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    for option in ("--ckpt", "--task", "--data", "--classnames", "--templates", "--batch-size", "--out", "--device"):
        assert option in text


def test_sts_from_an_export(checkpoints, tmp_path, capsys):
    rc = cli.main(["--ckpt", checkpoints["export"], "--task", "sts", "--data", checkpoints["sts"],
                   "--out", str(tmp_path), "--no-progress", "--device", "cpu"])
    assert rc == 0
    record = json.loads((tmp_path / "sts.json").read_text())
    metrics = record["checkpoints"]["base"]["metrics"]
    model, tokenizer, _ = cli.load_checkpoint(checkpoints["export"], "cpu")
    model.eval()
    enc1 = tokenizer([SENTENCES[a] for a, _, _ in STS_ROWS], padding=True, return_tensors="pt")
    enc2 = tokenizer([SENTENCES[b] for _, b, _ in STS_ROWS], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = sts_correlation(model.sentence_embedding(**enc1), model.sentence_embedding(**enc2),
                                   [s for _, _, s in STS_ROWS])
    assert metrics == pytest.approx(expected)
    table = capsys.readouterr().out
    assert "spearman" in table and "base" in table and f"{expected['spearman']:.4f}" in table


def test_geometry_across_checkpoints_draws_the_plot(checkpoints, tmp_path):
    rc = cli.main(["--ckpt", checkpoints["export"], "--ckpt", checkpoints["run"], "--task", "geometry",
                   "--data", checkpoints["sts"], "--sts-positive-threshold", "4", "--out", str(tmp_path),
                   "--no-progress"])
    assert rc == 0
    record = json.loads((tmp_path / "geometry.json").read_text())
    assert list(record["checkpoints"]) == ["base", "run"]  # a run folder is named after the run
    for entry in record["checkpoints"].values():
        assert set(entry["metrics"]) == {"text/alignment", "text/uniformity"}
    png = tmp_path / "geometry_alignment_uniformity.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_retrieval_with_batches_from_the_data_hook(checkpoints, tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(5, 3, 32, 32, generator=g)
    captions = [[SENTENCES[i], SENTENCES[i + 1]] for i in range(5)]
    seen = []

    def fake_batches(data, *, modality, tokenizer, batch_size, data_config):
        seen.append(data_config)
        return [{"pixel_values": pixels[:2], "captions": captions[:2]},
                {"pixel_values": pixels[2:], "captions": captions[2:]}]

    monkeypatch.setattr(runner, "xfast_data_batches", fake_batches)
    rc = cli.main(["--ckpt", checkpoints["run"], "--task", "retrieval", "--data", "x.tar", "--ks", "1", "3",
                   "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    assert seen == [{"image": {"size": 32}}]  # the run folder's data section
    record = json.loads((tmp_path / "retrieval.json").read_text())["checkpoints"]["run"]
    model, tokenizer, _ = cli.load_checkpoint(checkpoints["run"], "cpu")
    model.eval()
    texts = [c for item in captions for c in item]
    with torch.no_grad():
        enc = tokenizer(texts, padding=True, return_tensors="pt")
        # Media encoded batch by batch as the hook delivers them: the tiny random towers score
        # the captions within ~1e-5 of each other, so encoding all 5 images at once (other GEMM
        # shapes, ~1e-7 rounding differences) can reorder near-tied captions and move mAP@10.
        media = torch.cat([model.encode_image(pixels[:2]), model.encode_image(pixels[2:])])
        expected = retrieval_metrics(media, model.encode_text(**enc), [i // 2 for i in range(10)], ks=(1, 3),
                                     media_name="image")
    assert record["metrics"] == pytest.approx(expected)
    assert record["recall_curve"]["text_to_media"][0] == pytest.approx(expected["text_to_image/R@1"])
    assert record["recall_curve"]["media_to_text"][-1] == 1.0
    assert (tmp_path / "retrieval_recall.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--ckpt", "/nonexistent/run"], "not an exported model folder"),
        (["--ckpt", "A", "--ckpt", "B", "--name", "only-one"], "give one --name per --ckpt"),
        (["--ckpt", "A", "--batch-size", "0"], "--batch-size must be >= 1"),
        (["--ckpt", "A", "--ks", "1"], "--ks applies to zeroshot and retrieval"),
    ],
)
def test_errors_are_reported(extra, message, tmp_path, capsys):
    rc = cli.main(extra + ["--task", "sts", "--data", "x.tsv", "--out", str(tmp_path)])
    assert rc == 2
    assert message in capsys.readouterr().err


def write_image_shard(path, items):
    """A WebDataset tar in img2dataset's layout: KEY.png + KEY.json {"caption": [...], "tag": ...}."""
    import io
    import tarfile

    from PIL import Image

    with tarfile.open(path, "w") as tar:
        for key, colour, captions, tag in items:
            png = io.BytesIO()
            Image.new("RGB", (40, 40), colour).save(png, format="PNG")
            for name, data in ((f"{key}.png", png.getvalue()),
                               (f"{key}.json", json.dumps({"caption": captions, "tag": tag}).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.mark.slow
def test_zeroshot_and_retrieval_read_real_shards(checkpoints, tmp_path):
    items = [("000", (255, 0, 0), ["a red square", "red"], "red"), ("001", (0, 0, 255), ["blue"], "blue"),
             ("002", (0, 255, 0), ["a green one", "green", "green again"], 2)]
    write_image_shard(tmp_path / "eval-0.tar", items[:2])
    write_image_shard(tmp_path / "eval-1.tar", items[2:])
    data = str(tmp_path / "eval-{0..1}.tar")
    model, tokenizer, run_data = cli.load_checkpoint(checkpoints["run"], "cpu")
    model.eval()
    result = runner.run_task(model, tokenizer, {"task": "retrieval", "data": data}, batch_size=2, data_config=run_data)
    loaded = list(runner.xfast_data_batches(data, modality="image", tokenizer=tokenizer, batch_size=8,
                                            data_config=run_data))
    assert [c for b in loaded for c in b["captions"]] == [i[2] for i in items]
    pixels = torch.cat([b["pixel_values"] for b in loaded])
    texts = [c for i in items for c in i[2]]
    with torch.no_grad():
        expected = retrieval_metrics(model.encode_image(pixels), model.encode_text(**tokenizer(texts, padding=True, return_tensors="pt")),
                                     [0, 0, 1, 2, 2, 2], media_name="image")
    assert result.metrics == pytest.approx(expected)
    # Tags "red", "blue" and "2" (numeric .json tags arrive as strings: an index into classnames).
    out = runner.run_task(model, tokenizer, {"task": "zeroshot", "data": data, "classnames": ["red", "blue", "green"],
                                             "ks": [1, 3]}, data_config=run_data).metrics
    with torch.no_grad():
        prompts = tokenizer([f"a photo of a {c}." for c in ("red", "blue", "green")], padding=True, return_tensors="pt")
        direct = zeroshot_classify(model.encode_image(pixels), model.encode_text(**prompts), [0, 1, 2], ks=(1, 3))
    assert out == pytest.approx({**direct, "classes": 3.0})


def test_plots_refuse_missing_data(tmp_path):
    from xfast.eval.plots import plot_alignment_uniformity, plot_recall_curves

    with pytest.raises(ValueError, match="no checkpoint has alignment and uniformity"):
        plot_alignment_uniformity({"a": {"text/uniformity": -2.0}}, tmp_path / "g.png")
    with pytest.raises(ValueError, match="ranks is empty"):
        plot_recall_curves({}, tmp_path / "r.png")


def test_a_pretrained_source_evaluates_directly_and_a_run_gets_its_training_curves(checkpoints, tmp_path, capsys):
    import shutil

    from hf_sources import clip_model

    from xfast.models import load_tokenizer
    source = tmp_path / "clip"  # a transformers CLIPModel folder, as downloaded, before any fine-tuning
    clip_model(vocab_size=80).save_pretrained(source)
    load_tokenizer(checkpoints["export"]).save_pretrained(source)
    assert cli.main(["--ckpt", str(source), "--task", "sts", "--data", checkpoints["sts"], "--out", str(tmp_path / "a"),
                     "--no-progress", "--device", "cpu"]) == 0
    assert "spearman" in capsys.readouterr().out
    run = tmp_path / "run"
    shutil.copytree(checkpoints["export"], run / "final", dirs_exist_ok=True)
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in (
        {"step": 0, "eval/v/text_to_image/R@1": 0.1}, {"step": 5, "loss": 2.0, "logit_scale": 14.0},
        {"step": 10, "loss": 1.0, "logit_scale": 15.0}, {"step": 10, "eval/v/text_to_image/R@1": 0.4})))
    assert cli.main(["--ckpt", str(run), "--task", "sts", "--data", checkpoints["sts"], "--out", str(tmp_path / "b"),
                     "--no-progress", "--device", "cpu", "--name", "mine"]) == 0
    assert (tmp_path / "b" / "training_curves_mine.png").read_bytes()[:4] == b"\x89PNG"
