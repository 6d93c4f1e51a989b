"""Audio from bytes decodes as from its path: MPEG frame sync, ID3v2 tags, real frame counts."""
import io

import numpy as np
import pytest
import soundfile

from tests.data_fixtures import audio_bytes
from xfast.config import parse
from xfast.data.audio import AudioTransform
from xfast.data.audio_io import decode_audio, first_mpeg_frame, mpeg_frame, open_audio, skip_id3v2
from xfast.data.config import AudioConfig
from xfast.data.skips import SampleSkipped


def id3v2(payload: bytes = b"", footer: bool = False) -> bytes:
    """An ID3v2.4 tag holding `payload` (synchsafe size; the footer repeats the header as '3DI')."""
    size = len(payload)
    synchsafe = bytes([(size >> 21) & 0x7F, (size >> 14) & 0x7F, (size >> 7) & 0x7F, size & 0x7F])
    flags = 0x10 if footer else 0
    header = b"ID3\x04\x00" + bytes([flags]) + synchsafe
    return header + payload + (b"3DI\x04\x00" + bytes([flags]) + synchsafe if footer else b"")


def from_path(data: bytes, tmp_path, name: str = "clip.mp3") -> tuple[np.ndarray, int]:
    path = tmp_path / name
    path.write_bytes(data)
    return soundfile.read(str(path), dtype="float32", always_2d=True)


def test_mpeg_frame_header_lengths():
    # MPEG-1 Layer III, 128 kbit/s, 44.1 kHz, no padding: 144 * 128000 / 44100 = 417 bytes.
    assert mpeg_frame(b"\xff\xfb\x90\x00", 0) == (417, (3, 3, 44100))
    assert mpeg_frame(b"\xff\xfb\x92\x00", 0) == (418, (3, 3, 44100))  # padding bit
    # MPEG-2 Layer III, 64 kbit/s, 24 kHz: 72 * 64000 / 24000 = 192 bytes.
    assert mpeg_frame(b"\xff\xf3\x84\x00", 0) == (192, (2, 3, 24000))
    # MPEG-1 Layer I, 384 kbit/s, 48 kHz: (12 * 384000 / 48000) * 4 = 384 bytes.
    assert mpeg_frame(b"\xff\xff\xc4\x00", 0) == (384, (3, 1, 48000))
    for bad in (b"\xff\xfb\x00\x00",  # free-format bitrate
                b"\xff\xfb\xf0\x00",  # bitrate index 15
                b"\xff\xfb\x9c\x00",  # sample rate index 3
                b"\xff\xeb\x90\x00",  # version bits 01 (reserved)
                b"\xff\xf9\x90\x00",  # layer bits 00 (reserved)
                b"\xff\xfb\x90\x02",  # emphasis 10 (reserved)
                b"\xfe\xfb\x90\x00", b"\xff\xfb\x90"):
        assert mpeg_frame(bad, 0) is None, bad


def test_id3v2_tags_are_skipped_with_footers_and_in_series():
    assert skip_id3v2(b"\xff\xfb") == 0
    assert skip_id3v2(id3v2()) == 10
    assert skip_id3v2(id3v2(b"x" * 300)) == 310
    tags = id3v2(b"a" * 5, footer=True) + id3v2(b"b" * 7)
    assert skip_id3v2(tags + b"\xff\xfb") == 10 + 5 + 10 + 10 + 7
    assert skip_id3v2(b"ID3\x04\x00\x00\x80\x00\x00\x00") == 0  # size byte with its top bit set: not a tag


def test_first_frame_needs_a_chain_of_consistent_frames():
    frame = b"\xff\xfb\x90\x00" + b"\x00" * 413  # 417 bytes, MPEG-1 Layer III 44.1 kHz
    other_rate = b"\xff\xfb\x94\x00" + b"\x00" * 379  # 48 kHz: 144 * 128000 / 48000 = 384 bytes
    assert first_mpeg_frame(frame * 3) == 0
    assert first_mpeg_frame(id3v2(b"t" * 20) + b"\x00" * 50 + frame * 4) == 30 + 50
    # A lone sync (or one followed by a frame of another rate) inside junk is not the first frame.
    junk = b"\x00\xff\xfb\x90\x00" + b"\x11" * 40
    assert first_mpeg_frame(junk + frame * 3) == len(junk)
    assert first_mpeg_frame(frame + other_rate + frame * 3) == len(frame) + len(other_rate)
    assert first_mpeg_frame(b"\x00" * 5 + frame) == 5  # the chain may end with the data
    assert first_mpeg_frame(b"ID3 but no audio" + b"\xff" * 10) is None


@pytest.fixture(scope="module")
def mp3() -> bytes:
    data = audio_bytes(1.0, 48000, "MP3", channels=2, seed=3)
    assert mpeg_frame(data, 0) is not None  # libsndfile writes a frame (the Xing/Info one) first
    return data


