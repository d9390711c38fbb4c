r"""The video command's speed: end-to-end frames/s of `abaw_jax.video` on a synthetic 720p video
with the full DDAMFN, and the share of decoding, face detection and the model.

  python benchmarks/video.py [--seconds=60] [--faces=1] [--batch=32] [--detector=haar]
      [--model=ddamfn] [--video=PATH] [--devices=0] [--min_hits=1,2,3]

Writes a `--seconds` long 1280x720, 25 fps H.264 video (a cluttered still background, `--faces`
drawn faces moving about; `--video` reuses or keeps it), then times, each on its own: decoding
(`data.video.read_frames`: PyAV, RGB frames), finding the faces (`faces.Tracker`: the
whole-frame search every 10 frames and the searches near each face in between, plus cropping
and resizing each face; on frames decoded beforehand), the model alone (the predictor on
batches of 112x112 crops, random weights: the speed does not depend on them; split over
`--devices`, as the command does; and, calls alternating with it, on jax's default device
without a mesh), and the whole command (`video.analyse_input`). Prints
`<name>: <value> <unit>` lines: each stage's frames/s, its share of the three stages' summed
time, end-to-end frames/s and its ratio to the model alone (goal: the model the largest share,
the ratio >= 0.5). Then, per `--min_hits`, the tracks the command would write and their faces:
every track beyond the `--faces` drawn ones is a false detection's.
"""

import collections
import itertools
import tempfile
import time
from pathlib import Path

import av
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from abaw_jax import faces, inference, models, tasks, video
from abaw_jax.data import augment, synthetic
from abaw_jax.data import video as video_lib

flags.DEFINE_float("seconds", 60.0, "Length of the video.")
flags.DEFINE_integer("faces", 1, "Faces in every frame.")
flags.DEFINE_integer("batch", inference.FRAMES_PER_DEVICE, "Faces per device and model call.")
flags.DEFINE_string("detector", "haar", "As the command's --detector.")
flags.DEFINE_string("model", "ddamfn", "Registered frame family (random weights).")
flags.DEFINE_string("video", None, "Video path: read if it exists, else written there.")
flags.DEFINE_integer("devices", 0, "As the command's --devices (0: all local devices).")
flags.DEFINE_list("min_hits", ["1", "2", "3"], "Values of the command's --min_hits to count "
                  "the tracks of (none: skip).")
FLAGS = flags.FLAGS

SIZE, FPS = (1280, 720), 25
HEADS = {"va": 2, "expr": 8, "au": 12}


def _background(rng: np.random.Generator) -> np.ndarray:
    """A still scene: a smooth colour field with rectangles and lines (shelves, frames)."""
    w, h = SIZE
    coarse = rng.integers(40, 200, (9, 16, 3)).astype(np.uint8)
    image = np.ascontiguousarray(augment.cv2.resize(coarse, SIZE,
                                                    interpolation=augment.cv2.INTER_CUBIC))
    for _ in range(40):
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        if rng.random() < 0.5:
            augment.cv2.rectangle(image, (x, y), (x + int(rng.integers(20, 200)),
                                                  y + int(rng.integers(20, 200))), colour, -1)
        else:
            augment.cv2.line(image, (x, y), (int(rng.integers(0, w)), int(rng.integers(0, h))),
                             colour, int(rng.integers(1, 6)))
    return image


def _write(path: Path, frames: int, count: int) -> None:
    rng = np.random.default_rng(0)
    background = _background(rng)
    tones = [tuple(int(v) for v in rng.integers(120, 230, 3)) for _ in range(count)]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=FPS, options={"preset": "veryfast",
                                                                    "crf": "23"})
        stream.width, stream.height, stream.pix_fmt = *SIZE, "yuv420p"
        for i in range(frames):
            image = background.copy()
            for k, tone in enumerate(tones):  # each face wanders about its own column
                side = 200 + 20 * np.sin(i / 50 + k)
                x = (k + 0.5) * SIZE[0] / count - side / 2 + 120 * np.sin(i / 40 + 2 * k)
                y = SIZE[1] / 2 - side / 2 + 80 * np.sin(i / 30 + k)
                synthetic.draw_face(image, (x, y, side), tone)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode(None))


