r"""Whether a face's outputs depend on its batch, on this CPU: the tiny DDAMFN's embeddings of
the same 40 drawn faces (random weights) computed at its own batch size per call, as a plain
jitted function does, against `inference.Predictor`, which runs every call at one shape.

  python benchmarks/batch_invariance.py [--devices=8]

Prints `raw batch N vs 8: <max abs difference>` for calls of N faces, then the predictor's
largest difference over calls of other sizes, the faces in reverse order and `--devices` fake
CPU devices (0 where the outputs are the same bits). XLA:CPU's kernels follow the CPU it runs
on; to see another CPU's, emulate it, e.g. an AMD EPYC without AVX-512 (Debian's qemu-user):

  JAX_ENABLE_COMPILATION_CACHE=false qemu-x86_64 -cpu EPYC-Rome "$(python -c 'import sys;
      print(sys.executable)')" benchmarks/batch_invariance.py
"""

import os

from absl import app, flags

flags.DEFINE_integer("devices", 8, "Fake CPU devices to split the predictor's calls over.")
FLAGS = flags.FLAGS


def _faces(n: int):
    import numpy as np

    from abaw_jax.data import synthetic

    faces = np.full((n, 112, 112, 3), 110, np.uint8)
    rng = np.random.default_rng(0)
    for i, face in enumerate(faces):
        synthetic.draw_face(face, (8 + 3 * (i % 8), 10 + 2 * (i % 8), 90 - 4 * (i % 8)),
                            tuple(int(v) for v in rng.integers(100, 220, 3)))
    return faces


def main(argv):
    del argv
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={FLAGS.devices}")
    import jax
    import numpy as np
    from flax import nnx
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as cpu
    except ImportError:  # numpy 1.x
        from numpy.core._multiarray_umath import __cpu_features__ as cpu

    from abaw_jax import inference, models

    print(f"cpu: AVX-512F {cpu['AVX512F']}, AVX2 {cpu['AVX2']}, FMA3 {cpu['FMA3']}")
    family = models.get("ddamfn_tiny")
    model = family.build(outputs={"va": 2}, rngs=nnx.Rngs(0), feature_dim=0, num_head=2)
    model.eval()  # BatchNorm from its statistics: each face's outputs its own
    faces = _faces(40)
    graphdef, state = nnx.split(model)
    preprocess = family.image_preprocess(model)

    @jax.jit
    def embed(state, images):
        x = models.prepare_inputs(preprocess, {"image": images}, ("image",))
        return family.embed_frames(nnx.merge(graphdef, state), x)

    want = np.asarray(embed(state, faces[:8]))
    for n in (1, 2, 4, 5, 16, 40):
        got = np.concatenate([np.asarray(embed(state, faces[i:i + n])) for i in range(0, 40, n)])
        print(f"raw batch {n} vs 8: {np.abs(got[:8] - want).max():.3g}")
    predictor = inference.Predictor(model, family, ("image",), lambda out: {}, batch=8)
    want = predictor.embed(faces)
    worst = 0.0
    for sizes in ([1] * 6, [3, 7, 11], [13, 27]):
        edges = np.cumsum([0, *sizes])
        got = np.concatenate([predictor.embed(faces[a:b])
                              for a, b in zip(edges, edges[1:], strict=False)])
        worst = max(worst, float(np.abs(got - want[:edges[-1]]).max()))
    print(f"predictor, calls of other sizes: {worst:.3g}")
    reversed_ = predictor.embed(faces[::-1])[::-1]
    print(f"predictor, faces reversed: {np.abs(reversed_ - want).max():.3g}")
    split = predictor.sharded(FLAGS.devices)
    print(f"predictor over {split.mesh.size} devices: "
          f"{np.abs(split.embed(faces) - want).max():.3g}")


if __name__ == "__main__":
    app.run(main)
