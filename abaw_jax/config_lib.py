"""Defaults shared by every experiment config, and big_vision-style config arguments.

Experiment files under `configs/` (other families' in subfolders: clip/, gcsa/, mae/) import
this module and override what differs. `python -m abaw_jax.main --config=configs/va.py:real,task=au`
passes "real,task=au" to the file's `get_config(arg)`, which reads it with `parse_arg`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections
from ml_collections import config_dict

from abaw_jax import heads
from abaw_jax import state as state_lib
from abaw_jax.data import audio
from abaw_jax.errors import ConfigError
from abaw_jax.models import clip as clip_lib
from abaw_jax.models import gcsa as gcsa_lib


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """"a=1,b,c=x" -> ConfigDict(a=1, b=True, c="x"), typed like `defaults` (the only keys
    allowed); a bare key sets a boolean. ConfigError names an unknown key or a bad value."""
    out = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in defaults:
            raise ConfigError(f"unknown config argument {key!r} in {arg!r}; known: "
                              f"{sorted(defaults)}")
        default = defaults[key]
        if not _:  # a bare key
            if not isinstance(default, bool):
                raise ConfigError(f"config argument {key!r} needs a value ({key}=...)")
            out[key] = True
        elif isinstance(default, bool):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ConfigError(f"config argument {key}={value!r}: expected true or false")
            out[key] = value.lower() in ("true", "1")
        elif isinstance(default, int | float):
            try:
                out[key] = type(default)(value)
            except ValueError:
                raise ConfigError(f"config argument {key}={value!r}: expected "
                                  f"{type(default).__name__}") from None
        else:
            out[key] = value
    return out


def check(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """The values every mode reads, checked before anything is written or compiled: a bad
    `eval_batch_size` would otherwise surface only at the first evaluation, after the steps
    before it were trained (and lost on every retry)."""
    for key in ("batch_size", "eval_batch_size"):
        value = config.get(key)
        if not isinstance(value, int) or value <= 0 or value % num_devices:
            raise ConfigError(f"config: {key}={value!r} must be a positive multiple of the "
                              f"{num_devices} devices (it is split evenly over them)")
    for key in ("log_every_steps", "eval_every_steps", "checkpoint_every_steps",
                "keep_checkpoints"):
        value = config.get(key)
        if not isinstance(value, int) or value <= 0:
            raise ConfigError(f"config: {key}={value!r} must be a positive integer")
    if not isinstance(config.get("total_steps"), int) or config.total_steps < 0:
        raise ConfigError(f"config: total_steps={config.get('total_steps')!r} must be >= 0")
    _check_folds(config.get("data", {}))


def _check_folds(data) -> None:
    k, fold = data.get("folds", 0), data.get("fold", 0)
    if not isinstance(k, int) or k < 0 or k == 1:
        raise ConfigError(f"config: data.folds={k!r} must be 0 (off) or at least 2")
    if k and (not isinstance(fold, int) or not 0 <= fold < k):
        raise ConfigError(f"config: data.fold={fold!r} must be in 0..{k - 1} "
                          f"(data.folds={k})")


def base() -> ml_collections.ConfigDict:
    """Every field a run reads, with the defaults of the DDAMFN demo run."""
    c = ml_collections.ConfigDict()
    c.task = "va"
    c.trainer = "supervised"  # abaw_jax/trainers/: the objective
    c.seed = 0
    c.total_steps = 300
    c.batch_size = 32  # global: split over all devices of all processes
    c.eval_batch_size = 64
    c.log_every_steps = 25
    c.eval_every_steps = 100
    c.checkpoint_every_steps = 100
    c.keep_checkpoints = 3
    c.compute_dtype = "float32"  # bfloat16 on GPU/TPU halves activation memory
    c.init_from = config_dict.placeholder(str)  # a `python -m abaw_jax.convert` output folder
    # Sub-modules of the model started from the model of a training run (its best checkpoint):
    # {attribute: workdir}, e.g. the GCSA audio-visual model's branches (configs/gcsa/av.py).
    c.init_from_runs = ml_collections.ConfigDict()

    # The model family (abaw_jax/models registry) and its keyword arguments.
    c.model = ml_collections.ConfigDict({"name": "ddamfn_tiny", "num_head": 2})
    c.model.depthwise_impl = config_dict.placeholder(str)  # None: per backend; "shift" | "xla"
    c.model.gcsa = False  # GCSA (models/gcsa.py) between DDAMFN's trunk and attention heads

    c.data = ml_collections.ConfigDict()
    c.data.root = config_dict.placeholder(str)  # Aff-Wild2 tree (prepared once into the cache)
    c.data.records = config_dict.placeholder(str)  # or an already prepared records folder
    c.data.strict = False  # multi-task: drop frames with any invalid task
    c.data.format = "tfrecord"
    c.data.train_split = "train"
    c.data.eval_split = "validation"
    # Cross-validation (data/folds.py): `folds` folds by raw video over the train and eval
    # splits together; the run trains on the others and evaluates on fold `fold`. 0: off.
    c.data.folds = 0
    c.data.fold = 0
    c.data.fold_seed = 0
    # Without root/records: the synthetic Aff-Wild2 (SyntheticSpec fields), cached.
    c.data.synthetic = ml_collections.ConfigDict(
        {"num_videos": 24, "frames_per_video": 300, "seed": 0})
    # Temporal models: clips of clip_length consecutive frames, windows every clip_stride frames
    # (evaluation averages the overlapping windows back onto every frame); 0: single frames.
    c.data.clip_length = 0
    c.data.clip_stride = 1
    # Cached per-frame embeddings: a `--mode=extract` output folder, or several separated by
    # commas, concatenated per frame into the `features` input. A model that does not take
    # `features` itself trains its head on them in place of images, its backbone frozen.
    c.data.features = config_dict.placeholder(str)
    c.data.loader = ml_collections.ConfigDict(
        {"num_workers": 0, "read_threads": 1, "worker_buffer": 2})
    # The `audio` input (models that take it): each raw video's log-mel spectrogram, prepared
    # once with the records, and per frame a window centred on its timestamp (data/audio.py
    # for every key; `missing="error"` stops on a video without audio instead of silence).
    c.data.audio = ml_collections.ConfigDict(dataclasses.asdict(audio.AudioConfig()))
    c.data.audio.fmax = config_dict.placeholder(float)  # None: sample_rate / 2

    # DDAMFN's RAF-DB augmentation (see abaw_jax/data/augment.py for every key).
    c.augment = ml_collections.ConfigDict({"flip": 0.5, "affine_prob": 0.5, "rotate": 5.0,
                                           "crop_padding": 8, "erase_prob": 0.5})

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "adam"  # adam | adamw | sgd
    c.optim.lr = 1e-3
    c.optim.schedule = "cosine"  # cosine | step | exponential | constant
    c.optim.warmup_steps = 20
    c.optim.weight_decay = 0.0
    c.optim.grad_clip = 0.0  # global-norm clipping; 0 = off
    # Regexes over parameter paths, e.g. ("^features/",): frozen parameters get no gradient
    # and no optimizer state (the model family may freeze more, e.g. CLIP's towers).
    c.optim.freeze = ()
    # Parameter groups, {name: {pattern, lr, start_step, schedule keys...}}: the group whose
    # regex matches a parameter path owns it (none: the settings above; two: an error). A group
    # with start_step stays frozen until then (two-stage fine-tuning, see configs/mtl.py).
    c.optim.groups = ml_collections.ConfigDict()
    # Regexes over parameter paths kept out of weight decay besides biases and norms (every
    # parameter of ndim <= 1), e.g. MAE's 3-D class token and position embeddings.
    c.optim.no_decay = ()
    # Layer-wise learning-rate decay (optim.layer_scales): rate 0 is off; `embed` matches the
    # layer-0 parameters, `block` the blocks (group 1: the block index).
    c.optim.layer_decay = ml_collections.ConfigDict({"rate": 0.0, "embed": "", "block": ""})

    c.loss = ml_collections.ConfigDict()
    # The loss of each head (abaw_jax/losses.py HEAD_LOSSES).
    c.loss.va = "ccc"
    c.loss.expr = "ce"
    c.loss.au = "bce"
    # A model's own losses (in its outputs' "losses") are added with <name>_weight (default 1)
    # from step <name>_start_step (default 0). DDAMFN's attention-head diversity loss is "head".
    c.loss.head_weight = 0.1
    c.loss.head_start_step = 0  # ... from this step on (stage 2 of a two-stage run)
    # loss.expr=coarse_fine (the GCSA paper's): cross-entropy times 1 + mu between the valence/
    # arousal quadrants of the true and the predicted class; mu_12, mu_13, mu_14, mu_23, mu_24,
    # mu_34 (quadrants: 1 = v>0 a>0, 2 = v<0 a>0, 3 = v<0 a<0, 4 = v>0 a<0). Ours (the paper
    # gives none): 0.5 for a valence error, 0.25 for an arousal error, 1 for both.
    c.loss.coarse_mu = (0.5, 1.0, 0.25, 0.25, 1.0, 0.5)
    c.loss.expr_quadrants = heads.EXPR_QUADRANT  # quadrant 0-3 of each class (heads.py)
    c.loss.class_weights = config_dict.placeholder(list)  # EXPR cross-entropy weights
    c.loss.pos_weight = config_dict.placeholder(list)  # AU BCE positive weights
    # Fill class_weights / pos_weight (where not given) from the train split's label counts:
    # n / (8 * count) per expression, negatives / positives per AU.
    c.loss.balance = False

    # --mode=predict: more workdirs of the same task to average with this one (an ensemble),
    # and how EXPR members combine: "mean" of probabilities or "vote".
    c.predict = ml_collections.ConfigDict({"ensemble": (), "combine": "mean"})
    return c


def experiment(task: str, arg: str | None = "") -> ml_collections.ConfigDict:
    """The DDAMFN config of one task. Arguments: `real` (the papers' real-data settings),
    `task=` (another task with the same settings)."""
    args = parse_arg(arg, real=False, task=task)
    c = base()
    c.task = args.task
    if args.task == "au":  # rare AUs (4-15 % positive) otherwise learn to stay off
        c.loss.balance = True
        c.optim.lr = 3e-3
        # AUs learn slower: at 300 steps the mean F1 still climbs and depends on the seed
        # (0.29-0.56 over seeds 0-2); at 600 steps seed 0 reaches 0.80.
        c.total_steps = 600
    if args.real:
        real_data(c)
    return c


def temporal(task: str, arg: str | None = "", head: str = "lstm") -> ml_collections.ConfigDict:
    """A temporal head over clips (configs/*_lstm.py, configs/transformer.py): DDAMFN per
    frame, an LSTM or a transformer encoder over the per-frame embeddings, per-frame task
    layers; `batch_size` counts clips. Arguments as `experiment`."""
    c = experiment(task, arg)
    real = parse_arg(arg, real=False, task=task).real
    c.model = ml_collections.ConfigDict({
        "name": head, "backbone": "ddamfn" if real else "ddamfn_tiny",
        "backbone_kwargs": {"num_head": 2, "depthwise_impl": config_dict.placeholder(str),
                            "gcsa": False}})
    if head == "lstm":
        c.model.update({"hidden": 256 if real else 64, "layers": 1, "bidirectional": False})
    else:  # the MAE fusion team's head; a quarter of its widths on the CPU demo
        c.model.update({"proj": (256, 128) if real else (64, 32), "kernel": 1,
                        "layers": 4 if real else 2, "heads": 4, "dropout": 0.3})
    c.data.clip_length = 32 if real else 8
    c.data.clip_stride = 16 if real else 4  # half-overlapping windows
    c.batch_size = 16 if real else 4
    c.eval_batch_size = 32 if real else 8
    return c


def clip(task: str, arg: str | None = "", head: str | None = None) -> ml_collections.ConfigDict:
    """ABAW-8's CLIP systems (configs/clip/): the frozen CLIP image tower and the contrastive
    prompt head (`head=None`), or an LSTM over the tower's embeddings (`head="lstm"`).
    Arguments: `real` (the papers' scale), `weights=<converted folder>` (else a tiny random
    CLIP). The towers are frozen: `--config.data.features=<extract output>` trains on cached
    embeddings."""
    args = parse_arg(arg, real=False, weights="")
    c = experiment(task, "real" if args.real else "")
    frame = {"name": "clip", "hidden": 512, "temperature": 0.07, "learn_temperature": False,
             # the tower's config, mean and std: kept in the workdir's config.json
             **(clip_lib.model_kwargs(args.weights) if args.weights else {"clip": None})}
    if head is None:
        c.model = ml_collections.ConfigDict(frame)
        c.loss.expr = "contrastive"
    else:  # the LSTM's per-frame task layer trains with cross-entropy
        c.model = ml_collections.ConfigDict({
            "name": head, "backbone": "clip", "hidden": 512, "layers": 1, "bidirectional": False,
            "backbone_kwargs": {k: v for k, v in frame.items() if k != "name"}})
        # The public code's clips of 100 frames every 20; an eighth of that on the CPU demo.
        c.data.clip_length, c.data.clip_stride = (100, 20) if args.real else (16, 8)
        c.batch_size, c.eval_batch_size = (16, 32) if args.real else (8, 8)
    if not args.real:  # the random tower trains with the head (see models/clip.py)
        c.total_steps, c.optim.lr = 1000, 3e-3
    c.init_from = args.weights or None  # the tower and the prompts
    # A frozen pretrained tower: the head trains on its embeddings, extracted once into the data
    # cache (extract.resolve_features; 2,540x faster an epoch for ViT-B/16, see
    # benchmarks/clip_head.py); --config.data.features=None trains end to end.
    c.data.features = "auto" if args.weights else None
    # Flips only: no erasing or affine jitter of what a frozen tower sees.
    c.augment = ml_collections.ConfigDict({"flip": 0.5, "affine_prob": 0.0, "erase_prob": 0.0})
    if args.real:
        c.optim.lr = 1e-4
    c.loss.head_weight = 0.0  # DDAMFN's attention-head loss: no such heads here
    return c


FUSION_AUDIO = ("logmel", "cache", "none")


def fusion(task: str, arg: str | None = "") -> ml_collections.ConfigDict:
    """The 6th ABAW MAE fusion system (configs/mae/fusion_*.py): the `fusion` model over cached
    per-frame features (`data.features`: the visual cache first, e.g. a frozen MAE's
    embeddings; models/temporal.py FusionHead), clips of 100 frames, AdamW 5e-5, batch 32.
    Arguments: `real` (the paper's sizes and optimiser), `audio=` the audio part of each
    frame: `logmel` (default) the pooled log-mel statistics of its sound window, `cache` a
    second feature cache named in data.features (the GCSA audio branch's embeddings,
    `--mode=extract` of configs/gcsa/audio.py), `none` visual only."""
    args = parse_arg(arg, real=False, audio="logmel")
    if args.audio not in FUSION_AUDIO:
        raise ConfigError(f"config argument audio={args.audio!r}: expected one of "
                          f"{FUSION_AUDIO}")
    c = experiment(task, "real" if args.real else "")
    # The spec gives Conv1d 256 -> Conv1d 128 and a 4-layer, 4-head encoder with dropout 0.3,
    # no kernel and no MLP width. Kernel 3 (ours): the encoder has no position embedding, so
    # the convolutions are what tells neighbouring frames apart. MLP 2048: PyTorch's
    # TransformerEncoderLayer default, which a layer given only those arguments keeps. The
    # CPU default: a quarter of the widths, 2 layers.
    c.model = ml_collections.ConfigDict({
        "name": "fusion", "audio_bands": c.data.audio.n_mels if args.audio == "logmel" else 0,
        "proj": (256, 128) if args.real else (64, 32), "kernel": 3,
        "layers": 4 if args.real else 2, "heads": 4, "mlp": 2048 if args.real else 128,
        "dropout": 0.3})
    c.data.clip_length, c.data.clip_stride = 100, 50  # half-overlapping windows (ours)
    c.data.audio.freq_masks = c.data.audio.time_masks = 0  # pooled statistics: no masking
    c.loss.head_weight = 0.0  # DDAMFN's attention-head loss: no such heads here
    c.loss.balance = task in ("expr", "au")  # the paper's weighted cross-entropies (Eq. 1-2)
    c.optim = ml_collections.ConfigDict({
        "name": "adamw", "lr": 5e-5, "schedule": "constant", "warmup_steps": 0,
        "weight_decay": 0.01, "grad_clip": 0.0, "freeze": (), "groups": {}})  # PyTorch's wd
    if args.real:
        c.batch_size, c.eval_batch_size = 32, 64
    else:  # seconds on the CPU: a higher rate, decayed, for 300 steps of 8 clips
        c.batch_size, c.eval_batch_size = 8, 16
        c.optim.update({"lr": 1e-3, "schedule": "cosine", "warmup_steps": 20})
    return c


# The GCSA paper's "weight parameters of audio and facial images" (lr 1e-3): the networks'
# layers up to the pooled feature; the task layers (its fully connected layer) take optim.lr.
GCSA_BRANCH_LAYERS = r"^(visual/|audio/)?(features|branches|input_norm|gcsa)/"


def gcsa(kind: str, arg: str | None = "") -> ml_collections.ConfigDict:
    """ABAW-8's GCSA expression system (configs/gcsa/): `kind` "visual" (RHCNN), "audio"
    (MCNN) or "av" (both, one output each, trained jointly with summed losses, fused on
    validation). Arguments: `real` (the paper's optimiser, batch 16, our real sizes), `gcsa`
    (false: the paper's "Base" without the module), `loss` (coarse_fine or ce), and for "av"
    `visual=<workdir>,audio=<workdir>`: the separately trained branches of two runs of
    visual.py and audio.py, assembled and fused without training (their model sizes are
    read from the runs; for "av" only)."""
    args = parse_arg(arg, real=False, gcsa=True, loss="coarse_fine", visual="", audio="")
    c = experiment("expr", "real" if args.real else "")
    visual = {**(gcsa_lib.RHCNN_REAL if args.real else gcsa_lib.RHCNN_TINY),
              "gcsa": args.gcsa, "dropout": gcsa_lib.DROPOUT,
              "depthwise_impl": config_dict.placeholder(str)}
    sound = {**(gcsa_lib.MCNN_REAL if args.real else gcsa_lib.MCNN_TINY), "gcsa": args.gcsa,
             "dropout": gcsa_lib.DROPOUT}
    if kind == "visual":
        c.model = ml_collections.ConfigDict({"name": "gcsa_visual", **visual})
    elif kind == "audio":
        c.model = ml_collections.ConfigDict({"name": "gcsa_audio", **sound})
    elif kind == "av":
        c.model = ml_collections.ConfigDict({"name": "gcsa_av", "visual": visual,
                                             "audio": sound})
    else:
        raise ConfigError(f"GCSA config kind {kind!r}: expected visual, audio or av")
    c.loss.expr = args.loss
    c.loss.head_weight = 0.0  # DDAMFN's attention-head loss: no such heads here
    c.data.audio.time_masks = 0  # the paper masks frequencies only
    c.optim = ml_collections.ConfigDict({
        "name": "sgd", "momentum": 0.9, "nesterov": False, "lr": 1e-4, "schedule": "constant",
        "warmup_steps": 0, "weight_decay": 0.0, "grad_clip": 0.0, "freeze": (),
        "groups": {"branches": {"pattern": GCSA_BRANCH_LAYERS, "lr": 1e-3}}})
    if args.real:  # the paper's: batch 16, 300 epochs (11M steps here; ours ~1.6 epochs)
        c.batch_size, c.eval_batch_size, c.total_steps = 16, 256, 60_000
    else:  # the same optimiser at rates for a few hundred CPU steps, decayed to 0 (a
        # constant rate left the tiny RHCNN's validation F1 jumping 0.15-0.68 between seeds)
        c.optim.lr, c.optim.groups.branches.lr = 0.01, 0.1
        c.optim.schedule, c.total_steps = "cosine", 600
    if args.visual or args.audio:
        _gcsa_separate(c, args.visual, args.audio)
    return c


def _gcsa_separate(c: ml_collections.ConfigDict, visual: str, audio: str) -> None:
    """The audio-visual model of two separately trained runs: each branch from its run's best
    checkpoint, its sizes from the run's config; nothing trained (step 0 is evaluated: the
    fusion searched on validation and stored with that checkpoint)."""
    if c.model.name != "gcsa_av":
        raise ConfigError("visual=<workdir>,audio=<workdir> assemble configs/gcsa/av.py only")
    if not (visual and audio):
        raise ConfigError("configs/gcsa/av.py: give both visual=<workdir> and audio=<workdir> "
                          "(two runs of configs/gcsa/visual.py and audio.py)")
    for branch, workdir in (("visual", visual), ("audio", audio)):
        model = state_lib.read_config(workdir).model
        if model.name != f"gcsa_{branch}":
            raise ConfigError(f"{branch}={workdir}: a run of model {model.name!r}, not "
                              f"gcsa_{branch}")
        c.model[branch] = {k: v for k, v in model.items() if k != "name"}
        c.init_from_runs[branch] = str(workdir)
    c.total_steps = 0


# MAE's AdamW groups: no weight decay on biases and norms (ndim <= 1) nor on the class and mask
# tokens and position embeddings (3-D); the fixed sin-cos ones are not parameters at all.
MAE_NO_DECAY = (r"^(cls_token|mask_token|pos_embed)(/|$)",)
# MAE's layer-wise decay (lr_decay.py): patch and position embeddings and the class token are
# layer 0, encoder block i is layer i + 1, fc_norm and the task layers the last.
MAE_LAYERS = {"embed": r"^(patch_embed|cls_token|pos_embed)(/|$)",
              "block": r"^encoder/layers/(\d+)/"}


def _lr_per_256(c: ml_collections.ConfigDict, base_lr: float) -> None:
    """MAE's learning rate: `optim.base_lr` per 256 images, times the global batch, re-derived
    when --config.batch_size or --config.optim.base_lr is overridden (a lazy reference;
    --config.optim.lr replaces it)."""
    c.optim.base_lr = base_lr
    c.optim.lr = c.optim.get_ref("base_lr") * c.get_ref("batch_size") / 256


def mae_pretrain(arg: str | None = "") -> ml_collections.ConfigDict:
    """MAE pretraining (configs/mae/pretrain.py): the label-free masked reconstruction of the
    face crops of `data.pretrain_splits` with the reference recipe (facebookresearch/mae
    main_pretrain.py): AdamW betas (0.9, 0.95), weight decay 0.05 (`MAE_NO_DECAY`), lr
    `base_lr` x batch / 256, linear warm-up then cosine to 0, random resized crop (scale 0.2-1)
    and horizontal flip. Arguments: `real` (ViT-B/16 at 224x224 with the reference's settings;
    else a tiny MAE on 32x32 faces that trains on this CPU in seconds)."""
    args = parse_arg(arg, real=False)
    c = base()
    # Which records hold the faces, not a label: VA's curation keeps the most frames (every crop
    # with a valid VA label, 2.06M of Aff-Wild2's); no label is read.
    c.task = "va"
    c.trainer = "mae_pretrain"
    c.data.pretrain_splits = ("train",)  # add "validation": its faces, but then the eval loss
    # is over frames the model reconstructed in training
    c.model = ml_collections.ConfigDict({"name": "mae_pretrain", "size": "b16" if args.real
                                         else "tiny", "mask_ratio": 0.75,
                                         "norm_pix_loss": args.real})
    c.augment = ml_collections.ConfigDict({"flip": 0.5, "crop_scale": (0.2, 1.0),
                                           "affine_prob": 0.0, "erase_prob": 0.0})
    c.optim = ml_collections.ConfigDict({
        "name": "adamw", "b1": 0.9, "b2": 0.95, "weight_decay": 0.05, "schedule": "cosine",
        "end_lr": 0.0, "grad_clip": 0.0, "freeze": (), "groups": {},
        "no_decay": MAE_NO_DECAY, "layer_decay": {"rate": 0.0, "embed": "", "block": ""}})
    c.loss.head_weight = 0.0  # DDAMFN's attention-head loss: no such heads here
    if args.real:
        # The reference's ViT-B run: batch 4096, blr 1.5e-4 (lr 2.4e-3), norm_pix_loss, 800
        # epochs of ImageNet-1k with 40 of warm-up (250k steps). Ours on Aff-Wild2's VA train
        # faces (1.68M): 40,000 steps (~100 epochs), warm-up 5 % of them.
        c.batch_size, c.eval_batch_size = 4096, 1024
        _lr_per_256(c, 1.5e-4)
        c.total_steps, c.optim.warmup_steps = 40_000, 2_000
        c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps = 100, 2_000, 1_000
        c.data.loader.num_workers = 16
    else:  # the tiny MAE's validation loss after these 300 steps, by base_lr (measured on the
        # synthetic data): 0.419 at 1.5e-3, 0.314 at 1e-2, 0.297 at 3e-2
        c.batch_size, c.eval_batch_size = 64, 64
        _lr_per_256(c, 1e-2)
        c.total_steps, c.optim.warmup_steps = 300, 20
        c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps = 25, 100, 100
    return c


def mae(task: str, arg: str | None = "") -> ml_collections.ConfigDict:
    """MAE-ViT fine-tuning (configs/mae/{va,expr,au}.py, ABAW-6): the encoder with global
    average pooling, `fc_norm` and the task layer, drop path 0.1, AdamW with layer-wise lr decay
    0.65 (`MAE_LAYERS`) as the reference's main_finetune.py (betas (0.9, 0.999), weight decay
    0.05, lr `base_lr` x batch / 256). Arguments: `real` (ViT-B/16 at 224x224), `init=` a
    pretraining workdir (configs/mae/pretrain.py: its encoder) or a converted folder
    (`python -m abaw_jax.convert mae`); without it the encoder starts from scratch."""
    args = parse_arg(arg, real=False, init="")
    c = experiment(task, "real" if args.real else "")
    c.model = ml_collections.ConfigDict({"name": "mae", "size": "b16" if args.real else "tiny",
                                         "drop_path": 0.1})
    c.init_from = args.init or None
    c.loss.head_weight = 0.0  # DDAMFN's attention-head loss: no such heads here
    c.loss.balance = task != "va"  # the paper's weighted cross-entropies (W_exp, W_au)
    c.augment = ml_collections.ConfigDict({"flip": 0.5, "crop_scale": (0.08, 1.0),
                                           "affine_prob": 0.0, "erase_prob": 0.25})
    c.optim = ml_collections.ConfigDict({
        "name": "adamw", "b1": 0.9, "b2": 0.999, "weight_decay": 0.05, "schedule": "cosine",
        "end_lr": 0.0, "grad_clip": 0.0, "freeze": (), "groups": {},
        "no_decay": (r"^(cls_token|pos_embed)(/|$)",),
        "layer_decay": {"rate": 0.65, **MAE_LAYERS}})
    if args.real:  # the reference's ViT-B fine-tuning: blr 5e-4, 5 of 100 epochs warm-up
        _lr_per_256(c, 5e-4)
        c.optim.warmup_steps = 1_500
    else:
        c.batch_size, c.eval_batch_size = 64, 64
        _lr_per_256(c, 5e-3)
        c.total_steps, c.optim.warmup_steps = 300, 20
    return c


def real_data(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The papers' scale: full DDAMFN, Adam 1e-4 with exponential decay, batch 256, several
    workers per host. Point it at the data with --config.data.root (or data.records)."""
    if c.model.name == "ddamfn_tiny":
        c.model.name = "ddamfn"
    c.total_steps = 30_000
    c.batch_size = 256
    c.eval_batch_size = 512
    c.log_every_steps = 100
    c.eval_every_steps = 2_000
    c.checkpoint_every_steps = 1_000
    c.optim.lr = 1e-4
    c.optim.schedule = "exponential"
    c.optim.decay = 0.9
    c.optim.decay_steps = 3_000
    c.optim.warmup_steps = 500
    c.data.loader.num_workers = 8
    return c
