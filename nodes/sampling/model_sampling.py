"""The discrete variance-preserving noise schedule of Stable Diffusion 1.x/2.x/SDXL.

Samplers work in the "variance exploding" parametrisation of Karras et al. 2022: a noisy latent is
``x = x0 + sigma * eps``. The UNet was trained on the VP form ``sqrt(a) x0 + sqrt(1-a) eps`` at an
integer timestep; this class converts between the two (c_in scaling, sigma <-> timestep) and turns
the UNet's raw output (epsilon or v) into a denoised estimate.
"""

from __future__ import annotations

import math

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "x0")
BETA_SCHEDULES = ("scaled_linear", "linear")


def make_betas(beta_schedule: str, timesteps: int, linear_start: float, linear_end: float) -> torch.Tensor:
    """Per-timestep betas in float64 (rounding here shifts every sigma of the table)."""
    if beta_schedule == "scaled_linear":
        # SD's schedule: linear in sqrt(beta)
        return torch.linspace(linear_start**0.5, linear_end**0.5, timesteps, dtype=torch.float64) ** 2
    if beta_schedule == "linear":
        return torch.linspace(linear_start, linear_end, timesteps, dtype=torch.float64)
    raise ValueError(f"unknown beta_schedule {beta_schedule!r}; expected one of {BETA_SCHEDULES}")


