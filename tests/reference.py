"""Float64 NumPy (and SciPy) reference implementations that tests compare the code against.

Written from REFERENCE.md's formulas and the official code, never by calling ddpm_jax. The
references of diffusion.py (tests/test_diffusion.py, over its own float64 tables) and the
Python-loop samplers of tests/test_sampling.py stay beside their tests.
"""

import math

import numpy as np
import scipy.linalg
import scipy.special


# ---------------------------- schedules (test_schedule.py, test_plans.py, test_sampling.py)


def scaled_linear(num_timesteps: int) -> np.ndarray:
    """The paper's 1e-4..0.02 linear schedule stretched to T steps (abar_T ~ 4e-5 at any T)."""
    scale = 1000 / num_timesteps
    return np.linspace(1e-4 * scale, 0.02 * scale, num_timesteps, dtype=np.float64)


def reference_betas(name, T, start=1e-4, end=0.02):
    """The official schedules, written out one by one in float64."""
    if name == "linear":
        return np.linspace(start, end, T, dtype=np.float64)
    if name == "quad":
        return np.linspace(start**0.5, end**0.5, T, dtype=np.float64) ** 2
    if name == "const":
        return np.full(T, end, dtype=np.float64)
    if name == "jsd":
        return 1.0 / np.linspace(T, 1, T, dtype=np.float64)
    if name in ("warmup10", "warmup50"):
        betas = np.full(T, end, dtype=np.float64)
        warmup = int(T * (0.1 if name == "warmup10" else 0.5))
        betas[:warmup] = np.linspace(start, end, warmup, dtype=np.float64)
        return betas
    if name == "cosine":
        s = 0.008

        def abar(u):
            return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

        return np.array([min(1 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)])
    raise AssertionError(name)


def reference_tables(betas):
    """GaussianDiffusion2's derived arrays, float64, written from the paper's formulas."""
    betas = np.asarray(betas, np.float64)
    alphas = 1.0 - betas
    abar = np.cumprod(alphas)
    abar_prev = np.append(1.0, abar[:-1])
    post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
    with np.errstate(divide="ignore"):
        post_logvar_clipped = np.log(np.append(post_var[1], post_var[1:]))
        fixedlarge = np.append(post_var[1], betas[1:])
        return {
            "betas": betas,
            "alphas_cumprod": abar,
            "alphas_cumprod_prev": abar_prev,
            "sqrt_alphas_cumprod": np.sqrt(abar),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - abar),
            "log_one_minus_alphas_cumprod": np.log(1.0 - abar),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / abar),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / abar - 1.0),
            "posterior_variance": post_var,
            "posterior_log_variance_clipped": post_logvar_clipped,
            "posterior_mean_coef1": betas * np.sqrt(abar_prev) / (1.0 - abar),
            "posterior_mean_coef2": (1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar),
            "fixedlarge_variance": fixedlarge,
            "fixedlarge_log_variance": np.log(fixedlarge),
        }


# ------------------------------------------------------------- UNet layers (test_layers.py)


