"""Every knob once, with the official CIFAR-10 values; experiment files override a few fields.

`config.model` holds exactly the keyword arguments of `ddpm_jax.models.unet.UNet` except `dtype`
(from training.compute_dtype), plus `kind` (the UNet, or the noise-conditional classifier built
from its down path); `ddpm_jax.config.model_from_config` builds the module and fills
`out_channels`. `ddpm_jax.config.validate` checks every value at start-up.
"""

import ml_collections
from ml_collections.config_dict import placeholder


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    config.model = dict(
        ch=128,                       # base channels (stem conv, first level, time embedding dim)
        ch_mult=(1, 2, 2, 2),         # channel multiplier per level; len - 1 stride-2 downsamples
        num_res_blocks=2,             # ResBlocks per down level; up levels get one more
        attn_resolutions=(16,),       # feature-map sizes with self-attention after every ResBlock
        dropout=0.1,                  # inside every ResBlock, before its second conv
        out_channels=placeholder(int),  # None: data.channels, doubled for learned variances
        num_classes=placeholder(int),   # None: unconditional; N: labels 0..N-1 plus null label N
        remat=False,                  # recompute block activations in the backward pass (memory)
        resamp_with_conv=True,        # strided-conv down / conv-after-nearest up (else avg-pool / none)
        num_groups=32,                # GroupNorm groups; every level's channels must divide by it
        kind="unet",                  # unet: the denoiser | classifier: p(y | x_t, t) for classifier
                                      # guidance (the UNet's down path + middle + a pooled head,
                                      # num_classes outputs, trained with cross-entropy) |
                                      # autoencoder: a latent-diffusion first stage (config.latent)
    )

    config.diffusion = dict(
        timesteps=1000,               # T; arrays indexed by 0-based t in {0..T-1}
        schedule="linear",            # linear | quad | const | jsd | warmup10 | warmup50 | cosine
        beta_start=1e-4,              # first beta of the linear-type schedules
        beta_end=0.02,                # last beta
        mean_type="eps",              # what the network predicts: eps | xstart | xprev | v
        var_type="fixedlarge",        # fixedlarge (beta_t) | fixedsmall (beta~_t) | learned | learned_range
        loss_type="mse",              # mse (L_simple) | kl (the bound) | hybrid (mse + bound for variance)
    )

    config.data = dict(
        dataset="cifar10",            # cifar10 | digits | celebahq | lsun_* | folder | tfds:<name>
        image_size=32,                # H = W in pixels
        channels=3,                   # C
        random_flip=True,             # random horizontal flips during training
        data_dir=placeholder(str),    # TFDS / data root; None: the library default
        exclude_labels=(),            # classes left out of the training split (a held-out class
                                      # for fine-tuning experiments, docs/finetuning.md)
    )

    config.training = dict(
        batch_size=128,               # global batch, split over all devices
        lr=2e-4,                      # Adam learning rate after warmup
        warmup_steps=5000,            # linear learning-rate warmup from 0
        lr_decay="none",              # after the warmup: none (constant, the paper) | cosine | linear (to 0 at num_steps)
        grad_clip=1.0,                # global-norm gradient clipping; None disables it
        ema_decay=0.9999,             # EMA of the parameters, used for sampling and evaluation
        ema_warmup=False,             # decay min(ema_decay, (1+n)/(10+n)) at update n (the paper: off)
        loss_weight="uniform",        # uniform (L_simple, the paper) | min_snr (Min-SNR-gamma weighting)
        min_snr_gamma=5.0,            # gamma of loss_weight='min_snr'
        num_steps=800_000,            # optimizer steps in total
        adam_eps=1e-8,                # Adam epsilon
        seed=0,                       # initialisation, noise and data-order seed
        log_every=100,                # steps between metric writes
        checkpoint_every=10_000,      # steps between checkpoints
        keep_checkpoints=3,           # newest checkpoints kept on disk
        keep_every=placeholder(int),  # also keep every checkpoint at a multiple of this step; None: no
        sample_every=50_000,          # steps between sample grids (EMA weights)
        num_sample_images=64,         # images in each sample grid
        grid_tile_px=64,              # grid tiles upscaled (nearest) to at least this many pixels
        label_dropout=0.1,            # class-conditional models: share of labels set to the null
                                      # label, which then learns the unconditional model that
                                      # sample grids, sample.py and evaluation draw from
        compute_dtype="float32",      # float32 | bfloat16 UNet compute; parameters stay float32
        max_nonfinite_in_a_row=10,    # stop after this many consecutive non-finite losses
        steps_per_dispatch=1,         # train steps fused into one jitted call
        microbatches=1,               # gradient accumulation: each step's batch runs as this many
                                      # equal slices in turn (same update; less activation memory
                                      # on GPU / TPU, faster on the CPU; README "Scale-out")
    )

    config.sampling = dict(
        sampler="ddpm",               # ddpm (ancestral) | ddim | dpm++ (DPM-Solver++, ODE) | dpm++sde (its SDE variant)
        steps=1000,                   # reverse steps S <= T (fewer respaces), 'ddimS', or None: all T
        spacing="time",               # time (as steps says) | logsnr (S steps uniform in log-SNR; int steps)
                                      # | trailing (t = round(k T / S) - 1, k = 1..S; int steps)
        order=2,                      # solver order: dpm++ 1..3 (1 = DDIM eta 0), dpm++sde 1..2 (1 = DDIM eta 1)
        eta=0.0,                      # DDIM noise: 0 deterministic, 1 matches DDPM's beta~
        clip_denoised=True,           # clip the predicted x0 to [-1, 1], as the official sampler
        threshold=placeholder(float),  # dynamic thresholding percentile (Imagen: 0.995) instead of the clip; None: off
        var_type=placeholder(str),    # None: diffusion.var_type; else fixedlarge | fixedsmall
        batch_size=256,               # images per sampling call
    )

    config.eval = dict(
        every_steps=0,                # evaluate the EMA weights during training every N steps; 0: never
        metrics="bpd,fid,is",         # comma-separated, see ddpm_jax/evaluate.py
        feature_net=placeholder(str),   # FID/IS features: digits | inception; None: digits for digits
        inception_weights=placeholder(str),  # path of the Inception weights file (feature_net inception)
        fid_num_samples=50_000,       # generated images for FID / IS (the paper's 50k)
        fid_reference="train",        # statistics of this split; the paper compares to train
        fid_batch_size=256,           # generated images per sampler call during evaluation
        labels="none",                # class-conditional runs: none (null label) | balanced (n mod N)
        guidance=placeholder(float),  # classifier-free guidance weight for labels=balanced; None: none
        bpd_split="test",             # split for bits/dim
        bpd_num_images=placeholder(int),  # None: the whole split
        bpd_batch_size=64,            # images per bits/dim evaluation call (T network passes each)
    )
    config.distill = dict(
        teacher=placeholder(str),     # progressive distillation: the teacher run's work dir; None:
                                      # an ordinary run. The student starts from its EMA weights
                                      # (same model and schedule; diffusion.mean_type may differ)
        teacher_step=placeholder(int),  # the teacher's checkpoint; None: its newest (pinned at start)
        teacher_steps=64,             # N: the teacher's DDIM steps (trailing grid); students learn N/2
        teacher_sampler="ddim",       # the chain distilled: ddim (eta 0) only, a deterministic map
        teacher_eta=0.0,              # must be 0: a stochastic teacher chain cannot be distilled
        rounds=1,                     # halvings in one command: round k in WORKDIR/round_k learns
                                      # N / 2^k steps from round k-1 (round 1: from teacher)
        first_round_steps=placeholder(int),  # round 1's training steps; None: training.num_steps
                                      # (round 1 also relearns the output's meaning, eps -> v)
    )
    config.finetune = dict(           # fine-tuning a trained run (docs/finetuning.md)
        base=placeholder(str),        # the base run's work dir; None: an ordinary run. Its EMA
                                      # weights are loaded by tree path; model.num_classes is
                                      # the base's (+1 with new_class)
        base_step=placeholder(int),   # the base's checkpoint; None: its newest (pinned at start)
        method="full",                # full | lora (config.lora adapters) | embedding (only the
                                      # taught class's embedding row trains)
        images=placeholder(str),      # the few images: a PNG grid (grid_cells tiles) or an .npz
                                      # with uint8 'images' [N, H, W, C]
        grid_cells=placeholder(int),  # tiles in a PNG grid; None: the PNG is one image
        new_class=True,               # add a class: id N for a base of N classes; the null label
                                      # of guidance moves from N to N + 1
        label=placeholder(int),       # new_class False: the existing class (0..N-1) the images
                                      # are taught as; None: the null label / unconditional
        prior_weight=1.0,             # lambda of the prior-preservation term (0: off)
        prior_samples=500,            # base samples of its classes drawn once into the run
        row_lr_scale=1.0,             # the taught class's embedding row learns at training.lr
                                      # times this (every method; the new row starts as the
                                      # base's null row)
        row_ema_warmup=False,         # that row's EMA warms up (forgets its start, the null
                                      # row) even where training.ema_warmup is off
    )
    config.lora = dict(               # LoRA adapters of finetune.method='lora'
        rank=4,                       # r
        alpha=4.0,                    # the update is (alpha / r) down @ up
        targets=("attn", "time", "conv"),  # attn: q/k/v/proj_out, time: time-embedding
                                      # projections, conv: every convolution kernel
    )
    config.control = dict(            # control images (docs/control.md)
        base=placeholder(str),        # ControlNet: the frozen base run's work dir; None: none
        base_step=placeholder(int),   # the base's checkpoint; None: its newest (pinned at start)
        kind="lowres",                # the control / condition image of a training image:
                                      # lowres (k x k block means) | edges (Sobel) | mask (top half)
                                      # | data (given with the data: control.data_file)
        factor=2,                     # lowres: k
        data_file=placeholder(str),   # kind data: an .npz whose 'control' is uint8 [N, H, W, C_c],
                                      # row n the control of example n of the train split (stored order)
        channels=placeholder(int),    # kind data: C_c; None: data.channels
        hint_channels=(16, 16),       # ControlNet: the control image's 3x3 convolution stack
        condition=False,              # the UNet reads [x_t, condition image] (SR3), from scratch
        condition_dropout=0.1,        # condition: share of rows trained on the null (zero) image
    )
    config.latent = dict(             # latent diffusion and its first stage (docs/latent.md)
        autoencoder=placeholder(str), # a latent run: the finished autoencoder run's work dir
                                      # (model.kind='autoencoder'); None: diffusion on pixels
        autoencoder_step=placeholder(int),  # its checkpoint; None: its newest (pinned at start)
        scale=placeholder(float),     # latents are multiplied by it: None measures 1 / std of the
                                      # first training batch's latents at start (LDM's scale
                                      # factor), stored with the run's checkpoints
        factor=2,                     # f: latents are image_size / f per side
        channels=2,                   # c: latent channels
        kl_weight=1e-6,               # model.kind='autoencoder': weight of the KL term (per pixel)
        reconstruction="l1",          # model.kind='autoencoder': l1 | l2
    )
    return config