def _bcast(sigma: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """Shape a scalar or per-batch sigma so it broadcasts against a [B, ...] tensor."""
    sigma = torch.as_tensor(sigma, dtype=like.dtype, device=like.device)
    if sigma.ndim == 0:
        return sigma
    return sigma.reshape(sigma.shape[:1] + (1,) * (like.ndim - 1))


class DiscreteSchedule:
    """SD's 1000-step discrete schedule as a sigma table (ComfyUI's ModelSamplingDiscrete + EPS/V_PREDICTION)."""

    def __init__(
        self,
        prediction_type: str = "epsilon",
        beta_schedule: str = "scaled_linear",
        linear_start: float = 0.00085,
        linear_end: float = 0.012,
        timesteps: int = 1000,
        sigma_data: float = 1.0,
        zsnr: bool = False,
    ) -> None:
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")
        self.prediction_type = prediction_type
        self.beta_schedule = beta_schedule
        self.sigma_data = float(sigma_data)
        betas = make_betas(beta_schedule, timesteps, linear_start, linear_end)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        sigmas64 = ((1.0 - alphas_cumprod) / alphas_cumprod) ** 0.5
        if zsnr:
            sigmas64 = zero_terminal_snr_sigmas(sigmas64)
        self.zsnr = zsnr
        self._set_sigmas(sigmas64)

    def _set_sigmas(self, sigmas64: torch.Tensor) -> None:
        sigmas64 = sigmas64.double()
        self.alphas_cumprod = (1.0 / (sigmas64 * sigmas64 + 1.0)).float()
        # The public table is float32 (as the checkpoints' own buffers); interpolation uses float64 logs
        # so sigma(timestep(s)) round-trips to float32 precision.
        self.sigmas = sigmas64.float()
        self._log_sigmas64 = sigmas64.log()
        self.log_sigmas = self._log_sigmas64.float()
        self._tables: dict[tuple, torch.Tensor] = {}

    # -- table ends ---------------------------------------------------------------------------------
    @property
    def sigma_min(self) -> torch.Tensor:
        return self.sigmas[0]

    @property
    def sigma_max(self) -> torch.Tensor:
        return self.sigmas[-1]

    @property
    def num_timesteps(self) -> int:
        return int(self.sigmas.shape[0])

    # -- sigma <-> timestep ---------------------------------------------------------------------------
    def _log_table(self, device: torch.device) -> tuple[torch.Tensor, torch.dtype]:
        """The float64 log-sigma table on ``device`` (cached: samplers query it every model call)."""
        dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
        key = (device, dtype)
        table = self._tables.get(key)
        if table is None:
            table = self._log_sigmas64.to(device=device, dtype=dtype)
            self._tables[key] = table
        return table, dtype

    def timestep(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """Continuous timestep for sigma, interpolating linearly in log-sigma between table entries.

        Values outside the table clamp to 0 / len-1 (sigma 0 maps to timestep 0). Computed on sigma's
        device, so sampling on a GPU never round-trips through the host here.
        """
        sigma_t = torch.as_tensor(sigma)
        out_dtype = sigma_t.dtype if sigma_t.is_floating_point() else torch.float32
        table, work = self._log_table(sigma_t.device)
        log_sigma = sigma_t.detach().to(work).clamp(min=1e-30).log()
        flat = log_sigma.reshape(-1)
        low = (torch.searchsorted(table, flat, right=True) - 1).clamp(0, table.shape[0] - 2)
        lo, hi = table[low], table[low + 1]
        w = ((flat - lo) / (hi - lo)).clamp(0.0, 1.0)
        t = (low.to(work) + w).reshape(log_sigma.shape)
        return t.to(dtype=out_dtype)

    def sigma(self, timestep: torch.Tensor | float) -> torch.Tensor:
        """Inverse of ``timestep``: log-linear interpolation of the sigma table at a (fractional) timestep."""
        t_in = torch.as_tensor(timestep)
        out_dtype = t_in.dtype if t_in.is_floating_point() else torch.float32
        table, work = self._log_table(t_in.device)
        t = t_in.detach().to(work).clamp(0, self.num_timesteps - 1)
        low = t.floor().long().clamp(max=self.num_timesteps - 2)
        w = t - low
        log_sigma = (1.0 - w) * table[low] + w * table[low + 1]
        return log_sigma.exp().to(dtype=out_dtype)

    def percent_to_sigma(self, percent: float) -> float:
        """Sampling progress in [0, 1] -> sigma (used for start_percent/end_percent of conditionings)."""
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        return float(self.sigma(torch.tensor((1.0 - percent) * (self.num_timesteps - 1), dtype=torch.float64)))

    # -- model input/output ---------------------------------------------------------------------------
    def calculate_input(self, sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
        """c_in: scale the VE-noised latent to the unit-variance input the UNet was trained on."""
        s = _bcast(sigma, x)
        return x / (s * s + self.sigma_data**2) ** 0.5

    def calculate_denoised(self, sigma: torch.Tensor | float, model_output: torch.Tensor,
                           x: torch.Tensor) -> torch.Tensor:
        """Denoised estimate x0 from the raw UNet output (epsilon or v) and the un-scaled noisy input x."""
        s = _bcast(sigma, model_output)
        if self.prediction_type == "epsilon":
            return x - model_output * s
        if self.prediction_type == "x0":
            return model_output
        sd2 = self.sigma_data**2
        return x * sd2 / (s * s + sd2) - model_output * s * self.sigma_data / (s * s + sd2) ** 0.5

    def noise_scaling(
        self,
        sigma: torch.Tensor | float,
        noise: torch.Tensor,
        latent_image: torch.Tensor,
        max_denoise: bool = False,
    ) -> torch.Tensor:
        """Starting point of sampling: the latent noised to sigma.

        At full denoise the prior is N(0, 1 + sigma_max^2) (VP at t=T), hence sqrt(1 + sigma^2).
        """
        s = _bcast(sigma, noise)
        scale = torch.sqrt(1.0 + s * s) if max_denoise else s
        return noise * scale + latent_image

    def inverse_noise_scaling(self, sigma: torch.Tensor | float, latent: torch.Tensor) -> torch.Tensor:
        """Identity for eps/v models (flow models would un-scale here)."""
        return latent

    def is_max_denoise(self, sigmas: torch.Tensor) -> bool:
        """Whether the schedule starts at (or above) the model's sigma_max: then the full prior variance is used."""
        if sigmas.numel() == 0:
            return False
        first, top = float(sigmas[0]), float(self.sigma_max)
        return math.isclose(first, top, rel_tol=1e-5) or first > top


def zero_terminal_snr_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023 ("Common Diffusion Noise Schedules and Sample Steps are Flawed"), Alg. 1: shift and
    scale sqrt(alpha_bar) so the last timestep has zero SNR. The last alpha_bar is then set to
    4.8973451890853435e-08 (ComfyUI's value) so its sigma stays finite (about 4519)."""
    abar_sqrt = (1.0 / (sigmas.double() ** 2 + 1.0)).sqrt()
    first, last = abar_sqrt[0].clone(), abar_sqrt[-1].clone()
    abar_sqrt = (abar_sqrt - last) * (first / (first - last))
    abar = abar_sqrt**2
    abar[-1] = 4.8973451890853435e-08
    return ((1.0 - abar) / abar) ** 0.5


class LCMSchedule(DiscreteSchedule):
    """Latent Consistency Models (Luo et al. 2023): the 1000-step SD table subsampled to the 50 timesteps
    LCM was distilled on (19, 39, ..., 999), with the consistency boundary conditions
    c_skip = s_d^2 / ((10 t)^2 + s_d^2), c_out = 10 t / sqrt((10 t)^2 + s_d^2), s_d = 0.5 (ComfyUI's
    ModelSamplingDiscrete "lcm"). Timesteps snap to the nearest distilled one."""

    original_timesteps = 50

    def __init__(self, zsnr: bool = False, linear_start: float = 0.00085, linear_end: float = 0.012,
                 timesteps: int = 1000) -> None:
        self.prediction_type = "epsilon"
        self.beta_schedule = "scaled_linear"
        self.sigma_data = 1.0
        self._tables = {}
        self.skip_steps = timesteps // self.original_timesteps
        # float32 betas, as the LCM reference
        betas = torch.linspace(linear_start**0.5, linear_end**0.5, timesteps, dtype=torch.float32) ** 2
        abar = torch.cumprod(1.0 - betas, dim=0)
        picked = abar[timesteps - 1 - torch.arange(self.original_timesteps) * self.skip_steps].flip(0)
        sigmas = ((1 - picked) / picked) ** 0.5
        if zsnr:
            sigmas = zero_terminal_snr_sigmas(sigmas).float()
        self.zsnr = zsnr
        self._set_sigmas(sigmas.double())

    def timestep(self, sigma: torch.Tensor | float) -> torch.Tensor:
        sigma_t = torch.as_tensor(sigma)
        out_dtype = sigma_t.dtype if sigma_t.is_floating_point() else torch.float32
        table, work = self._log_table(sigma_t.device)
        dist = (sigma_t.detach().to(work).clamp(min=1e-30).log().reshape(-1, 1) - table.reshape(1, -1)).abs()
        idx = dist.argmin(dim=1).reshape(sigma_t.shape)
        return (idx * self.skip_steps + (self.skip_steps - 1)).to(out_dtype)

    def sigma(self, timestep: torch.Tensor | float) -> torch.Tensor:
        t_in = torch.as_tensor(timestep)
        out_dtype = t_in.dtype if t_in.is_floating_point() else torch.float32
        table, work = self._log_table(t_in.device)
        t = ((t_in.detach().to(work) - (self.skip_steps - 1)) / self.skip_steps).clamp(0, self.num_timesteps - 1)
        low = t.floor().long().clamp(max=self.num_timesteps - 2)
        w = t - low
        return ((1.0 - w) * table[low] + w * table[low + 1]).exp().to(dtype=out_dtype)

    def percent_to_sigma(self, percent: float) -> float:
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        return float(self.sigma(torch.tensor((1.0 - percent) * 999.0, dtype=torch.float64)))

    def calculate_denoised(self, sigma, model_output, x):
        s = _bcast(sigma, model_output)
        t = _bcast(self.timestep(torch.as_tensor(sigma, device=model_output.device)), model_output)
        t = t.to(model_output.dtype)
        x0 = x - model_output * s
        sd = 0.5
        scaled = t * 10.0
        c_skip = sd**2 / (scaled**2 + sd**2)
        c_out = scaled / (scaled**2 + sd**2) ** 0.5
        return c_out * x0 + c_skip * x


class ContinuousEDMSchedule(DiscreteSchedule):
    """Continuous-time sigma in [sigma_min, sigma_max] (Karras et al. 2022, EDM): the model sees
    timestep 0.25 ln(sigma); prediction "edm" is EDM's F-parametrisation (D = c_skip x + c_out F with
    c_out = +sigma sigma_d / sqrt(sigma^2 + sigma_d^2)), or "epsilon" / "v_prediction"."""

    def __init__(self, prediction_type: str = "edm", sigma_min: float = 0.002, sigma_max: float = 120.0,
                 sigma_data: float = 1.0) -> None:
        if prediction_type not in ("edm", "epsilon", "v_prediction"):
            raise ValueError(f"unknown prediction_type {prediction_type!r} for a continuous EDM schedule")
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
        self.prediction_type = prediction_type
        self.beta_schedule = "edm"
        self.sigma_data = float(sigma_data)
        self.zsnr = False
        self._tables = {}
        self._lo, self._hi = float(sigma_min), float(sigma_max)
        self._set_sigmas(torch.linspace(math.log(sigma_min), math.log(sigma_max), 1000, dtype=torch.float64).exp())

    def timestep(self, sigma):
        sigma_t = torch.as_tensor(sigma)
        out_dtype = sigma_t.dtype if sigma_t.is_floating_point() else torch.float32
        return (0.25 * sigma_t.detach().double().clamp(min=1e-30).log()).to(out_dtype)

    def sigma(self, timestep):
        t_in = torch.as_tensor(timestep)
        out_dtype = t_in.dtype if t_in.is_floating_point() else torch.float32
        return (t_in.detach().double() / 0.25).exp().to(out_dtype)

    def percent_to_sigma(self, percent: float) -> float:
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        lo = math.log(self._lo)
        return math.exp((math.log(self._hi) - lo) * (1.0 - percent) + lo)

    def calculate_denoised(self, sigma, model_output, x):
        if self.prediction_type != "edm":
            return super().calculate_denoised(sigma, model_output, x)
        s = _bcast(sigma, model_output)
        sd2 = self.sigma_data**2
        return x * sd2 / (s * s + sd2) + model_output * s * self.sigma_data / (s * s + sd2) ** 0.5


def flow_shift(shift: float, t: torch.Tensor) -> torch.Tensor:
    """Rectified-flow time shift: t -> shift*t / (1 + (shift-1)*t) (SD3's resolution-dependent shift)."""
    return shift * t / (1 + (shift - 1) * t)


class FlowSchedule(DiscreteSchedule):
    """Discrete rectified flow (SD3/SD3.5; ComfyUI's ModelSamplingDiscreteFlow + CONST).

    ``x_sigma = sigma * noise + (1 - sigma) * x0`` with sigma in (0, 1]; the model predicts the
    velocity ``noise - x0`` at timestep ``sigma * multiplier``. The table holds sigma at
    timesteps 1..N, so every KSampler scheduler reads it as it reads the discrete one.
    """

    def __init__(self, shift: float = 3.0, multiplier: float = 1000.0, timesteps: int = 1000) -> None:
        self.prediction_type = "flow"
        self.beta_schedule = "flow"
        self.sigma_data = 1.0
        self.zsnr = False
        self.shift = float(shift)
        self.multiplier = float(multiplier)
        ts = torch.arange(1, timesteps + 1, dtype=torch.float64)
        self._set_sigmas(flow_shift(self.shift, ts / self.multiplier))

    def timestep(self, sigma: torch.Tensor | float) -> torch.Tensor:
        s = torch.as_tensor(sigma)
        return s * self.multiplier if s.is_floating_point() else s.float() * self.multiplier

    def sigma(self, timestep: torch.Tensor | float) -> torch.Tensor:
        t = torch.as_tensor(timestep)
        out_dtype = t.dtype if t.is_floating_point() else torch.float32
        return flow_shift(self.shift, t.double() / self.multiplier).to(out_dtype)

    def percent_to_sigma(self, percent: float) -> float:
        if percent <= 0.0:
            return 1.0
        if percent >= 1.0:
            return 0.0
        return float(flow_shift(self.shift, torch.tensor(1.0 - percent, dtype=torch.float64)))

    def calculate_input(self, sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
        return x

    def calculate_denoised(self, sigma: torch.Tensor | float, model_output: torch.Tensor,
                           x: torch.Tensor) -> torch.Tensor:
        return x - model_output * _bcast(sigma, model_output)

    def noise_scaling(self, sigma: torch.Tensor | float, noise: torch.Tensor, latent_image: torch.Tensor,
                      max_denoise: bool = False) -> torch.Tensor:
        s = _bcast(sigma, noise)
        return s * noise + (1.0 - s) * latent_image

    def inverse_noise_scaling(self, sigma: torch.Tensor | float, latent: torch.Tensor) -> torch.Tensor:
        return latent / (1.0 - _bcast(sigma, latent))
