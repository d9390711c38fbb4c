"""The audio side table of a records folder: each raw video's log-mel spectrogram, computed once
at prepare time and read by (video, frame) in the pipeline's workers.

  <records>/audio/index.json    the parameters (`AudioConfig.key()`), per raw video its status,
                                fps, length, shard, offset and CRC32C, and the counts by reason
  <records>/audio/mel-NNNNN.npy float16 (steps, n_mels): the spectrograms of several videos, one
                                after the other in time

A raw video's spectrogram is stored once, not copied per frame: a frame's window
(`audio.frame_window`) is cut when the frame is read, from a memory-mapped shard, so any window
length or augmentation needs no new preparation. `_left`/`_right` videos share their raw video's
entry. A video's block is checked against its CRC the first time a process reads it.

No jax here: the pipeline's worker processes read it.
"""

from __future__ import annotations

import dataclasses
import json
import wave
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from abaw_jax.data import audio, records, video
from abaw_jax.data.affwild2 import DataError

DIR = "audio"
INDEX_FILE = "index.json"
_SHARD_BYTES = 256 << 20  # about 9 hours of 64-band float16 spectrogram a shard
# Why a raw video has no spectrogram (its frames then get silence, or with `missing="error"`
# preparation stops naming the first).
REASONS = ("no_video", "no_audio", "unreadable")


@dataclasses.dataclass(frozen=True)
class Source:
    """Where one raw video's audio is: the `.wav` beside the video when there is one, else the
    video's own track. `fps` (and the track's sample rate) from the video or video_info.csv;
    without fps no frame has a timestamp."""

    video: str | None = None
    wav: str | None = None
    fps: float | None = None
    track_rate: int | None = None


def _wav_rate(path: str) -> int | None:
    try:
        with wave.open(path) as w:
            return w.getframerate()
    except (wave.Error, EOFError, OSError):
        return None  # not 16-bit PCM: PyAV decodes it; no rate to compare


def _compute(job: tuple[str, Source, audio.AudioConfig]) -> tuple[str, dict, np.ndarray | None]:
    """Worker: (raw video, entry, float16 spectrogram or None)."""
    raw, src, cfg = job
    return raw, *spectrogram(src, cfg)


def spectrogram(src: Source, cfg: audio.AudioConfig) -> tuple[dict, np.ndarray | None]:
    """One raw video's entry and float16 (steps, n_mels) log-mel as the table stores it; None
    and the entry's `status` (`explain`) where it has none."""
    entry: dict[str, Any] = {"fps": src.fps}
    if src.fps is None:
        return {**entry, "status": "no_video"}, None
    path = src.wav or src.video
    if path is None:
        return {**entry, "status": "no_audio"}, None
    if src.wav and src.track_rate:
        rate = _wav_rate(src.wav)
        if rate and rate != src.track_rate:  # counted; the .wav is what is read
            entry["sample_rate_mismatch"] = [rate, src.track_rate]
    try:
        signal = audio.decode(Path(path), cfg.sample_rate)
    except audio.NoAudioError:
        return {**entry, "status": "no_audio"}, None
    except DataError as e:
        return {**entry, "status": "unreadable", "why": str(e)}, None
    mel = audio.log_mel(signal, cfg).astype(np.float16)
    return {**entry, "status": "ok", "source": "wav" if src.wav else "video",
            "seconds": len(signal) / cfg.sample_rate, "steps": len(mel)}, mel


def write(out: str | Path, sources: Mapping[str, Source], cfg: audio.AudioConfig, pool=None,
          progress: bool = True) -> dict[str, Any]:
    """Computes and stores the spectrogram of every raw video of `sources` (in `pool`'s
    processes if given); returns the counts by reason (also in the index)."""
    from tqdm import tqdm

    folder = Path(out) / DIR
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("mel-*.npy"):
        old.unlink()
    jobs = [(raw, sources[raw], cfg) for raw in sorted(sources)]
    results = pool.imap(_compute, jobs) if pool else map(_compute, jobs)
    entries, shard, blocks, size = {}, 0, [], 0
    for raw, entry, mel in tqdm(results, total=len(jobs), desc="audio", unit="video",
                                disable=not progress):
        if entry["status"] != "ok" and cfg.missing == "error":
            raise DataError(f"{raw}: {explain(entry)} (data.audio.missing=error; "
                            "`silence` gives its frames silence)")
        if mel is not None:
            entry.update(shard=shard, start=size, crc=records.array_crc(mel))
            blocks.append(mel)
            size += len(mel)
            if size * mel.shape[1] * 2 >= _SHARD_BYTES:
                _save(folder, shard, blocks)
                shard, blocks, size = shard + 1, [], 0
        entries[raw] = entry
    if blocks:
        _save(folder, shard, blocks)
    counts = _counts(entries)
    index = {"config": cfg.key(), "videos": entries, "counts": counts}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=1))
    return counts