def configure_256px(config: ml_collections.ConfigDict, dataset: str, num_steps: int) -> None:
    """The official CelebA-HQ / LSUN 256x256 setup (Ho et al. 2020, Appendix B)."""
    config.model.ch_mult = (1, 1, 2, 2, 4, 4)
    config.model.dropout = 0.0
    config.diffusion.var_type = "fixedsmall"
    config.data.dataset = dataset
    config.data.image_size = 256
    config.training.lr = 2e-5
    config.training.batch_size = 64
    config.training.num_steps = num_steps
    config.sampling.batch_size = 64


def with_variant(config: ml_collections.ConfigDict, variant: str | None, name: str,
                 handled: tuple[str, ...] = ()) -> ml_collections.ConfigDict:
    """Applies the variant after ':' in `--config configs/NAME.py:VARIANT` ('' or 'tiny');
    `handled` names the variants the experiment file applied itself (for the error message)."""
    if variant == "tiny":
        make_tiny(config)
    elif variant and variant not in handled:
        choices = ", ".join(repr(v) for v in ("", "tiny", *handled))
        raise ValueError(f"unknown variant {variant!r} for configs/{name}.py: use one of {choices}.")
    return config


def make_tiny(config: ml_collections.ConfigDict) -> None:
    """Shrinks any experiment to seconds on a CPU (tests, smoke runs): same dataset, <= 32px."""
    num_levels = 2
    config.data.image_size = min(config.data.image_size, 32)
    config.model.ch = 16
    config.model.num_groups = 8
    config.model.ch_mult = (1, 2)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = (config.data.image_size // 2 ** (num_levels - 1),)
    config.training.batch_size = 8
    config.training.warmup_steps = 2
    config.training.num_steps = 10
    config.training.log_every = 1
    config.training.checkpoint_every = 5
    config.training.sample_every = 5
    config.training.num_sample_images = 4
    config.sampling.sampler = "ddim"
    config.sampling.spacing = "time"
    config.sampling.steps = 10
    config.sampling.batch_size = 4
    config.eval.fid_num_samples = 16
    config.eval.fid_batch_size = 8
    config.eval.bpd_num_images = 4
    config.eval.bpd_batch_size = 2