@pytest.mark.parametrize("make", [
    # An empty ID3v2 tag, padding, then the first frame (as in real files with an empty tag).
    lambda d: id3v2() + b"\x00" * 33 + d,
    # Several tags, padding and false syncs before the first frame.
    lambda d: id3v2(b"TIT2" + b"\x00" * 60, footer=True) + id3v2(b"x" * 9) + b"\x00\xff\xfb\x00" * 8 + d,
    # Junk before the first frame without any tag.
    lambda d: b"\x00" * 100 + d,
])
def test_mp3_that_plain_libsndfile_refuses_from_bytes_decodes_as_from_its_path(make, mp3, tmp_path):
    data = make(mp3)
    with pytest.raises(soundfile.LibsndfileError, match="Format not recognised"):
        soundfile.SoundFile(io.BytesIO(data))
    ref, rate = from_path(data, tmp_path)
    assert ref.shape[0] == 48000  # the Xing frame's count and gapless trim are honoured
    wave, got_rate = decode_audio(data, "mp3")
    assert got_rate == rate and wave.dtype == np.float32
    np.testing.assert_array_equal(wave, ref)
    if data[:3] == b"ID3":  # a leading tag is hint enough; junk needs the extension
        np.testing.assert_array_equal(decode_audio(data, None)[0], ref)


# Two MPEG audio decoders that meet ISO/IEC 11172-4's full accuracy each stay within 2**-14 of the
# exact output, so within 2 * 2**-14 of each other.
DECODERS_AGREE = 2 * 2.0 ** -14


def test_mp3_whose_length_libsndfile_underestimates_decodes_whole(mp3, tmp_path):
    """An empty tag, then a VBR stream whose Xing frame header is zeroed (seen in real files):
    libsndfile estimates the length from the first frame's bitrate and stops there, from its path
    too. Every frame decodes here (through the second decoder), no gapless trim being known."""
    data = id3v2() + b"\x00" * 4 + mp3[4:]
    frames = 0
    position = first_mpeg_frame(data)
    while (frame := mpeg_frame(data, position)) is not None:
        frames, position = frames + 1, position + frame[0]
    cut, _ = from_path(data, tmp_path)
    assert cut.shape[0] < frames * 1152 * 0.6  # libsndfile loses ~half of it
    wave, rate = decode_audio(data, "mp3")
    assert rate == 48000 and wave.shape == (frames * 1152, 2)
    np.testing.assert_allclose(wave[: cut.shape[0]], cut, rtol=0, atol=DECODERS_AGREE)
    # Training crops see the whole clip: from near its end too.
    cfg = parse(AudioConfig, {"sample_rate": 48000, "duration_s": 0.1, "n_fft": 256, "hop_length": 128,
                              "n_mels": 16, "fmin": 0.0, "fmax": 24000.0}, "audio")
    mono = wave.mean(axis=1)
    starts = [window_start(mono, AudioTransform(cfg, train=True)(data, np.random.default_rng(seed), "mp3"))
              for seed in range(20)]
    assert min(starts) >= 0 and max(starts) > cut.shape[0]


def test_non_mpeg_data_keeps_its_error():
    for data, ext in ((b"not audio" * 50, "mp3"), (b"not audio" * 50, "flac"), (id3v2(b"x" * 10), "mp3")):
        with pytest.raises(soundfile.LibsndfileError):
            open_audio(data, ext)
    with pytest.raises(SampleSkipped, match="corrupt_audio"):
        AudioTransform(parse(AudioConfig, {}, "audio"), train=False)(id3v2() + b"\x00" * 400, None, "mp3")


def header_overcounting_mp3(mp3: bytes, cut_frames: int) -> bytes:
    """The MP3 without its last frames: its Xing/Info header still counts them."""
    offsets, position = [], 0
    while position < len(mp3) and (frame := mpeg_frame(mp3, position)) is not None:
        offsets.append(position)
        position += frame[0]
    return mp3[:offsets[-cut_frames]]


def test_reads_stop_at_what_decodes_not_at_the_header_count(mp3, tmp_path):
    data = header_overcounting_mp3(mp3, 8)
    with open_audio(data, "mp3") as f:
        header_frames = f.frames
    ref, rate = from_path(data, tmp_path)
    assert header_frames > ref.shape[0] + 5000  # 8 frames of 1152 samples are missing
    wave, _ = decode_audio(data, "mp3")
    np.testing.assert_array_equal(wave, ref)
    # Training crops of a length the header has room for but the audio hardly has: every crop is a
    # window of the real audio (never past its end, so never padded).
    num_samples = ref.shape[0] - 40  # source frames needed: num_samples + 1
    cfg = parse(AudioConfig, {"sample_rate": rate, "duration_s": num_samples / rate, "n_fft": 256,
                              "hop_length": 128, "n_mels": 16, "fmin": 0.0, "fmax": rate / 2}, "audio")
    assert cfg.num_samples == num_samples
    mono = ref.mean(axis=1)
    starts = set()
    for seed in range(12):
        crop = AudioTransform(cfg, train=True)(data, np.random.default_rng(seed), "mp3")
        start = window_start(mono, crop)
        assert 0 <= start <= 39, f"seed {seed}: crop is not a window of the decoded audio"
        starts.add(start)
    assert len(starts) > 3  # still random


