"""Post-hoc image guidance (the LDM paper, sec. 4.4 and appendix): steer any sampler at test
time with a differentiable guide on the decoded x0 estimate.

The paper's update, with a Gaussian guide of variance v_t around a target image y (T a
downsampling to y's size, D the decoder):

    eps <- eps_theta(z_t, t) + sqrt(1 - abar_t) / v_t * grad_{z_t} 1/2 ||T(D(x0_hat(z_t))) - y||^2
    x0_hat(z_t) = (z_t - sqrt(1 - abar_t) eps_theta) / sqrt(abar_t)

The paper fixes v_t = 1 / scale. ldmrt adds the x0 estimate's own error, as in pseudoinverse-guided
diffusion (Song et al. 2023): an eps error of variance `uncertainty` is an x0 error of variance
uncertainty * (1 - abar_t) / abar_t, so

    v_t = 1 / scale + uncertainty * (1 - abar_t) / abar_t       (uncertainty 0: the paper's guide)

Early, noisy steps, whose x0 estimate is a blur, are steered gently (by at most 1 / uncertainty);
late ones by the full scale. With the fixed variance the pull on x0 is scale * (1 - abar_t) /
abar_t times the gradient: for the digits' schedule at DDIM 20 that is 2800 x scale at the first
step and 0.003 x scale at the last, so a scale strong enough to set the image's shape in the middle
tears it at the start (measurements: docs/layout-and-guidance.md).

The gradient is taken with eps_theta held fixed, so it is the decoder's vector-Jacobian product
only: grad_{z_t} = grad_{x0} / sqrt(abar_t) (through the UNet as well, it steered the digits
worse at three times the cost). In the model's own output m (what every
sampler's table combines) the update reads

    m <- m + c_t / v_t * grad_{x0} 1/2 ||T(D(x0_hat)) - y||^2,
    c_t = sqrt(1 - abar_t) / sqrt(abar_t)   (epsilon prediction)
    c_t = sqrt(1 - abar_t) / abar_t         (v prediction: v = sqrt(abar) eps - sqrt(1 - abar) x0 at fixed z_t)

with abar_t the UNet input's signal power at that evaluation (SamplerPlan.alpha_bars), so one
rule serves every sampler. The backend supplies the gradient (engines/torch.py: autograd through
its decoder); this module is its arithmetic, on numpy arrays and torch tensors alike.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from ldmrt.config import PredictionType
from ldmrt.sampling.plan import SamplerPlan

__all__ = ["GuideGradient", "ImageGuide", "guided_output"]

# x0 estimate (B, C, h, w), scaled latents -> the gradient of 1/2 ||T(D(x0 / scale_factor)) - y||^2
# with respect to it (the same shape and kind: numpy in, numpy out; a tensor in, a tensor out)
GuideGradient = Callable[[Any], Any]


@dataclass(frozen=True)
class ImageGuide:
    """A guide bound to its target: the gradient of its loss, 1 / its fixed variance (`scale`), and
    the x0 estimate's error variance per unit of (1 - abar) / abar (`uncertainty`)."""
    gradient: GuideGradient
    scale: float
    uncertainty: float = 0.0

    def weight(self, alpha_bar: float) -> float:
        """1 / v_t: scale / (1 + scale * uncertainty * (1 - abar) / abar), 0 where scale is 0."""
        return self.scale / (1.0 + self.scale * self.uncertainty * (1.0 - alpha_bar) / alpha_bar)


def guided_output(plan: SamplerPlan, i: int, x, output, image_guide: ImageGuide):
    """The (classifier-free guided) model output `output` of evaluation i at latents `x`, moved by
    the image guide's gradient as the module docstring derives."""
    alpha_bar = float(plan.alpha_bars[i])
    alpha, sigma = math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar)
    z = x * float(plan.input_scale[i])
    if plan.prediction_type == PredictionType.EPSILON:
        x0, coef = (z - sigma * output) / alpha, sigma / alpha
    else:
        x0, coef = alpha * z - sigma * output, sigma / alpha_bar
    return output + (image_guide.weight(alpha_bar) * coef) * image_guide.gradient(x0)