def explain(entry: dict) -> str:
    """Why an entry has no spectrogram (its `status`), in words."""
    return {"no_video": "no raw video (no fps, so no frame timestamps)",
            "no_audio": "no audio track and no .wav beside the video",
            "unreadable": entry.get("why", "unreadable")}[entry["status"]]


def _save(folder: Path, shard: int, blocks: list[np.ndarray]) -> None:
    np.save(folder / f"mel-{shard:05d}.npy", np.concatenate(blocks))


def _counts(entries: Mapping[str, dict]) -> dict[str, Any]:
    counts: dict[str, Any] = {"videos": len(entries), "ok": 0, **dict.fromkeys(REASONS, 0),
                              "sample_rate_mismatch": 0, "seconds": 0.0, "first": {}}
    for raw, e in entries.items():
        counts[e["status"]] += 1
        counts["seconds"] += e.get("seconds", 0.0)
        if e["status"] != "ok":
            counts["first"].setdefault(e["status"], raw)
        if "sample_rate_mismatch" in e:
            counts["sample_rate_mismatch"] += 1
            counts["first"].setdefault("sample_rate_mismatch", raw)
    counts["seconds"] = round(counts["seconds"], 2)
    return counts


def frames_past_end(data_dir: str | Path, videos: list[str], video_index: np.ndarray,
                    frame: np.ndarray) -> tuple[int, str | None]:
    """(frames whose centre step lies past their video's audio (`audio.past_end`), the first
    as `video/frame`)."""
    index = read_index(data_dir)
    entries, cfg = index["videos"], audio.AudioConfig(**index["config"])
    past, first = 0, None
    for v, name in enumerate(videos):
        e = entries.get(video.raw_name(name))
        if not e or e["status"] != "ok":
            continue
        late = [f for f in frame[video_index == v]
                if audio.past_end(e["steps"], int(f), e["fps"], cfg)]
        past += len(late)
        if len(late) and first is None:
            first = f"{name}/{int(late[0]):05d}"
    return past, first


def read_index(data_dir: str | Path) -> dict:
    path = Path(data_dir) / DIR / INDEX_FILE
    if not path.is_file():
        raise DataError(f"{Path(data_dir)}: no audio table ({DIR}/{INDEX_FILE}): these records "
                        "were prepared without audio (no raw videos found?); the model takes "
                        "an `audio` input")
    return json.loads(path.read_text())


class AudioTable:
    """A frame's log-mel window by (video, frame), from a records folder's side table."""

    def __init__(self, data_dir: str | Path, cfg: audio.AudioConfig):
        index = read_index(data_dir)
        if index["config"] != cfg.key():
            raise DataError(f"{Path(data_dir) / DIR}: prepared with audio parameters "
                            f"{index['config']}, the config asks for {cfg.key()}: prepare the "
                            "records again (the data cache does when data.audio changes)")
        self.folder, self.cfg, self.entries = Path(data_dir) / DIR, cfg, index["videos"]
        self.silence = audio.silence(cfg)
        self._shards: dict[int, np.ndarray] = {}
        self._checked: set[str] = set()

    def __getstate__(self) -> dict:  # to grain's workers: no memory maps
        return {**self.__dict__, "_shards": {}, "_checked": set()}

    def spectrogram(self, raw: str) -> np.ndarray | None:
        """The raw video's (steps, n_mels) float16 spectrogram, CRC-checked on first read."""
        e = self.entries.get(raw)
        if not e or e["status"] != "ok":
            return None
        if e["shard"] not in self._shards:
            path = self.folder / f"mel-{e['shard']:05d}.npy"
            try:
                self._shards[e["shard"]] = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as err:
                raise DataError(f"{path}: unreadable audio shard ({err})") from None
        block = self._shards[e["shard"]][e["start"]: e["start"] + e["steps"]]
        if raw not in self._checked:
            if len(block) != e["steps"] or records.array_crc(block) != e["crc"]:
                raise DataError(f"{self.folder}: the spectrogram of {raw} fails its CRC check "
                                "(corrupt audio shard); prepare the records again")
            self._checked.add(raw)
        return block

    def window(self, name: str, frame: int) -> np.ndarray:
        """(window_steps, n_mels) float32 around frame `frame` (1-based) of video `name`;
        silence for a video without audio and past the audio's ends."""
        raw = video.raw_name(name)
        mel = self.spectrogram(raw)
        if mel is None:
            return self.silence
        return audio.frame_window(mel, frame, self.entries[raw]["fps"], self.cfg)
