"""The offline default: scikit-learn's 8x8 digits at their native size, a 1.6M-parameter UNet, 3,000
steps; the main job took 8.7 minutes on a 2-core CPU (523 s, 2026-12-03; the target is 10).
Samples (grids, sample.py, evaluate.py) default to SDE-DPM-Solver++(2M) on 20 log-SNR steps.

The settings come from a measured study of quality per CPU minute (BENCHMARKS.md, "Digits
training recipe"): native 8x8 instead of 16x16 (4x fewer pixels per step), two res
blocks per level with attention at 4x4, batch 64, a larger learning rate than the paper's, and an
EMA that ramps up (`ema_warmup`) so a short run's average does not keep its random
initialisation. The step count is what fits the 10 minutes; at 2,500 steps DDIM-50 scored 1.39x the real
images' digits-FID against held-out digits, at 3,000 about 1.2x (BENCHMARKS.md, "Training
length").
A cosine learning-rate decay and Min-SNR-5 loss weighting (`training.lr_decay`,
`training.loss_weight`) were measured at equal steps and are not used: the decay made DDIM-50
worse (3.93 vs 2.84), Min-SNR-5 moved the scores within their seed spread.

Variants: `configs/digits.py:tiny` (seconds, for tests), `configs/digits.py:16px` (the
digits upsampled to 16x16, one res block per level, 2,000 steps at
batch 32), `configs/digits.py:4px` (the digits' 2x2 block means: the first stage of the
4x4 -> 8x8 super-resolution cascade), `configs/digits.py:classifier` (the noise-conditional classifier for classifier
guidance; `classifier_tiny` for tests), `configs/digits.py:cond` (the same model conditioned on
the 10 classes, label dropout 0.1 for classifier-free guidance: the one class-conditional digits
run that the class-conditional methods and their benchmarks train once and reuse; `cond_tiny`
for tests), `configs/digits.py:distill` (progressive distillation of a default run, named by
--config.distill.teacher, from 64 DDIM steps to 4 in four rounds; `distill_tiny` for tests;
docs/distillation.md), `configs/digits.py:cond_without9` (`cond` with the 9s left out of the
training split and 9 classes: the base of the fine-tuning benchmark), `configs/digits.py:finetune`
(fine-tuning a class-conditional run named by --config.finetune.base on a few images;
`finetune_tiny` for tests; docs/finetuning.md).
"""

import ml_collections

from configs import base


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    config = base.get_config()
    config.model.ch = 32
    config.model.ch_mult = (1, 2, 2)      # 8x8, 4x4, 2x2
    config.model.num_res_blocks = 2
    config.model.attn_resolutions = (4,)
    config.model.num_groups = 8           # 32 channels: groups of 4
    config.model.dropout = 0.1            # 1,437 training images: regularise
    config.data.dataset = "digits"
    config.data.image_size = 8
    config.data.channels = 1
    config.data.random_flip = False       # digits are not mirror-symmetric
    config.training.batch_size = 64
    config.training.lr = 5e-4             # a small model for few steps tolerates a larger rate
    config.training.warmup_steps = 100
    config.training.num_steps = 3000      # 0.13-0.20 s/step at batch 64 on 2 CPU cores
    config.training.ema_decay = 0.999
    config.training.ema_warmup = True     # min(0.999, (1+n)/(10+n)): forgets the init early
    config.training.log_every = 50
    config.training.checkpoint_every = 500
    config.training.sample_every = 1500
    config.training.num_sample_images = 36
    # SDE-DPM-Solver++(2M), 20 steps uniform in log-SNR: the grids, sample.py and evaluate
    # default to it (1,000 images in about 12 s). On the 1,800-step run's checkpoint it scored
    # digits-FID 2.65 against the ODE solver's (dpm++) 3.76 at the same 20 calls; on this
    # run's, 2.24 against 2.37 (five seeds); --sampler ddpm for the paper's sampler.
    config.sampling.sampler = "dpm++sde"
    config.sampling.steps = 20
    config.sampling.spacing = "logsnr"
    config.sampling.batch_size = 500
    config.eval.fid_num_samples = 1000
    config.eval.fid_batch_size = 500
    config.eval.bpd_batch_size = 64
    if variant == "16px":
        _previous_default(config)
    if variant == "4px":
        _four_px(config)
    if variant in ("classifier", "classifier_tiny"):
        _classifier(config, tiny=variant == "classifier_tiny")
    if variant in ("cond", "cond_tiny"):
        _class_conditional(config, tiny=variant == "cond_tiny")
    if variant == "cond_without9":
        _class_conditional(config, tiny=False)
        config.model.num_classes = 9          # labels 0..8, null label 9
        config.data.exclude_labels = (9,)
    if variant in ("distill", "distill_tiny"):
        _distill(config, tiny=variant == "distill_tiny")
    if variant in ("finetune", "finetune_tiny"):
        _finetune(config, tiny=variant == "finetune_tiny")
    if variant in CONTROL_VARIANTS:
        _control(config, variant)
    if variant in LATENT_VARIANTS:
        _latent(config, variant)
    return base.with_variant(config, variant, "digits",
                             handled=("16px", "4px", "classifier", "classifier_tiny", "cond", "cond_tiny", "cond_without9",
                                      "distill", "distill_tiny", "finetune", "finetune_tiny",
                                      *CONTROL_VARIANTS, *LATENT_VARIANTS))


