"""Evaluates a trained DDPM: bits/dim, FID / IS / KID with the protocol printed and saved.

    python evaluate.py --workdir runs/digits --metrics bpd,fid,is --num_samples 1000

See `ddpm_jax/evaluate.py` (or --helpfull) for every flag.
"""

from ddpm_jax.evaluate import run

if __name__ == "__main__":
    run()
