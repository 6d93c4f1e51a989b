"""Opening audio held in memory (a tar member's bytes) as libsndfile opens the same file from a path.

libsndfile guesses a format from the first bytes; from a path it falls back to the file name's
extension. From bytes it has no name, so an MP3 whose first frame does not follow its ID3v2 tag
directly (a zeroed or damaged first frame, padding, an empty tag, several tags) is "Format not
recognised" from bytes although it decodes from its path. `open_audio` takes the member's
extension as that hint: for MPEG audio it retries from the first real frame (after the ID3v2 tags,
at a frame sync followed by consistent frames), which is where the decoder starts from the path.

Frame counts in headers (Xing/Info, ID3 gapless data, or an estimate from the bitrate) can differ
from what decodes; `read_frames` stops at what the decoder really yields. libsndfile never decodes
past its count, so an MP3 whose count is an estimate that falls short (VBR without a Xing header)
comes out cut; such a stream (its frames, walked here, hold more than the count and the gapless
trim together) is decoded by miniaudio (dr_mp3) instead, in memory, whole.

FLAC is lossless, so any correct decoder yields the same integers; miniaudio's dr_flac decodes
them about twice as fast as libsndfile (libFLAC through libsndfile's buffers) and seeks to a
sample too. `FlacReader` uses it for 8-24-bit FLAC with a known length and scales the integers
to float as libsndfile does (by 2^-(bits-1), exact in float32): the same floats. A read that
stops short of the header's count (a truncated or damaged stream: the two decoders treat damaged
frames differently) is redone by libsndfile from the same position, so such files decode as
from their path too.
"""
from __future__ import annotations

import io

import numpy as np
import soundfile

MPEG_EXTENSIONS = ("mp3", "mp2", "mp1", "mpga")