def _four_px(config: ml_collections.ConfigDict) -> None:
    """The digits at 4x4 (the 2x2 block means of the 8x8 images, the low-pass the `sr` runs
    read): the first stage of the 4x4 -> 8x8 cascade (`sample.py --workdir SR_RUN --condition
    THIS_RUN`). The default model on two levels (4x4 with attention, 2x2), 12,000 steps (13 min
    on 2 CPU cores): the cascade's digits-FID against the train digits went from 3.83 to 1.71
    with 12,000 steps instead of 3,000 (BENCHMARKS.md, "Control images")."""
    config.data.image_size = 4
    config.model.ch_mult = (1, 2)          # 4x4, 2x2
    config.model.attn_resolutions = (4,)
    config.training.num_steps = 12000      # 16 steps/s: a 4x4 step costs a tenth of an 8x8 one


CONTROL_VARIANTS = ("controlnet", "controlnet_tiny", "sr", "sr_tiny", "sr16")


def _control(config: ml_collections.ConfigDict, variant: str) -> None:
    """Control images (docs/control.md). controlnet: a ControlNet on the run named by
    --config.control.base (the default run or `cond`), the 4x4 low-pass as control
    (--config.control.kind=edges for edge maps), 4,000 steps (13 min on 2 CPU cores; at 1,500
    steps 87.5% of its held-out outputs read as the source digit, at 4,000 91.9%); sr:
    super-resolution 4x4 -> 8x8 by concatenation, trained from scratch with 10% null
    conditions, 2,000 steps (at 8,000 the SR alone is better, held-out digits-FID 0.76 against
    1.37, but the 4x4 -> 8x8 cascade worse, 1.21x / 1.20x the default's against 1.15x /
    1.14x); sr16: the 16px model (`16px`) conditioned on the 8x8 digits, 2,000 steps (8 min),
    its 1,000-step ancestral sampler (held-out PSNR 40.2 dB; 34.3 dB with --sampler dpm++sde
    --steps 20; draw it without condition guidance). None writes periodic sample grids (they
    need control images: sample.py --control / --condition)."""
    if variant == "sr16":
        _previous_default(config)
    config.control.kind = "lowres"
    config.control.factor = 2
    config.training.num_sample_images = 0
    if variant.startswith("controlnet"):
        config.training.num_steps = 4000
        config.training.lr = 5e-4
        config.training.warmup_steps = 50
        config.training.ema_decay = 0.995
    else:
        config.control.condition = True
        config.training.num_steps = 2000 if variant != "sr16" else config.training.num_steps
    if variant.endswith("_tiny"):
        base.make_tiny(config)
        config.training.num_sample_images = 0


