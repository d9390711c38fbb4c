"""Audio: decoding with PyAV, log-mel against librosa, per-frame windows and their augmentation."""

import wave

import av
import librosa
import numpy as np
import pytest

from abaw_jax.data import audio, video
from abaw_jax.data.affwild2 import DataError
from abaw_jax.errors import ConfigError


def write_wav(path, signal: np.ndarray, sample_rate: int) -> None:
    """A 16-bit mono .wav of a float signal in [-1, 1] (the `wave` module, as the synthetic tree
    and the real layout have them)."""
    pcm = np.round(np.clip(signal, -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(sample_rate)
        out.writeframes(pcm.tobytes())


def chirp_and_noise(seconds: float, sample_rate: int) -> np.ndarray:
    """A 100 Hz -> 6 kHz chirp in noise, with 0.3 s of digital silence in the middle."""
    t = np.arange(round(seconds * sample_rate)) / sample_rate
    rng = np.random.default_rng(0)
    x = 0.5 * np.sin(2 * np.pi * (100 * t + (6000 - 100) / (2 * seconds) * t ** 2))
    x += 0.05 * rng.standard_normal(len(t))
    gap = slice(len(t) // 2, len(t) // 2 + round(0.3 * sample_rate))
    x[gap] = 0.0
    return x


# ----------------------------------------------------------------------------------------------
# Log-mel


@pytest.mark.parametrize("params", [
    {},
    {"sample_rate": 22050, "stft_ms": 30, "hop_ms": 12.5, "n_mels": 40, "n_fft": 1024,
     "fmin": 50.0, "fmax": 7000.0},
])
def test_log_mel_matches_librosa(params):
    cfg = audio.AudioConfig(**params)
    signal = chirp_and_noise(3.0, cfg.sample_rate)
    power = librosa.feature.melspectrogram(
        y=signal, sr=cfg.sample_rate, n_fft=cfg.n_fft, hop_length=cfg.hop_samples,
        win_length=cfg.win_samples, window="hann", center=True, pad_mode="constant", power=2.0,
        n_mels=cfg.n_mels, fmin=cfg.fmin, fmax=cfg.fmax, htk=False, norm="slaney",
        dtype=np.float64)
    expected = 10 * np.log10(np.maximum(power, 1e-10)).T
    got = audio.log_mel(signal, cfg)
    assert got.dtype == np.float32 and got.shape == expected.shape
    assert got.shape == (1 + len(signal) // cfg.hop_samples, cfg.n_mels)
    # Every bin, the silent steps (at the -100 dB floor) included.
    assert np.mean(got == audio.SILENCE_DB) > 0.05
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-3)


# ----------------------------------------------------------------------------------------------
# Windows


def click_track(fps: int, num_frames: int, frames: list[int], sample_rate: int) -> np.ndarray:
    """Faint noise with a 1 ms click centred on each given frame's timestamp."""
    rng = np.random.default_rng(1)
    signal = 0.001 * rng.standard_normal(round(num_frames / fps * sample_rate))
    half = sample_rate // 2000
    for k in frames:
        at = round((k - 1) / fps * sample_rate)
        lo = max(at - half, 0)
        signal[lo:at + half] = 0.8 * rng.choice((-1, 1), at + half - lo)
    return signal


@pytest.mark.parametrize("fps", [25, 30])
@pytest.mark.parametrize("container,delay", [(".wav", 0.0), (".mp4", 0.0), (".mp4", 0.4)])
def test_a_click_at_frame_k_is_at_the_centre_of_its_window(tmp_path, fps, container, delay):
    cfg = audio.AudioConfig()
    num_frames = 4 * fps
    clicks = [1, num_frames // 2 + 3, num_frames]  # the start, the middle, the last frame
    path = tmp_path / f"v{container}"
    if container == ".wav":
        write_wav(path, click_track(fps, num_frames, clicks, 16000), 16000)
    else:  # 44.1 kHz AAC: decode resamples; `delay`: the track starts after the first frame
        shifted = [k - round(delay * fps) for k in clicks]
        signal = click_track(fps, num_frames, [k for k in shifted if k >= 1], 44100)
        video.write_video(path, fps, num_frames, audio=signal, sample_rate=44100,
                          audio_delay=delay)
        clicks = [k for k, s in zip(clicks, shifted, strict=True) if s >= 1]
    mel = audio.log_mel(audio.decode(path, cfg.sample_rate), cfg)
    half = cfg.window_steps // 2
    for k in clicks:
        window = audio.frame_window(mel, k, fps, cfg)
        assert window.shape == (cfg.window_steps, cfg.n_mels)
        assert np.argmax(window.mean(axis=1)) == half, (k, np.argsort(window.mean(axis=1))[-3:])
        centre = round((k - 1) / fps * 100)  # 10 ms hops
        before, after = max(half - centre, 0), max(centre + half + 1 - len(mel), 0)
        padded = np.all(window == audio.SILENCE_DB, axis=1)
        assert padded[:before].all() and not padded[before:len(window) - after].any()
        assert padded[len(window) - after:].all()


def test_frame_window_cuts_pads_and_copies():
    cfg = audio.AudioConfig(window_ms=50, n_mels=2)  # 5 steps of 10 ms
    mel = np.repeat(np.arange(30, dtype=np.float32)[:, None], 2, axis=1)  # step i holds i
    fps = 25  # frame k is at step 4 (k - 1)
    assert audio.frame_window(mel, 3, fps, cfg)[:, 0].tolist() == [6, 7, 8, 9, 10]
    assert audio.frame_window(mel, 1, fps, cfg)[:, 0].tolist() == [-100, -100, 0, 1, 2]
    assert audio.frame_window(mel, 8, fps, cfg)[:, 0].tolist() == [26, 27, 28, 29, -100]
    window = audio.frame_window(mel, 2, fps, cfg)
    window[:] = 0
    assert mel[2:7, 0].tolist() == [2, 3, 4, 5, 6]  # a copy, not a view of the table
    far = audio.frame_window(mel, 20, fps, cfg)  # step 76: past the end of 30 steps
    assert (far == audio.SILENCE_DB).all() and audio.past_end(len(mel), 20, fps, cfg)
    assert not audio.past_end(len(mel), 8, fps, cfg)  # step 28 of 30
    none = audio.frame_window(np.zeros((0, 2), np.float32), 1, fps, cfg)  # no audio track
    assert (none == audio.SILENCE_DB).all() and none.shape == (5, 2)
    strict = audio.AudioConfig(window_ms=50, n_mels=2, missing="error")
    assert audio.frame_window(mel, 8, fps, strict)[:, 0].tolist() == [26, 27, 28, 29, -100]
    with pytest.raises(audio.PastEndError, match="frame 9 at 0.320 s is past the end"):
        audio.frame_window(mel, 9, fps, strict)  # step 32
    with pytest.raises(audio.PastEndError):
        audio.frame_window(mel[:0], 1, fps, strict)


def test_frame_times_at_30_fps_round_to_the_nearest_step():
    cfg = audio.AudioConfig()
    # Frame 2 is at 33.3 ms (step 3), frame 3 at 66.7 ms (step 7), frame 31 at 1 s (step 100).
    assert [audio.centre_step(k, 30, cfg) for k in (1, 2, 3, 31)] == [0, 3, 7, 100]
    assert audio.frame_time(31, 30) == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------------
# Decoding


def test_decode_averages_the_channels_of_a_stereo_track(tmp_path):
    path = tmp_path / "stereo.mp4"
    t = np.arange(3 * 48000) / 48000
    tone = np.sin(2 * np.pi * 440 * t)
    video.write_video(path, 25, 75, audio=np.stack([0.6 * tone, 0.2 * tone]), sample_rate=48000)
    signal = audio.decode(path, 16000)
    assert signal.ndim == 1 and signal.dtype == np.float32
    assert len(signal) == pytest.approx(3 * 16000, abs=1024)  # AAC ends on a whole frame
    amplitude = np.sqrt(2) * np.std(signal[4000:-4000])
    assert amplitude == pytest.approx(0.4, rel=0.03)  # (0.6 + 0.2) / 2; FFmpeg's downmix: 0.57


@pytest.mark.parametrize("rate", [44100, 48000, 22050])
def test_resampling_keeps_a_tones_frequency(tmp_path, rate):
    path = tmp_path / "tone.wav"
    write_wav(path, 0.5 * np.sin(2 * np.pi * 1234.0 * np.arange(2 * rate) / rate), rate)
    signal = audio.decode(path, 16000)
    assert len(signal) == 2 * 16000
    spectrum = np.abs(np.fft.rfft(signal * np.hanning(len(signal))))
    assert np.argmax(spectrum) * 16000 / len(signal) == pytest.approx(1234.0, abs=0.5)


def test_decode_of_a_16k_wav_is_its_samples(tmp_path):
    path = tmp_path / "a.wav"
    signal = np.random.default_rng(2).uniform(-0.9, 0.9, 16000)
    write_wav(path, signal, 16000)
    pcm = np.round(signal * 32767)  # as written; FFmpeg reads 16-bit samples as pcm / 32768
    np.testing.assert_allclose(audio.decode(path, 16000), pcm / 32768, rtol=0, atol=1e-7)


def test_a_video_without_audio_is_a_no_audio_error(tmp_path):
    path = tmp_path / "silent.mp4"
    video.write_video(path, 25, 10)
    with pytest.raises(audio.NoAudioError, match=f"^{path}: no audio track$"):
        audio.decode(path, 16000)
    assert issubclass(audio.NoAudioError, DataError)


def test_corrupt_and_truncated_files_are_data_errors_naming_them(tmp_path):
    tone = 0.3 * np.sin(np.arange(4 * 16000) / 7)
    whole, streaming = tmp_path / "whole.mp4", tmp_path / "streaming.mp4"
    video.write_video(whole, 25, 100, audio=tone)
    video.write_video(streaming, 25, 100, audio=tone, faststart=True)
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(0).bytes(5000))
    with av.open(str(streaming)) as container:  # where a packet starts past the middle
        boundary = min(p.pos for p in container.demux() if p.size and p.pos >
                       streaming.stat().st_size // 2)
    cuts = {"whole": (whole, whole.stat().st_size // 2),
            "streaming": (streaming, streaming.stat().st_size // 2),
            "boundary": (streaming, boundary)}
    for name, (source, size) in cuts.items():
        (tmp_path / f"{name}_cut.mp4").write_bytes(source.read_bytes()[:size])
    # The index is at the end of `whole`: FFmpeg cannot open the first half. A cut in the middle
    # of a packet of `streaming` fails there.
    for path in (garbage, tmp_path / "whole_cut.mp4"):
        with pytest.raises(DataError, match=f"^{path}: cannot decode the audio"):
            audio.decode(path, 16000)
    path = tmp_path / "streaming_cut.mp4"  # whether the cut splits a packet depends on FFmpeg
    with pytest.raises(DataError, match=f"^{path}: (cannot decode the audio|truncated)"):
        audio.decode(path, 16000)
    # Cut between packets, FFmpeg decodes up to the cut without an error.
    path = tmp_path / "boundary_cut.mp4"
    with pytest.raises(DataError, match=f"^{path}: truncated: the audio track decodes to "
                                        r"1\.\d\d s of the 4\.00 s"):
        audio.decode(path, 16000)
    assert len(audio.decode(streaming, 16000)) >= 4 * 16000  # the whole file decodes


# ----------------------------------------------------------------------------------------------
# Config and augmentation


def test_audio_config():
    cfg = audio.AudioConfig.from_config(None)
    assert (cfg.window_steps, cfg.win_samples, cfg.hop_samples) == (101, 400, 160)
    assert cfg.key() == {"sample_rate": 16000, "stft_ms": 25.0, "hop_ms": 10.0, "n_mels": 64,
                         "n_fft": 512, "fmin": 0.0, "fmax": 8000.0}
    assert cfg.key() == audio.AudioConfig(fmax=8000).key()  # the same spectrogram
    assert audio.AudioConfig(window_ms=500, freq_masks=0).key() == cfg.key()  # not stored
    assert [audio.AudioConfig(window_ms=w).window_steps for w in (0, 10, 250, 260, 500)] == [
        1, 1, 25, 27, 51]
    assert audio.AudioConfig.from_config({"n_mels": 40}).n_mels == 40
    with pytest.raises(ConfigError, match=r"unknown data.audio keys \['mels'\]"):
        audio.AudioConfig.from_config({"mels": 40})
    for bad, match in [({"n_fft": 256}, "n_fft=256 is shorter than the 25.0 ms window"),
                       ({"missing": "zeros"}, "missing='zeros'"),
                       ({"fmax": 9000}, "fmax=9000"),
                       ({"hop_ms": 0.01}, "at least one sample"),
                       ({"time_masks": -1}, ">= 0")]:
        with pytest.raises(ConfigError, match=match):
            audio.AudioConfig.from_config(bad)


def test_spec_augment_masks_whole_bands_and_steps_within_the_limits():
    cfg = audio.AudioConfig(freq_masks=2, freq_mask_bands=8, time_masks=3, time_mask_steps=10)
    window = np.random.default_rng(3).uniform(-60, 0, (101, 64)).astype(np.float32)
    before = window.copy()
    masked_bands, masked_steps = [], []
    for seed in range(200):
        out = audio.spec_augment(window, np.random.default_rng(seed), cfg)
        assert out.dtype == np.float32 and out.shape == window.shape
        changed = out != window
        assert (out[changed] == audio.SILENCE_DB).all()
        bands, steps = changed.all(axis=0), changed.all(axis=1)
        assert (changed == (bands[None, :] | steps[:, None])).all()  # whole bands or steps only
        assert bands.sum() <= 2 * 8 and steps.sum() <= 3 * 10
        masked_bands.append(bands.sum())
        masked_steps.append(steps.sum())
    np.testing.assert_array_equal(window, before)  # the input is not touched
    assert np.mean(masked_bands) > 4 and np.mean(masked_steps) > 6  # ~8 and ~15 expected
    assert max(masked_bands) > 8 and max(masked_steps) > 10  # two masks add up
    off = audio.AudioConfig(freq_masks=0, time_masks=0)
    np.testing.assert_array_equal(audio.spec_augment(window, np.random.default_rng(0), off),
                                  window)