# MPEG audio frame header tables: bit rates in kbit/s by (version is MPEG-1, layer) and sample rates by version.
_BITRATES = {
    (True, 1): (0, 32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 352, 384, 416, 448),
    (True, 2): (0, 32, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384),
    (True, 3): (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
    (False, 1): (0, 32, 48, 56, 64, 80, 96, 112, 128, 144, 160, 176, 192, 224, 256),
    (False, 2): (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
    (False, 3): (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
}
_SAMPLE_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}  # by version bits
_FRAMES_CONFIRMING = 3  # consistent frames in a row that make a sync real (a chain may end at the data's end)
_FLAC_CHECKED_SAMPLES = 64  # samples at the end of each dr_flac read compared with libsndfile's
_GAPLESS_FRAMES = 4  # encoder delay + padding that gapless decoding trims stay under 4 frames


def mpeg_frame(data: bytes, offset: int) -> tuple[int, tuple[int, int, int]] | None:
    """(length in bytes, (version, layer, sample rate)) of the MPEG audio frame whose header
    starts at `offset`, or None when no valid header is there (free-format frames included)."""
    if offset + 4 > len(data) or data[offset] != 0xFF or data[offset + 1] & 0xE0 != 0xE0:
        return None
    b1, b2 = data[offset + 1], data[offset + 2]
    version, layer_bits = (b1 >> 3) & 3, (b1 >> 1) & 3
    bitrate_index, rate_index, padding = b2 >> 4, (b2 >> 2) & 3, (b2 >> 1) & 1
    if version == 1 or layer_bits == 0 or bitrate_index in (0, 15) or rate_index == 3 or data[offset + 3] & 3 == 2:
        return None
    layer = 4 - layer_bits
    bitrate = _BITRATES[(version == 3, layer)][bitrate_index] * 1000
    rate = _SAMPLE_RATES[version][rate_index]
    if layer == 1:
        length = (12 * bitrate // rate + padding) * 4
    else:
        per_slot = 72 if layer == 3 and version != 3 else 144  # Layer III of MPEG-2/2.5 has half the samples
        length = per_slot * bitrate // rate + padding
    return length, (version, layer, rate)


def samples_per_frame(version: int, layer: int) -> int:
    return 384 if layer == 1 else 576 if layer == 3 and version != 3 else 1152


def mpeg_stream_frames(data: bytes, start: int) -> tuple[int, int]:
    """(frames of audio, samples per frame) in the chain of consistent MPEG frames from `start`."""
    length, kind = mpeg_frame(data, start)
    count, position = 0, start
    while True:
        count += 1
        position += length
        frame = mpeg_frame(data, position)
        if frame is None or frame[1] != kind:
            return count * samples_per_frame(*kind[:2]), samples_per_frame(*kind[:2])
        length = frame[0]


def skip_id3v2(data: bytes, offset: int = 0) -> int:
    """The offset after any ID3v2 tags at `offset` (several may follow each other)."""
    while data[offset:offset + 3] == b"ID3" and offset + 10 <= len(data):
        size_bytes = data[offset + 6:offset + 10]
        if any(b & 0x80 for b in size_bytes):  # not a synchsafe integer: not a tag
            break
        size = (size_bytes[0] << 21) | (size_bytes[1] << 14) | (size_bytes[2] << 7) | size_bytes[3]
        footer = 10 if data[offset + 5] & 0x10 else 0
        offset += 10 + size + footer
    return offset


def first_mpeg_frame(data: bytes) -> int | None:
    """Offset of the first MPEG audio frame: after the ID3v2 tags, the first sync whose frame is
    followed by consistent frames (same version, layer and rate), or None."""
    offset = skip_id3v2(data)
    while True:
        offset = data.find(b"\xff", offset)
        if offset < 0:
            return None
        frame = mpeg_frame(data, offset)
        if frame is not None:
            length, kind = frame
            position, confirmed = offset + length, 1
            while confirmed < _FRAMES_CONFIRMING and position < len(data):
                following = mpeg_frame(data, position)
                if following is None or following[1] != kind:
                    break
                position += following[0]
                confirmed += 1
            if confirmed == _FRAMES_CONFIRMING or position >= len(data):
                return offset
        offset += 1


class FlacReader:
    """A FLAC stream decoded by dr_flac, read through the part of SoundFile's interface used here."""

    format = "FLAC"

    def __init__(self, data: bytes, handle, lib, ffi):
        self._data, self._handle, self._lib, self._ffi = data, handle, lib, ffi  # dr_flac reads `data` in place
        self.samplerate = handle.sampleRate
        self.channels = handle.channels
        self.frames = handle.totalPCMFrameCount
        # dr_flac's int32 samples are left-aligned (sample << (32 - bits)): 2^-31 gives libsndfile's sample / 2^(bits-1).
        self._scale = np.float32(2.0 ** -31)
        self._position = 0
        self._fallback: soundfile.SoundFile | None = None

    def seek(self, frame: int) -> int:
        if self._fallback is not None:
            self._position = self._fallback.seek(frame)
        elif 0 <= frame <= self.frames and self._lib.ma_dr_flac_seek_to_pcm_frame(self._handle, frame):
            self._position = frame
        else:
            self._switch_to_libsndfile()
            self._position = self._fallback.seek(frame)
        return self._position

    def tell(self) -> int:
        return self._position

    def buffer_read_into(self, out: np.ndarray, dtype: str) -> int:
        if self._fallback is not None:
            got = self._fallback.buffer_read_into(out, dtype)
            self._position += got
            return got
        want = min(out.shape[0], self.frames - self._position)
        ints = np.empty((out.shape[0], self.channels), dtype=np.int32)
        got = self._lib.ma_dr_flac_read_pcm_frames_s32(self._handle, want, self._ffi.from_buffer("int[]", ints))
        past_count = want < out.shape[0] and self._lib.ma_dr_flac_read_pcm_frames_s32(
            self._handle, 1, self._ffi.from_buffer("int[]", np.empty(self.channels, dtype=np.int32)))
        # Short of the header's count, more than it holds, or shifted by a damaged frame: libsndfile decides.
        if got < want or past_count or not self._ends_where_expected(ints[:got], self._position + got):
            start = self._position
            self._switch_to_libsndfile()
            self._fallback.seek(start)
            return self.buffer_read_into(out, dtype)
        np.multiply(ints[:got], self._scale, out=out[:got], dtype=np.float32)  # int -> float32 exact up to 24 bits
        self._position += got
        return got

    def _ends_where_expected(self, ints: np.ndarray, end: int) -> bool:
        """Whether the last samples read are libsndfile's samples at `end`. dr_flac skips a frame
        that fails its CRC and goes on, which shifts what follows (and its own seeks skip the same
        way); libsndfile seeks by the frames' sample numbers and stops with an error on a damaged
        frame. Comparing the tail costs one frame's decoding."""
        tail = min(len(ints), _FLAC_CHECKED_SAMPLES)
        if tail == 0:
            return True
        check = np.empty((tail, self.channels), dtype=np.int32)
        try:
            with soundfile.SoundFile(io.BytesIO(self._data)) as f:
                f.seek(end - tail)
                got = f.buffer_read_into(check, "int32")  # libsndfile's int32 is left-aligned, as dr_flac's
        except soundfile.LibsndfileError:
            return False
        return got == tail and np.array_equal(check, ints[-tail:])

    def _switch_to_libsndfile(self) -> None:
        self._fallback = soundfile.SoundFile(io.BytesIO(self._data))
        self._release()

    def _release(self) -> None:
        if self._handle is not None:
            self._lib.ma_dr_flac_close(self._handle)
            self._handle = None

    def close(self) -> None:
        self._release()
        if self._fallback is not None:
            self._fallback.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _open_flac(data: bytes) -> FlacReader | None:
    """dr_flac's reader for plain FLAC it decodes as libsndfile does, else None."""
    import miniaudio

    lib, ffi = miniaudio.lib, miniaudio.ffi
    handle = lib.ma_dr_flac_open_memory(ffi.from_buffer(data), len(data), ffi.NULL)
    if handle == ffi.NULL:
        return None
    if not 8 <= handle.bitsPerSample <= 24 or handle.totalPCMFrameCount == 0 or handle.channels == 0:
        lib.ma_dr_flac_close(handle)  # 32-bit samples are not exact in float32; unknown lengths: libsndfile
        return None
    return FlacReader(data, handle, lib, ffi)


class DecodedAudio:
    """A clip decoded whole into memory, read through the part of SoundFile's interface used here."""

    def __init__(self, wave: np.ndarray, samplerate: int):
        self.wave = wave
        self.samplerate = samplerate
        self.frames, self.channels = wave.shape
        self._position = 0

    def seek(self, frame: int) -> int:
        self._position = min(max(frame, 0), self.frames)
        return self._position

    def tell(self) -> int:
        return self._position

    def buffer_read_into(self, out: np.ndarray, dtype: str) -> int:
        got = min(out.shape[0], self.frames - self._position)
        out[:got] = self.wave[self._position:self._position + got]
        self._position += got
        return got

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_audio(data: bytes, ext: str | None = None) -> soundfile.SoundFile | DecodedAudio | FlacReader:
    """The audio in `data`, positioned at its first frame; `ext` (the member's extension, e.g. 'mp3')
    is the format hint libsndfile takes from a file name. Raises soundfile's error when the data is
    not audio."""
    if data[:4] == b"fLaC":
        reader = _open_flac(data)
        if reader is not None:
            return reader
    start = 0
    try:
        f = soundfile.SoundFile(io.BytesIO(data))
    except soundfile.LibsndfileError:
        if ext not in MPEG_EXTENSIONS and data[:3] != b"ID3":
            raise
        start = first_mpeg_frame(data)
        if not start:  # no frame, or one at 0 that libsndfile has already refused
            raise
        f = soundfile.SoundFile(io.BytesIO(data[start:]))
    if f.format != "MP3":  # soundfile names libsndfile's MPEG container (layers I-III) so
        return f
    if not start:
        start = first_mpeg_frame(data)
    if start is not None:
        walked, per_frame = mpeg_stream_frames(data, start)
        if f.frames < walked - _GAPLESS_FRAMES * per_frame:  # libsndfile would stop early
            f.close()
            return _decode_mpeg_whole(data[start:])
    return f


def _decode_mpeg_whole(data: bytes) -> DecodedAudio:
    import miniaudio  # the second decoder, only for what libsndfile would cut

    decoded = miniaudio.mp3_read_f32(data)
    wave = np.frombuffer(decoded.samples, dtype=np.float32).reshape(-1, decoded.nchannels)
    return DecodedAudio(wave, decoded.sample_rate)


def read_frames(f: soundfile.SoundFile | DecodedAudio, frames: int | None = None) -> np.ndarray:
    """float32 [frames read, channels] from the current position: `frames` of them, or all that
    decode when None (not the header's count, which may be more or less than the decoder yields)."""
    if frames is not None:
        out = np.empty((frames, f.channels), dtype=np.float32)
        return out[: f.buffer_read_into(out, "float32")]
    blocks = []
    block = max(f.frames - f.tell(), 0) + 1  # one read normally; a header that undercounts needs more
    while True:
        out = np.empty((block, f.channels), dtype=np.float32)
        got = f.buffer_read_into(out, "float32")
        blocks.append(out[:got])
        if got < block:
            break
        block = 1 << 16
    return blocks[0] if len(blocks) == 1 else np.concatenate(blocks)


def decode_audio(data: bytes, ext: str | None = None) -> tuple[np.ndarray, int]:
    """Every frame of the audio in `data`: (float32 [frames, channels], sample rate)."""
    with open_audio(data, ext) as f:
        return read_frames(f), f.samplerate