LATENT_VARIANTS = ("autoencoder", "autoencoder_tiny", "autoencoder16", "latent", "latent_tiny",
                   "latent16")


def _latent(config: ml_collections.ConfigDict, variant: str) -> None:
    """Latent diffusion (docs/latent.md). `autoencoder*`: the first stage, a KL autoencoder with
    f = 2 (one halving) and 2 latent channels, L1 + 1e-6 KL, trained by the same loop (grids of
    reconstructions). `latent*`: the DDPM on its latents, scaled by LDM's measured scale factor;
    --config.latent.autoencoder names the finished autoencoder run (default runs/digits_
    autoencoder, runs/digits_autoencoder16, runs/digits_autoencoder_tiny). 16: the 16px data
    (16x16 -> 8x8x2 latents, the 16px UNet with attention at 4x4); 8px: 4x4x2 latents."""
    size16, tiny = variant.endswith("16"), variant.endswith("_tiny")
    if size16:
        _previous_default(config)
    if tiny:
        base.make_tiny(config)
    config.latent.factor = 2
    config.latent.channels = 2
    config.eval.metrics = "fid"               # bits/dim of latents is no image likelihood
    if variant.startswith("autoencoder"):
        config.model.kind = "autoencoder"
        config.model.ch_mult = (1, 2)          # f = 2
        config.model.num_res_blocks = 1
        config.model.attn_resolutions = ()
        config.model.dropout = 0.0
        config.model.ch = 16                   # 16 and 32 channels: 0.1M parameters
        config.model.num_groups = 8
        config.training.batch_size = 32
        config.training.lr = 1e-3
        config.training.warmup_steps = 50
        config.training.num_steps = 800
        config.training.ema_decay = 0.99
        config.training.ema_warmup = True
        config.training.checkpoint_every = 400
        config.training.sample_every = 400     # grids of test images over their reconstructions
        config.training.num_sample_images = 18
        if tiny:
            config.model.ch = 8
            config.model.num_groups = 4
            config.training.batch_size = 8
            config.training.num_steps = 4
            config.training.checkpoint_every = 2
            config.training.sample_every = 4
            config.training.num_sample_images = 4
        return
    config.latent.autoencoder = "runs/digits_autoencoder" + ("16" if size16 else "_tiny" if tiny else "")
    config.sampling.clip_denoised = False      # latents are not bounded to [-1, 1]
    config.model.attn_resolutions = (4,) if size16 else (2,)
    if not size16 and not tiny:
        config.model.ch_mult = (1, 2)          # 4x4, 2x2


def _distill(config: ml_collections.ConfigDict, tiny: bool) -> None:
    """Progressive distillation of the default run (Salimans & Ho 2022): the student predicts v
    (the paper's choice; its output layer has the eps teacher's shape, so it starts from the
    teacher's weights with another meaning and relearns it), DDIM 64 -> 32 -> 16 -> 8 -> 4 steps
    in four rounds of 500 steps, each with its learning rate decaying linearly to 0 (the
    paper's). Name the teacher with --config.distill.teacher=runs/digits."""
    config.diffusion.mean_type = "v"
    config.model.dropout = 0.0            # the target is a deterministic map of z_t
    config.distill.teacher_steps = 64
    config.distill.rounds = 4
    config.training.num_steps = 500       # per round
    config.training.lr = 2e-4
    config.training.warmup_steps = 10
    config.training.lr_decay = "linear"
    config.training.ema_decay = 0.995
    config.training.checkpoint_every = 250
    config.training.sample_every = 500
    if tiny:
        base.make_tiny(config)
        config.distill.teacher_steps = 8
        config.distill.rounds = 1
        config.training.lr_decay = "none"