def _predictor() -> inference.Predictor:
    """The family's model with random weights, built abstractly (no initialiser compiled)."""
    family = models.get(FLAGS.model)
    model = nnx.eval_shape(lambda: family.build(outputs=HEADS, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, jax.tree.map(
        lambda s: jnp.asarray(rng.uniform(0.5, 1.0, s.shape), s.dtype), nnx.to_pure_dict(state)))
    nnx.update(model, state)
    return inference.Predictor(model, family, tuple(model.inputs),
                               tasks.Task("mtl", tuple(HEADS), "").predict, batch=FLAGS.batch)


def _decode(path: Path) -> tuple[int, float]:
    start = time.perf_counter()
    n = sum(1 for _ in video_lib.read_frames(path))
    return n, time.perf_counter() - start


def _find(path: Path, size: int) -> tuple[int, float]:
    """Faces found, and the seconds spent finding, cropping and resizing them. Over frames
    decoded beforehand, 250 at a time: timed while FFmpeg's threads decode ahead, the same work
    took twice as long (10.8 against 4.6 ms a frame over the first 300 frames)."""
    tracker = faces.Tracker(faces.detector(FLAGS.detector))
    found, seconds = 0, 0.0
    frames = video_lib.read_frames(path)
    while chunk := [rgb for _, rgb in itertools.islice(frames, 250)]:
        start = time.perf_counter()
        for rgb in chunk:
            for face in tracker(rgb):
                augment.resize(faces.crop(rgb, face.box, video.Options.margin), size)
                found += 1
        seconds += time.perf_counter() - start
    return found, seconds


def _model(predictors: list[inference.Predictor], n: int) -> list[float]:
    """Seconds for n faces in full model calls (the first predictor's: `batch` faces on each
    of its devices; compiled first), per predictor; their calls
    alternate, in reversed order every other batch, so that the load of a busy machine falls on
    each alike (in a fixed order, the predictor called first measured 0.94-0.97x the other in
    two runs; reversing every other round, 1.05x: the order, not the predictors, made it)."""
    size = predictors[0].preprocess.size
    per_call = predictors[0].per_call
    crops = np.random.default_rng(0).integers(0, 255, (per_call, size, size, 3), np.uint8)
    seconds = [0.0] * len(predictors)
    for predictor in predictors:
        predictor(crops)
    for batch in range(-(-n // per_call)):
        for i, predictor in list(enumerate(predictors))[::-1 if batch % 2 else 1]:
            start = time.perf_counter()
            predictor(crops)
            seconds[i] += time.perf_counter() - start
    return seconds


def _tracks(path: Path, min_hits: int) -> collections.Counter:
    """{track: faces the command writes} with `min_hits`: a tentative face counts once its
    track is confirmed."""
    tracker = faces.Tracker(faces.detector(FLAGS.detector), min_hits=min_hits)
    held, written = collections.Counter(), collections.Counter()
    for _, rgb in video_lib.read_frames(path):
        for face in tracker(rgb):
            (written if face.confirmed else held)[face.track] += 1
        for provisional, track in tracker.confirmed.items():
            written[track] += held.pop(provisional, 0)
        for provisional in tracker.dropped:
            held.pop(provisional, None)
    return written


def main(argv):
    del argv
    path = Path(FLAGS.video or Path(tempfile.mkdtemp(prefix="bench_video_")) / "720p.mp4")
    frames = round(FLAGS.seconds * FPS)
    if not path.exists():
        start = time.perf_counter()
        _write(path, frames, FLAGS.faces)
        print(f"wrote {path} in {time.perf_counter() - start:.0f} s")
    info = video_lib.probe(path)
    unsplit = _predictor()
    predictor = unsplit.sharded(FLAGS.devices)
    print(f"video: {info.width}x{info.height}, {info.num_frames} frames at {info.fps:g} fps, "
          f"{FLAGS.faces} face(s) drawn per frame; model {FLAGS.model} (random weights), "
          f"batch {FLAGS.batch}, detector {FLAGS.detector}, jax on {predictor.mesh.size} "
          f"{jax.devices()[0].platform} device(s)")
    n, decode = _decode(path)
    found, find = _find(path, predictor.preprocess.size)
    model, model_unsplit = _model([predictor, unsplit], found)
    options = video.Options(detector=FLAGS.detector, batch=FLAGS.batch, devices=FLAGS.devices)
    predictor(np.zeros((1, 112, 112, 3), np.uint8))  # compiled before timing
    start = time.perf_counter()
    result = video.analyse_input(video.find_inputs(path)[0], predictor, options)
    total = time.perf_counter() - start
    faced = int(np.sum(result.table["track"] >= 0))
    print(f"faces_found: {found} in {n} frames ({faced} in the command's run)")
    stages = {"decode": decode, "detect_crop": find, "model": model}
    for name, seconds in stages.items():
        print(f"{name}: {n / seconds:.1f} frames/s ({1000 * seconds / n:.2f} ms/frame)")
    for name, seconds in stages.items():
        print(f"share_{name}: {100 * seconds / sum(stages.values()):.1f} %")
    print(f"end_to_end: {n / total:.1f} frames/s ({total:.1f} s)")
    print(f"end_to_end_vs_model: {model / total:.2f} (goal >= 0.5)")
    print(f"model_unsplit: {n / model_unsplit:.1f} frames/s (the predictor on jax's default "
          f"device, as before --devices; split over {predictor.mesh.size}: "
          f"{model_unsplit / model:.3f}x its speed)")
    print("end_to_end_busy: " + ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items())
          + " (each stage's own thread during the run)")
    for min_hits in map(int, FLAGS.min_hits):
        written = _tracks(path, min_hits)
        true = sum(n for _, n in written.most_common(FLAGS.faces))
        false = sum(written.values()) - true
        print(f"tracks_min_hits_{min_hits}: {len(written)} tracks, "
              f"{max(0, len(written) - FLAGS.faces)} false ({false} faces), {true} faces in "
              f"the {FLAGS.faces} longest")


if __name__ == "__main__":
    app.run(main)
