"""Raw videos: finding them, probing them with PyAV, reading video_info.csv, and their frames."""

import logging

import av
import cv2
import numpy as np
import pytest

from abaw_jax.data import video
from abaw_jax.data.affwild2 import DataError


def _tone(seconds: float, sample_rate: int) -> np.ndarray:
    return 0.3 * np.sin(2 * np.pi * 440 * np.arange(round(seconds * sample_rate)) / sample_rate)


@pytest.mark.parametrize("suffix,fps,frames", [(".mp4", 25, 61), (".mp4", 30, 47),
                                               (".avi", 25, 52), (".avi", 30, 75)])
def test_probe_and_info_csv_agree_with_what_was_written(tmp_path, suffix, fps, frames):
    path = tmp_path / f"2-{fps}-64x48{suffix}"
    video.write_video(path, fps, frames, size=(64, 48), audio=_tone(frames / fps, 22050),
                      sample_rate=22050)
    csv = tmp_path / video.INFO_FILE  # real-file dirt: CRLF, spaces, trailing blank lines
    csv.write_bytes(f"video, fps, num_frames, width, height\r\n{path.stem}, {fps}, {frames}, 64,"
                    f" 48\r\nother,29.97,10,640,360\r\n\r\n \r\n".encode())
    probed, listed = video.probe(path), video.read_info_csv(csv)
    assert (probed.num_frames, probed.fps) == (frames, fps)
    assert (listed[path.stem].num_frames, listed[path.stem].fps) == (frames, fps)
    assert probed.duration == pytest.approx(frames / fps) == listed[path.stem].duration
    assert (probed.width, probed.height) == (64, 48) == (listed[path.stem].width,
                                                        listed[path.stem].height)
    assert probed.sample_rate == 22050 and listed[path.stem].sample_rate is None
    assert (probed.source, listed[path.stem].source) == ("video", "video_info.csv")
    assert listed["other"].fps == 29.97 and set(listed) == {path.stem, "other"}


def test_probe_counts_packets_where_the_container_has_no_frame_count(tmp_path):
    path = tmp_path / "v.mkv"
    video.write_video(path, 30, 43)
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 0  # Matroska does not say
    info = video.probe(path)
    assert (info.num_frames, info.fps, info.sample_rate) == (43, 30, None)


def test_read_info_csv_without_size_columns(tmp_path):
    csv = tmp_path / video.INFO_FILE
    csv.write_text("video,fps,num_frames\nv1,25,100")  # no final newline
    info = video.read_info_csv(csv)["v1"]
    assert (info.fps, info.num_frames, info.duration, info.width, info.height) == (25, 100, 4, 0,
                                                                                  0)


@pytest.mark.parametrize("line,message", [
    ("v,25", "expected 3 comma-separated values, got 2"),
    ("v,fast,10", "fps 'fast' is not a number"),
    ("v,0,10", "fps '0' must be a positive number"),
    ("v,nan,10", "fps 'nan' must be a positive number"),
    ("v,25,10.5", "num_frames '10.5' is not an integer"),
    ("v,25,-1", "a negative count"),
    ("../v,25,10", "holds a path separator"),
    ("v,25,10\nv,30,20", "video 'v' listed twice"),
])
def test_read_info_csv_names_the_bad_line(tmp_path, line, message):
    csv = tmp_path / video.INFO_FILE
    csv.write_text(f"video,fps,num_frames\nfine,25,3\n{line}\n")
    bad_line = 3 + line.count("\n")
    with pytest.raises(DataError, match=f"{csv}:{bad_line}: .*{message}"):
        video.read_info_csv(csv)


def test_read_info_csv_checks_the_header(tmp_path):
    csv = tmp_path / video.INFO_FILE
    csv.write_text("name,rate,frames\nv,25,3\n")
    with pytest.raises(DataError, match=f"{csv}:1: header"):
        video.read_info_csv(csv)