def _finetune(config: ml_collections.ConfigDict, tiny: bool) -> None:
    """Fine-tuning a class-conditional digits run (docs/finetuning.md): name the base with
    --config.finetune.base=RUN and the images with --config.finetune.images=FILE; a new class
    (the base's N classes plus one), prior preservation on 5,000 of the base's samples with
    weight 2, 1,000 steps at batch 32 (16 instance rows, 16 prior rows) at lr 2e-4, the new
    class's row at 15x that, EMA 0.998 from the base's weights without warm-up (the new row's
    EMA warms up); LoRA rank 1 (with method=lora use --config.training.lr=1e-2
    --config.finetune.row_lr_scale=1 --config.training.ema_decay=0.997; with method=embedding
    lr 1e-2 and row_lr_scale 1). docs/finetuning.md says why each of these."""
    _class_conditional(config, tiny=False)
    # model.num_classes is replaced by the base run's (+1 for the new class) at start.
    config.finetune.method = "full"
    # 500 prior samples were each seen 13 times in 400 steps: 0-8 digits-FID 7.5 against 6.5.
    config.finetune.prior_samples = 5000
    config.finetune.prior_weight = 2.0    # about 3% less drift of the old classes than 1
    config.lora.rank = 1                  # 2.0% of the digits model's parameters (all targets)
    config.lora.alpha = 1.0
    config.training.batch_size = 32
    # A lower rate disturbs the old classes more (3e-5: 1.44x their digits-FID, 1e-4: 1.22x,
    # 2e-4: 1.20x, 5e-4: 1.25x); the new row, which starts as the null row, moves faster.
    config.training.lr = 2e-4
    config.finetune.row_lr_scale = 15.0
    config.training.warmup_steps = 20
    config.training.num_steps = 1000
    # The EMA starts at the base's EMA weights, the good point: a warm-up that forgets the
    # start would leave the last ~45 raw steps (the base's own raw weights score 2x its EMA).
    # Only the new row's average forgets its start.
    config.training.ema_warmup = False
    config.finetune.row_ema_warmup = True
    config.training.ema_decay = 0.998
    config.training.checkpoint_every = 250
    config.training.sample_every = 1000
    config.training.log_every = 20
    if tiny:
        base.make_tiny(config)
        config.finetune.prior_samples = 8


def _class_conditional(config: ml_collections.ConfigDict, tiny: bool) -> None:
    """The default run conditioned on the digit's class: labels 0..9 plus the null label 10,
    dropped to null for 10% of the examples (classifier-free guidance); evaluation scores the
    conditional model (class n mod 10 for sample n) unless `--labels none` asks for the null."""
    config.model.num_classes = 10
    config.training.label_dropout = 0.1
    config.eval.labels = "balanced"
    if tiny:
        base.make_tiny(config)


def _classifier(config: ml_collections.ConfigDict, tiny: bool) -> None:
    """The noise-conditional digits classifier p(y | x_t, t) for classifier guidance of the
    default run: its down path and middle (same ch, ch_mult, blocks), a pooled head, 10 classes,
    trained with cross-entropy on x_t at uniform t by the same loop."""
    config.model.kind = "classifier"
    config.model.num_classes = 10
    config.training.label_dropout = 0.0
    config.training.num_sample_images = 0
    config.training.num_steps = 1000
    config.training.lr = 1e-3
    config.training.ema_decay = 0.99
    config.training.checkpoint_every = 500
    if tiny:
        base.make_tiny(config)
        config.training.num_sample_images = 0


def _previous_default(config: ml_collections.ConfigDict) -> None:
    """The default before the study: digits upsampled (bicubic) to 16x16, 1.1M parameters."""
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = (8,)
    config.model.num_groups = 32
    config.data.image_size = 16
    config.training.batch_size = 32
    config.training.num_steps = 2000
    config.training.ema_decay = 0.995
    config.training.ema_warmup = False
    config.training.sample_every = 1000
    config.sampling.sampler = "ddpm"      # the previous default's sampler: all 1000 steps
    config.sampling.steps = 1000
    config.sampling.spacing = "time"
    config.sampling.batch_size = 64
    config.eval.fid_batch_size = 256
    config.eval.bpd_batch_size = 32