def window_start(full: np.ndarray, crop: np.ndarray, atol: float = 1e-6) -> int:
    """Where `crop` sits in `full` (up to decoder rounding after a seek), -1 when nowhere."""
    for start in np.flatnonzero(np.abs(full[: full.shape[0] - crop.shape[0] + 1] - crop[0]) <= atol):
        if np.abs(full[start:start + crop.shape[0]] - crop).max() <= atol:
            return int(start)
    return -1


def test_window_start_finds_only_real_windows():
    full = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    assert window_start(full, full[123:800]) == 123
    assert window_start(full, np.concatenate([full[900:], np.zeros(50, np.float32)])) == -1


def test_opus_decodes():
    rate = 48000
    t = np.arange(rate // 2) / rate
    wave = (0.4 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    out = io.BytesIO()
    soundfile.write(out, wave, rate, format="OGG", subtype="OPUS")
    decoded, got_rate = decode_audio(out.getvalue(), "opus")
    assert got_rate == rate and abs(decoded.shape[0] - wave.shape[0]) < 1000
    assert np.corrcoef(decoded[5000:20000, 0], wave[5000:20000])[0, 1] > 0.99


def _flac(subtype: str, channels: int, frames: int = 60000, seed: int = 0) -> tuple[bytes, np.ndarray]:
    """A FLAC of noise with the full range of its sample width (and both extremes)."""
    wave = np.random.default_rng(seed).uniform(-1, 1, size=(frames, channels)).astype(np.float32)
    wave[:2] = [[-1.0] * channels, [1.0 - 2.0 ** -23] * channels]
    out = io.BytesIO()
    soundfile.write(out, wave, 44100, format="FLAC", subtype=subtype)
    return out.getvalue(), wave


def _path_window(path, start: int | None, frames: int) -> np.ndarray:
    with soundfile.SoundFile(str(path)) as f:
        if start is not None:
            f.seek(start)
        return f.read(frames, dtype="float32", always_2d=True)


@pytest.mark.parametrize("subtype,channels", [("PCM_S8", 1), ("PCM_16", 1), ("PCM_16", 2), ("PCM_24", 2)])
def test_flac_from_bytes_is_libsndfiles_decoding_from_the_path(subtype, channels, tmp_path):
    from xfast.data.audio_io import FlacReader, read_frames

    data, _ = _flac(subtype, channels)
    path = tmp_path / "clip.flac"
    path.write_bytes(data)
    with open_audio(data, "flac") as f:
        assert isinstance(f, FlacReader)  # dr_flac decodes it (else this compares libsndfile with itself)
        assert (f.samplerate, f.channels, f.frames) == (44100, channels, 60000)
        for start, frames in ((0, 5000), (12345, 30000), (59000, 5000), (7, 1)):
            f.seek(start)
            window = read_frames(f, frames)
            np.testing.assert_array_equal(window, _path_window(path, start, frames))
            assert f.tell() == start + window.shape[0]
        f.seek(40000)
        np.testing.assert_array_equal(read_frames(f), _path_window(path, 40000, -1))  # to the end
        assert f._fallback is None  # every read above was dr_flac's
    np.testing.assert_array_equal(decode_audio(data, "flac")[0], from_path(data, tmp_path, "clip.flac")[0])


def test_damaged_or_cut_flac_fails_as_libsndfile_does(tmp_path):
    """dr_flac would skip a frame whose CRC fails and shift what follows; such reads go to
    libsndfile, which stops with its error (the sample is then skipped as corrupt)."""
    data, _ = _flac("PCM_16", 1, frames=200000)
    for at in (0.3, 0.5, 0.7):
        damaged = bytearray(data)
        k = int(len(data) * at)
        damaged[k] ^= 0xFF  # one byte inside a frame: its CRC fails
        damaged = bytes(damaged)
        with pytest.raises(soundfile.LibsndfileError):
            _path_window_bytes(damaged, 20000, 150000)  # the window holds the damage
        with pytest.raises(soundfile.LibsndfileError):
            decode_audio(damaged, "flac")
        with pytest.raises(soundfile.LibsndfileError):
            _path_window(_write(tmp_path, damaged), 20000, 150000)  # as from the path
    with pytest.raises(soundfile.LibsndfileError):
        decode_audio(data[: len(data) * 2 // 3], "flac")
    with pytest.raises(SampleSkipped, match="corrupt_audio"):
        AudioTransform(parse(AudioConfig, {}, "audio"), train=False)(data[: len(data) // 2], None, "flac")


def _path_window_bytes(data: bytes, start: int, frames: int) -> np.ndarray:
    from xfast.data.audio_io import read_frames

    with open_audio(data, "flac") as f:
        f.seek(start)
        return read_frames(f, frames)


def _write(tmp_path, data: bytes):
    path = tmp_path / "damaged.flac"
    path.write_bytes(data)
    return path