def np_group_norm(x, scale, bias, groups, eps):
    """float64 reference: statistics over (H, W, C/G) of each image and group."""
    b, h, w, c = x.shape
    xg = x.astype(np.float64).reshape(b, h * w, groups, c // groups)
    mean = xg.mean(axis=(1, 3), keepdims=True)
    var = ((xg - mean) ** 2).mean(axis=(1, 3), keepdims=True)
    return ((xg - mean) / np.sqrt(var + eps)).reshape(b, h, w, c) * scale + bias


def np_conv(x, kernel, stride, pad):
    """float64 reference cross-correlation; pad = ((top, bottom), (left, right))."""
    x = np.pad(x.astype(np.float64), ((0, 0), pad[0], pad[1], (0, 0)))
    k = kernel.shape[0]
    out_h = (x.shape[1] - k) // stride + 1
    out_w = (x.shape[2] - k) // stride + 1
    out = np.zeros((x.shape[0], out_h, out_w, kernel.shape[3]))
    for i in range(k):
        for j in range(k):
            patch = x[:, i:i + stride * out_h:stride, j:j + stride * out_w:stride, :]
            out += np.einsum("bhwc,co->bhwo", patch, kernel[i, j].astype(np.float64))
    return out


# ------------------------------------------------- sample-quality metrics (test_metrics.py)


def fid_reference(mu1, sigma1, mu2, sigma2):
    # tr((S1 S2)^{1/2}) = tr((S1^{1/2} S2 S1^{1/2})^{1/2}): a symmetric PSD matrix, so its root
    # comes from `eigh` (no `sqrtm`, no complex arithmetic): an independent route to the answer.
    w, v = scipy.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    inner = scipy.linalg.eigvalsh(root1 @ sigma2 @ root1)
    trace_sqrt = np.sum(np.sqrt(np.clip(inner, 0.0, None)))
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def mmd2_unbiased_loops(x, y):
    def k(a, b):
        return (np.dot(a, b) / a.shape[0] + 1.0) ** 3
    m = x.shape[0]
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


# ------------------------------------------------------- DPM-Solver++ plans (test_plans.py)


def _chain_alpha_sigma_lambda(betas, kept):
    """alpha_i, sigma_i and lambda_i = log(alpha_i / sigma_i) at the kept timesteps, float64."""
    abar = np.cumprod(1.0 - betas)[kept]
    alpha, sigma = np.sqrt(abar), np.sqrt(1.0 - abar)
    return alpha, sigma, np.log(alpha / sigma)


def reference_dpm_weights(betas, kept, order):
    """(coef_xt, weights on x0_hat at i, i+1, i+2) per chain index, from REFERENCE.md's
    DPM-Solver++ formulas with diffusers' order rules, in float64."""
    alpha, sigma, lam = _chain_alpha_sigma_lambda(betas, kept)
    S = len(kept)
    out = []
    for i in range(S):
        taken = S - 1 - i
        k = min(order, taken + 1, 2 if (i == 1 and S < 15) else order)
        if i == 0:
            out.append((0.0, [1.0, 0.0, 0.0]))
            continue
        h = lam[i - 1] - lam[i]
        base = alpha[i - 1] * (1.0 - np.exp(-h))
        if k == 1:
            w = [base, 0.0, 0.0]
        elif k == 2:
            r = (lam[i] - lam[i + 1]) / h
            w = [base * (1 + 1 / (2 * r)), -base / (2 * r), 0.0]
        else:
            w = None  # order 3 is checked in the chain test only
        out.append((sigma[i - 1] / sigma[i], w))
    return out


# -------------------------------------------------------------- bits/dim (test_evaluate.py)


def numpy_bound(betas, a, b, x0, noise, mean_type, var_type, clip):
    """The variational bound in bits/dim, per image, written out in float64 NumPy.

    x0: [N, D] in [-1, 1]; noise: [N, T, D]; returns (total [N], terms [N, T], prior [N]).
    """
    alphas = 1.0 - betas
    abar = np.cumprod(alphas)
    abar_prev = np.append(1.0, abar[:-1])
    post_var = betas * (1 - abar_prev) / (1 - abar)
    post_logvar = np.log(np.append(post_var[1], post_var[1:]))
    model_logvar = post_logvar if var_type == "fixedsmall" else np.log(np.append(post_var[1], betas[1:]))
    coef_x0 = betas * np.sqrt(abar_prev) / (1 - abar)
    coef_xt = (1 - abar_prev) * np.sqrt(alphas) / (1 - abar)
    n, num_t, _ = noise.shape
    terms = np.zeros((n, num_t))
    for i in range(n):
        for t in range(num_t):
            x_t = np.sqrt(abar[t]) * x0[i] + np.sqrt(1 - abar[t]) * noise[i, t]
            out = a[t] * x_t + b[t]
            x0_hat = (x_t - np.sqrt(1 - abar[t]) * out) / np.sqrt(abar[t]) if mean_type == "eps" else out
            if clip:
                x0_hat = np.clip(x0_hat, -1, 1)
            mean = coef_x0[t] * x0_hat + coef_xt[t] * x_t
            if t == 0:
                std = np.exp(0.5 * model_logvar[0])
                upper = np.where(x0[i] > 0.999, np.inf, x0[i] + 1 / 255)
                lower = np.where(x0[i] < -0.999, -np.inf, x0[i] - 1 / 255)
                prob = scipy.special.ndtr((upper - mean) / std) - scipy.special.ndtr((lower - mean) / std)
                terms[i, t] = -np.mean(np.log(np.maximum(prob, 1e-12))) / np.log(2)
            else:
                true_mean = coef_x0[t] * x0[i] + coef_xt[t] * x_t
                lv1, lv2 = post_logvar[t], model_logvar[t]
                kl = 0.5 * (-1 + lv2 - lv1 + np.exp(lv1 - lv2) + (true_mean - mean) ** 2 * np.exp(-lv2))
                terms[i, t] = np.mean(kl) / np.log(2)
    m, v = np.sqrt(abar[-1]) * x0, 1 - abar[-1]
    prior = np.mean(0.5 * (-1 - np.log(v) + v + m ** 2), axis=1) / np.log(2)
    return prior + terms.sum(1), terms, prior


# ------------------------------------- Gaussian data (test_sampling.py, test_editing.py)

def assert_follows_gaussian(x, mean, var):
    """The draws x (float64, flattened) have mean `mean` and variance `var`, each within 5
    standard errors of its estimate."""
    assert abs(x.mean() - mean) < 5 * np.sqrt(var / x.size), (x.mean(), mean)
    assert abs(x.std() - np.sqrt(var)) < 5 * np.sqrt(var / (2 * x.size)), (x.std(), np.sqrt(var))


def gaussian_chain_law(betas, kept, mu, s, sampler, eta=0.0, start=(0.0, 1.0)):
    """Exact mean and variance of the chain's output for data N(mu, s^2) with the optimal eps
    and no clipping: every step is affine in x_t plus Gaussian noise, so iterate the moments.
    kept: the chain's original timesteps (ascending); start: (mean, variance) of its first
    state (N(0, 1); SDEdit: q(x_t0 | x_guide)). Returns the output's (mean, variance)."""
    abar_all = np.cumprod(1.0 - betas)
    mean, var = start
    for i in range(len(kept) - 1, -1, -1):
        abar, abar_prev = abar_all[kept[i]], (abar_all[kept[i - 1]] if i > 0 else 1.0)
        # eps_hat = e1 x + e0 (E[eps | x_t] for Gaussian data); x0_hat = (x - sqrt(1-a) eps)/sqrt(a)
        e1 = np.sqrt(1 - abar) / (abar * s**2 + 1 - abar)
        e0 = -e1 * np.sqrt(abar) * mu
        x0_1 = (1 - np.sqrt(1 - abar) * e1) / np.sqrt(abar)
        x0_0 = -np.sqrt(1 - abar) * e0 / np.sqrt(abar)
        beta = 1 - abar / abar_prev
        if sampler == "ddpm":  # fixedsmall: posterior mean and beta~
            c_x0 = np.sqrt(abar_prev) * beta / (1 - abar)
            c_x = np.sqrt(1 - beta) * (1 - abar_prev) / (1 - abar)
            noise_var = (1 - abar_prev) / (1 - abar) * beta
            a1, a0 = c_x0 * x0_1 + c_x, c_x0 * x0_0
        else:
            noise_var = eta**2 * (1 - abar_prev) / (1 - abar) * beta
            k = np.sqrt(1 - abar_prev - noise_var)
            a1 = np.sqrt(abar_prev) * x0_1 + k * e1
            a0 = np.sqrt(abar_prev) * x0_0 + k * e0
        mean, var = a1 * mean + a0, a1**2 * var + (noise_var if i > 0 else 0.0)
    return mean, var


# ------------------------------------------- SDE-DPM-Solver++ (test_plans.py, test_sampling.py)

def reference_sde_dpm_weights(betas, kept, order):
    """(coef_xt, [weight of x0_hat at i, at i+1], noise scale) per chain index for
    SDE-DPM-Solver++ (Lu et al. 2022b; the 2M "midpoint" form that diffusers' sde-dpmsolver++
    uses), from s = t_i to t = t_{i-1}, h = lambda_t - lambda_s, float64:
        x_t = sigma_t / sigma_s e^{-h} x_s + alpha_t (1 - e^{-2h}) (D0 + D1 / 2)
              + sigma_t sqrt(1 - e^{-2h}) z,   D0 = m_s, D1 = (m_s - m_prev) h / h_prev.
    Written with e^{-h} = alpha_s sigma_t / (sigma_s alpha_t). Same order rules as the ODE."""
    alpha, sigma, lam = _chain_alpha_sigma_lambda(betas, kept)
    S = len(kept)
    out = []
    for i in range(S):
        k = min(order, S - i, 2 if (i == 1 and S < 15) else order)
        if i == 0:
            out.append((0.0, [1.0, 0.0], 0.0))
            continue
        decay = alpha[i] * sigma[i - 1] / (sigma[i] * alpha[i - 1])     # e^{-h}
        gain = alpha[i - 1] * (1.0 - decay**2)
        noise = sigma[i - 1] * np.sqrt(1.0 - decay**2)
        if k == 1:
            w = [gain, 0.0]
        else:
            d1 = (lam[i - 1] - lam[i]) / (lam[i] - lam[i + 1])          # D1 = d1 (m_s - m_prev)
            w = [gain * (1.0 + 0.5 * d1), -gain * 0.5 * d1]
        out.append((sigma[i - 1] / sigma[i] * decay, w, noise))
    return out


def gaussian_sde_dpm_law(betas, kept, mu, s, order):
    """Exact (mean, variance) of SDE-DPM-Solver++'s output for data N(mu, s^2) with the optimal
    eps and no clipping: the state (x_i, x0_hat_{i+1}) evolves affinely plus Gaussian noise, so
    iterate its mean vector and 2x2 covariance."""
    abar_all = np.cumprod(1.0 - betas)
    mean, cov = np.zeros(2), np.diag([1.0, 0.0])
    for i, (c, w, n) in reversed(list(enumerate(reference_sde_dpm_weights(betas, kept, order)))):
        abar = abar_all[kept[i]]
        e1 = np.sqrt(1 - abar) / (abar * s**2 + 1 - abar)      # E[eps | x_t] = e1 x + e0
        e0 = -e1 * np.sqrt(abar) * mu
        x0_1 = (1 - np.sqrt(1 - abar) * e1) / np.sqrt(abar)    # x0_hat = x0_1 x + x0_0
        x0_0 = -np.sqrt(1 - abar) * e0 / np.sqrt(abar)
        A = np.array([[c + w[0] * x0_1, w[1]], [x0_1, 0.0]])
        b = np.array([w[0] * x0_0, x0_0])
        mean, cov = A @ mean + b, A @ cov @ A.T + np.diag([n**2, 0.0])
    return mean[0], cov[0, 0]


# ------------------------------------ EDM steps and the Langevin corrector (test_samplers_ct.py)

def reference_heun_step(x, x0_fn, abar, abar_next):
    """One step of EDM's Alg. 1 (Karras et al. 2022) from a VP state x at abar to abar_next
    (1: sigma' = 0, the Euler step alone), in EDM's variables x~ = x / sqrt(abar),
    sigma = sqrt((1 - abar) / abar), float64. x0_fn(x_vp, level): the denoiser D at the VP
    state x_vp, level 0 (abar) or 1 (abar_next). Returns the VP state at abar_next."""
    alpha, alpha_next = np.sqrt(abar), np.sqrt(abar_next)
    sigma, sigma_next = np.sqrt((1 - abar) / abar), np.sqrt((1 - abar_next) / abar_next)
    x_edm = x / alpha
    d = (x_edm - x0_fn(x, 0)) / sigma
    x_next = x_edm + (sigma_next - sigma) * d
    if sigma_next > 0:
        d_next = (x_next - x0_fn(alpha_next * x_next, 1)) / sigma_next
        x_next = x_edm + (sigma_next - sigma) * 0.5 * (d + d_next)
    return alpha_next * x_next


def reference_langevin_step(x, score, z, snr, alpha):
    """score_sde's LangevinCorrector step with per-example norms, float64: x [B, D]."""
    score_norm = np.linalg.norm(score, axis=1, keepdims=True)
    noise_norm = np.linalg.norm(z, axis=1, keepdims=True)
    step = 2 * alpha * (snr * noise_norm / score_norm) ** 2
    return x + step * score + np.sqrt(2 * step) * z