def test_probe_names_a_corrupt_or_truncated_file(tmp_path):
    good = tmp_path / "good.mp4"
    video.write_video(good, 25, 50, audio=_tone(2, 16000))
    data = good.read_bytes()
    garbage, cut, empty = tmp_path / "garbage.mp4", tmp_path / "cut.mp4", tmp_path / "empty.avi"
    garbage.write_bytes(np.random.default_rng(0).bytes(5000))
    cut.write_bytes(data[: len(data) // 2])  # the index (moov) is at the end: it is lost
    empty.write_bytes(b"")
    for path in (garbage, cut, empty):
        with pytest.raises(DataError, match=f"^{path}: cannot read the video"):
            video.probe(path)


def test_probe_of_an_audio_only_file(tmp_path):
    path = tmp_path / "a.mp4"
    with av.open(str(path), "w") as container:  # an audio-only .mp4
        stream = container.add_stream("aac", rate=16000, layout="mono")
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp",
                                           layout="mono")
        frame.sample_rate = 16000
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    with pytest.raises(DataError, match=f"{path}: no video stream"):
        video.probe(path)


def test_index_videos_shares_one_raw_file_between_left_and_right(tmp_path, caplog):
    first, second = tmp_path / "videos", tmp_path / "videos_new"
    first.mkdir()
    second.mkdir()
    for path in (first / "10-25-640x360.mp4", first / "video7.avi", first / "notes.txt",
                 first / "both.avi", first / "both.mp4", second / "10-25-640x360.avi",
                 second / "video9.MP4"):
        path.touch()
    (second / "folder.mp4").mkdir()
    with caplog.at_level(logging.WARNING):
        index = video.index_videos([first, second])
    assert index == {"10-25-640x360": first / "10-25-640x360.mp4", "video7": first / "video7.avi",
                     "both": first / "both.mp4", "video9": second / "video9.MP4"}
    assert "2 videos found more than once" in caplog.text
    assert f"{first / 'both.avi'} (using {first / 'both.mp4'})" in caplog.text
    assert f"{second / '10-25-640x360.avi'}" in caplog.text
    assert video.raw_name("10-25-640x360_left") == video.raw_name("10-25-640x360_right")
    for name in ("10-25-640x360_left", "10-25-640x360_right", "10-25-640x360"):
        assert video.find_video(index, name) == first / "10-25-640x360.mp4"
    assert video.find_video(index, "video8_left") is None
    assert video.raw_name("_left") == "_left"  # nothing left to name a video


@pytest.mark.parametrize("name,problem", [("a\\b.mp4", "holds a path separator"),
                                          ("a,b.mp4", "holds a comma")])
def test_index_videos_refuses_names_that_escape(tmp_path, name, problem):
    (tmp_path / name).touch()
    with pytest.raises(DataError, match=f"video name .* {problem}") as error:
        video.index_videos([tmp_path])
    assert str(error.value).startswith(f"{tmp_path / name}: ")


def test_index_videos_never_yields_a_dot_name(tmp_path):
    (tmp_path / "...mp4").touch()  # a dot file without a suffix, not a video named ".."
    (tmp_path / ".mp4").touch()
    assert video.index_videos([tmp_path]) == {}


def test_index_videos_needs_existing_folders(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path / 'none'}: video folder is not a directory"):
        video.index_videos([tmp_path / "none"])


def test_wav_beside_the_video_else_in_the_first_folder_holding_it(tmp_path):
    path = tmp_path / "video3.mp4"
    assert video.wav_beside(path) is None
    (tmp_path / "video3.wav").touch()
    assert video.wav_beside(path) == tmp_path / "video3.wav"
    other = tmp_path / "other"
    other.mkdir()
    wav = tmp_path / "video3.wav"
    assert video.find_wav("video3", other / "video3.mp4", [other, tmp_path]) == wav
    (other / "video3.wav").touch()
    assert video.find_wav("video3", other / "video3.mp4", [tmp_path]) == other / "video3.wav"
    assert video.find_wav("video3", None, [other, tmp_path]) == other / "video3.wav"
    assert video.find_wav("video4", None, [other, tmp_path]) is None


def test_read_frames_in_order_every_nth_and_a_cut_file_after_its_frames(tmp_path):
    path = tmp_path / "v.mp4"
    video.write_video(path, 25, 20, size=(64, 48), faststart=True)
    frames = list(video.read_frames(path, every=3))
    assert [n for n, _ in frames] == [1, 4, 7, 10, 13, 16, 19]
    assert all(f.shape == (48, 64, 3) and f.dtype == np.uint8 for _, f in frames)
    # write_video's frame i is grey (i * 37) % 256 (MPEG-4 is lossy: a few levels off)
    np.testing.assert_allclose([f.mean() for _, f in frames],
                               [((n - 1) * 37) % 256 for n, _ in frames], atol=4)
    data = path.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) * 2 // 3])  # index first: FFmpeg stops quietly at the cut
    got = []
    with pytest.raises(DataError, match=f"{cut}: truncated: [0-9]+ of the 20 frames"):
        for n, _ in video.read_frames(cut):
            got.append(n)
    assert 0 < len(got) < 20
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\0" * 4096)
    with pytest.raises(DataError, match=f"{junk}: cannot read the video"):
        next(video.read_frames(junk))


def test_frame_files_by_number_or_name_and_an_unreadable_image(tmp_path):
    numbered, named = tmp_path / "numbered", tmp_path / "named"
    numbered.mkdir()
    named.mkdir()
    image = np.zeros((8, 8, 3), np.uint8)
    for name in ("00003.jpg", "00010.png", "00001.jpg"):
        cv2.imwrite(str(numbered / name), image)
    (numbered / "notes.txt").write_text("not a frame")
    assert [(n, p.name) for n, p in video.frame_files(numbered)] == [
        (1, "00001.jpg"), (3, "00003.jpg"), (10, "00010.png")]
    for name in ("b.jpg", "a.jpg", "c1.png"):
        cv2.imwrite(str(named / name), image)
    assert [(n, p.name) for n, p in video.frame_files(named)] == [
        (1, "a.jpg"), (2, "b.jpg"), (3, "c1.png")]
    (named / "b.jpg").write_bytes(b"not a jpeg")
    got = []
    with pytest.raises(DataError, match=f"{named / 'b.jpg'}: cannot read the image"):
        for n, rgb in video.read_frame_files(video.frame_files(named)):
            got.append((n, rgb.shape))
    assert got == [(1, (8, 8, 3))]
