"""2-D densities with exact answers, for judging composition and MCMC samplers.

Every density here has a closed-form log-density at *every* noise level of a
variance-preserving diffusion, ``x_t = alpha x_0 + sigma eps``:

* ``GaussianMixture``: ``N(alpha m_k, alpha^2 S_k + sigma^2 I)``.
* ``SmoothBox``: a uniform box blurred by ``N(0, tau^2 I)``. Blurring keeps the exact
  log-likelihood of a sample finite everywhere (a hard box gives ``-inf`` to a sample a
  hair outside it, which makes mean log-likelihoods useless), and the noised marginal is
  again a blurred box: ``U(alpha lo, alpha hi) + N(0, alpha^2 tau^2 + sigma^2)`` per axis.

So the exact scores of the *components* are known at every t (the "oracle" components of
the tests and of ``experiments/toy_composition.py``), and the composed *targets* of the
benchmarks have exact normalized log-densities and exact samples:

* ``ProductTarget`` (AND): Gaussian mixture x blurred box, e.g. a ring of 8 Gaussians x a
  vertical bar. Its normalizer is closed form (``int N(x; m, s^2) Phi((x - lo)/tau) dx =
  Phi((m - lo)/sqrt(s^2 + tau^2))``); exact samples by rejection from the mixture.
  The noised product ``p_A,t p_B,t`` is *not* the noised target, which is why plain
  reverse diffusion of a summed score is biased and MCMC helps.
* ``Mixture``: ``sum_k w_k p_k``; the noised mixture is the mixture of the noised
  components, so a correct mixture score (``-logsumexp`` of normalized energies) is exact.
* ``BoxDifference`` (NOT): a box minus a smaller box inside it, i.e. the uniform density on
  ``A \\ B``, blurred. As densities, ``1_{A \\ B} = 1_A - 1_B``, so the target is the
  *signed* mixture ``(|A| p_A - |B| p_B) / (|A| - |B|)`` at every noise level: "A AND NOT
  B" for a B inside A is a mixture with a negative weight on B. (The product form
  ``p_A / p_B^w`` of composable diffusion has no finite limit here: it sends the mass to
  the points of A farthest from B.)

``sliced_wasserstein`` compares sample sets; the experiment reports it against exact samples.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import log_ndtr, logsumexp


def _alpha_sigma(x, alpha, sigma):
  """Broadcast scalar or per-example (B,) noise levels against x of shape (B, 2)."""
  alpha = jnp.broadcast_to(jnp.asarray(alpha, jnp.float32), x.shape[:1])[:, None]
  sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), x.shape[:1])[:, None]
  return alpha, sigma


def _single_point(log_prob):
  """Let ``log_prob`` take one point of shape (D,) too (scalar noise levels only)."""

  def wrapped(self, x, *args, **kwargs):
    x = jnp.asarray(x)
    if x.ndim == 1:
      return log_prob(self, x[None], *args, **kwargs)[0]
    if x.ndim != 2:
      raise ValueError(f'{type(self).__name__}.log_prob takes points of shape (B, D) or one '
                       f'point of shape (D,); got shape {x.shape}.')
    return log_prob(self, x, *args, **kwargs)

  wrapped.__doc__, wrapped.__name__ = log_prob.__doc__, log_prob.__name__
  return wrapped


# Below this ratio of the (scaled) box's size to the blur width, the noised box is a
# Gaussian to float32 precision: the log-density of its moment-matched Gaussian is off by
# O(ratio^4) (4e-6 at 0.1), while Phi(u) - Phi(v) of nearly equal u, v loses digits (2e-5
# at 0.05, 8e-4 at 0.001, and NaN at alpha = 0 where the exact formula is 0 / 0).
_SPECK = 0.1


def _gaussian_log_prob(x, mean, cov):
  """log N(x; mean, cov) for x, mean (B, D) and cov (B, D, D)."""
  chol = jnp.linalg.cholesky(cov)
  z = jax.scipy.linalg.solve_triangular(chol, (x - mean)[..., None], lower=True)[..., 0]
  log_det = 2 * jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), -1)
  return -0.5 * (jnp.sum(z ** 2, -1) + log_det + x.shape[-1] * math.log(2 * math.pi))


def log_ndtr_diff(u, v):
  """log(Phi(u) - Phi(v)) for u > v, accurate in both tails.

  Where both arguments are large and positive, ``Phi(u) - Phi(v) = Phi(-v) - Phi(-u)`` is
  computed from the small tails instead, so neither term rounds to 1.
  """
  flip = (u + v) > 0
  hi = jnp.where(flip, -v, u)
  lo = jnp.where(flip, -u, v)
  l_hi, l_lo = log_ndtr(hi), log_ndtr(lo)
  return l_hi + jnp.log(-jnp.expm1(jnp.minimum(l_lo - l_hi, -1e-30)))


@dataclasses.dataclass(frozen=True)
class GaussianMixture:
  """Mixture of axis-aligned Gaussians: means (K, D), stds (K, D), weights (K,) (the
  benchmarks are 2-D; any D works).

  Every target's ``sample(rng, n)`` takes a ``np.random.Generator`` or an int seed."""

  means: tuple
  stds: tuple
  weights: tuple

  @property
  def arrays(self):
    return (np.asarray(self.means, np.float32), np.asarray(self.stds, np.float32),
            np.asarray(self.weights, np.float32) / np.sum(self.weights))

  @_single_point
  def log_prob(self, x, alpha=1.0, sigma=0.0):
    """log p_t(x) of the noised mixture, x (B, D); alpha, sigma scalars or (B,)."""
    means, stds, w = self.arrays
    a, s = _alpha_sigma(x, alpha, sigma)
    var = (a[:, None] * stds[None]) ** 2 + s[:, None] ** 2          # (B, K, 2)
    diff = x[:, None, :] - a[:, None] * means[None]
    comp = -0.5 * jnp.sum(diff ** 2 / var + jnp.log(2 * math.pi * var), axis=-1)
    return logsumexp(comp + jnp.log(w)[None], axis=-1)

  def sample(self, rng: np.random.Generator | int, n: int) -> np.ndarray:
    rng = np.random.default_rng(rng)
    means, stds, w = self.arrays
    k = rng.choice(len(w), size=n, p=w)
    return (means[k] + stds[k] * rng.standard_normal((n, means.shape[1]))).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class SmoothBox:
  """Uniform on the box [lo, hi] (per axis), blurred by N(0, tau^2 I)."""

  lo: tuple
  hi: tuple
  tau: float = 0.03

  @property
  def area(self) -> float:
    return float(np.prod(np.asarray(self.hi) - np.asarray(self.lo)))

  @property
  def moments(self) -> tuple[np.ndarray, np.ndarray]:
    """Per-axis mean and variance (D,) of the uniform density on the box (blur not
    included)."""
    lo, hi = np.asarray(self.lo, np.float64), np.asarray(self.hi, np.float64)
    return (lo + hi) / 2, (hi - lo) ** 2 / 12

  @_single_point
  def log_prob(self, x, alpha=1.0, sigma=0.0):
    """log p_t(x), x (B, D) or (D,); alpha, sigma scalars or (B,). Finite at alpha = 0,
    where the noised box is N(0, sigma^2 I)."""
    lo, hi = jnp.asarray(self.lo, jnp.float32), jnp.asarray(self.hi, jnp.float32)
    a, s = _alpha_sigma(x, alpha, sigma)
    width = jnp.sqrt((a * self.tau) ** 2 + s ** 2)
    speck = a * (hi - lo) < _SPECK * width                   # (B, D)
    # Per axis the exact 1-D density, or where the box is a speck at this noise level its
    # moment-matched Gaussian (the exact branch is fed a = 1 there: no 0 / 0 in gradients).
    a_ok = jnp.where(speck, 1.0, a)
    w_ok = jnp.sqrt((a_ok * self.tau) ** 2 + s ** 2)
    exact = (log_ndtr_diff((x - a_ok * lo) / w_ok, (x - a_ok * hi) / w_ok)
             - jnp.log(a_ok * (hi - lo)))
    mean, box_var = (jnp.asarray(v, jnp.float32) for v in self.moments)
    var = width ** 2 + a ** 2 * box_var
    gauss = -0.5 * ((x - a * mean) ** 2 / var + jnp.log(2 * math.pi * var))
    return jnp.sum(jnp.where(speck, gauss, exact), axis=-1)

  def unnormalized_indicator(self, x):
    """P(x - tau z in box) in [0, 1]: the box density times its area, for rejection."""
    return jnp.exp(self.log_prob(x) + math.log(self.area))

  def sample(self, rng: np.random.Generator | int, n: int) -> np.ndarray:
    rng = np.random.default_rng(rng)
    lo, hi = np.asarray(self.lo), np.asarray(self.hi)
    u = lo + (hi - lo) * rng.random((n, len(lo)))
    return (u + self.tau * rng.standard_normal((n, len(lo)))).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class ProductTarget:
  """p(x) proportional to mixture(x) * box(x): exact normalizer, exact samples."""

  mixture: GaussianMixture
  box: SmoothBox

  def log_normalizer(self) -> float:
    """log of int mixture(x) box(x) dx (closed form, see the module docstring)."""
    means, stds, w = self.mixture.arrays
    lo, hi = np.asarray(self.box.lo), np.asarray(self.box.hi)
    scale = np.sqrt(stds ** 2 + self.box.tau ** 2)
    from scipy.special import ndtr
    per_axis = (ndtr((means - lo) / scale) - ndtr((means - hi) / scale)) / (hi - lo)
    return float(np.log(np.sum(w * np.prod(per_axis, axis=-1))))

  @_single_point
  def log_prob(self, x):
    return self.mixture.log_prob(x) + self.box.log_prob(x) - self.log_normalizer()

  def sample(self, rng: np.random.Generator | int, n: int) -> np.ndarray:
    """Exact samples: mixture proposals accepted with probability box(x) |box| <= 1."""
    rng = np.random.default_rng(rng)
    out, have = [], 0
    while have < n:
      prop = self.mixture.sample(rng, 4 * (n - have) + 64)
      keep = rng.random(len(prop)) < np.asarray(self.box.unnormalized_indicator(prop))
      out.append(prop[keep])
      have += int(keep.sum())
    return np.concatenate(out)[:n]


@dataclasses.dataclass(frozen=True)
class Mixture:
  """sum_k w_k p_k of components with ``log_prob(x, alpha, sigma)`` and ``sample``."""

  components: tuple
  weights: tuple

  @_single_point
  def log_prob(self, x, alpha=1.0, sigma=0.0):
    w = np.asarray(self.weights, np.float64) / np.sum(self.weights)
    comps = jnp.stack([c.log_prob(x, alpha, sigma) for c in self.components])
    return logsumexp(comps + jnp.log(jnp.asarray(w, jnp.float32))[:, None], axis=0)

  def sample(self, rng: np.random.Generator | int, n: int) -> np.ndarray:
    rng = np.random.default_rng(rng)
    w = np.asarray(self.weights, np.float64) / np.sum(self.weights)
    counts = rng.multinomial(n, w)
    x = np.concatenate([c.sample(rng, m) for c, m in zip(self.components, counts)])
    return x[rng.permutation(n)]


@dataclasses.dataclass(frozen=True)
class BoxDifference:
  """Blurred uniform density on ``outer \\ inner`` (inner inside outer, same tau)."""

  outer: SmoothBox
  inner: SmoothBox

  def __post_init__(self):
    if not (np.all(np.asarray(self.inner.lo) >= np.asarray(self.outer.lo)) and
            np.all(np.asarray(self.inner.hi) <= np.asarray(self.outer.hi))):
      raise ValueError('BoxDifference: the inner box must lie inside the outer box.')
    if self.inner.tau != self.outer.tau:
      raise ValueError('BoxDifference: both boxes need the same blur tau.')

  @property
  def signed_weights(self) -> tuple[float, float]:
    """Mixture weights (on outer, on inner) with sum 1; the inner one is negative."""
    a, b = self.outer.area, self.inner.area
    return a / (a - b), -b / (a - b)

  @_single_point
  def log_prob(self, x, alpha=1.0, sigma=0.0):
    # (prod_k M_k - prod_k m_k) / (a^D (|outer| - |inner|)) with M_k, m_k the blurred masses
    # of the outer and inner intervals on axis k. Inside the hole both products are ~1:
    # their difference (the signed mixture w_a p_outer + w_b p_inner) cancels to rounding,
    # so it is summed instead from nonnegative terms (prod_{j<k} m_j) (M_k - m_k)
    # (prod_{j>k} M_j), with M_k - m_k the mass of the two strips between the boxes.
    # Where the outer box is a speck at this noise level (alpha near 0), the Gaussian with
    # the region's mean and covariance instead, as for SmoothBox.
    outer, inner = self.outer, self.inner
    a, s = _alpha_sigma(x, alpha, sigma)
    width = jnp.sqrt((a * outer.tau) ** 2 + s ** 2)
    size = float(np.max(np.asarray(outer.hi) - np.asarray(outer.lo)))
    speck = a[:, 0] * size < _SPECK * width[:, 0]            # (B,)
    mean, cov = (jnp.asarray(v, jnp.float32) for v in self.moments)
    gauss = _gaussian_log_prob(x, a * mean, a[:, :, None] ** 2 * cov
                               + width[:, :, None] ** 2 * jnp.eye(x.shape[-1]))
    a = jnp.where(speck[:, None], 1.0, a)
    width = jnp.sqrt((a * outer.tau) ** 2 + s ** 2)
    z = lambda edge: (x - a * jnp.asarray(edge, jnp.float32)) / width
    log_outer = log_ndtr_diff(z(outer.lo), z(outer.hi))   # (B, D): log M_k
    log_inner = log_ndtr_diff(z(inner.lo), z(inner.hi))   # log m_k
    log_strips = jnp.logaddexp(log_ndtr_diff(z(outer.lo), z(inner.lo)),
                               log_ndtr_diff(z(inner.hi), z(outer.hi)))   # log (M_k - m_k)
    before = jnp.cumsum(log_inner, -1) - log_inner
    after = jnp.sum(log_outer, -1, keepdims=True) - jnp.cumsum(log_outer, -1)
    log_diff = logsumexp(before + log_strips + after, axis=-1)
    exact = log_diff - x.shape[-1] * jnp.log(a[:, 0]) - math.log(outer.area - inner.area)
    return jnp.where(speck, gauss, exact)

  @property
  def moments(self) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) of the uniform density on outer minus inner (blur
    not included): the signed mixture of the two boxes' moments."""
    def second_moment(m, var):     # E[u u^T] of a box
      return np.outer(m, m) + np.diag(var)
    (wa, wb), (ma, va), (mb, vb) = self.signed_weights, self.outer.moments, self.inner.moments
    mean = wa * ma + wb * mb
    return mean, wa * second_moment(ma, va) + wb * second_moment(mb, vb) - np.outer(mean, mean)

  def sample(self, rng: np.random.Generator | int, n: int) -> np.ndarray:
    rng = np.random.default_rng(rng)
    lo, hi = np.asarray(self.outer.lo), np.asarray(self.outer.hi)
    ilo, ihi = np.asarray(self.inner.lo), np.asarray(self.inner.hi)
    out, have = [], 0
    while have < n:
      u = lo + (hi - lo) * rng.random((2 * (n - have) + 64, len(lo)))
      keep = ~np.all((u >= ilo) & (u <= ihi), axis=-1)
      out.append(u[keep])
      have += int(keep.sum())
    u = np.concatenate(out)[:n]
    return (u + self.outer.tau * rng.standard_normal((n, len(lo)))).astype(np.float32)


# ------------------------------------------------------------------------ the benchmarks

def ring(num_modes: int = 8, radius: float = 0.5, std: float = 0.075) -> GaussianMixture:
  angles = 2 * np.pi * np.arange(num_modes) / num_modes
  means = np.stack([radius * np.cos(angles), radius * np.sin(angles)], -1)
  return GaussianMixture(tuple(map(tuple, means)), ((std, std),) * num_modes,
                         (1.0,) * num_modes)


def vertical_bar(half_width: float = 0.2, half_height: float = 1.0, tau: float = 0.03) -> SmoothBox:
  return SmoothBox((-half_width, -half_height), (half_width, half_height), tau)


def horizontal_bar(half_width: float = 0.2, half_length: float = 1.0, tau: float = 0.03) -> SmoothBox:
  return SmoothBox((-half_length, -half_width), (half_length, half_width), tau)


def box(half_size: float, tau: float = 0.03) -> SmoothBox:
  return SmoothBox((-half_size, -half_size), (half_size, half_size), tau)


@dataclasses.dataclass(frozen=True)
class Benchmark:
  """A composed target and the components whose models get composed.

  ``kind``: 'product' (energies added), 'mixture' (``-logsumexp`` of normalized
  energies, weights ``weights``) or 'difference' (mixture with signed weights).
  """

  name: str
  kind: str
  components: tuple          # component densities, in the order of ``weights``
  weights: tuple
  target: object


def benchmarks() -> dict[str, Benchmark]:
  """The three 2-D benchmarks: ring x bar (AND), mixture of bars, box minus box (NOT)."""
  ring8, vbar, hbar = ring(), vertical_bar(), horizontal_bar()
  big, small = box(1.0), box(0.5)
  diff = BoxDifference(big, small)
  return {
      'product': Benchmark('ring AND vertical bar', 'product', (ring8, vbar), (1.0, 1.0),
                           ProductTarget(ring8, vbar)),
      'mixture': Benchmark('vertical bar OR horizontal bar', 'mixture', (vbar, hbar),
                           (0.5, 0.5), Mixture((vbar, hbar), (0.5, 0.5))),
      'negation': Benchmark('big box AND NOT small box', 'difference', (big, small),
                            diff.signed_weights, diff),
  }


# ------------------------------------------------------------------------ metrics

def sliced_wasserstein(a: np.ndarray, b: np.ndarray, num_projections: int = 256,
                       seed: int = 0) -> float:
  """Sliced 2-Wasserstein distance between two sample sets (sizes may differ).

  For each random direction, the 1-D W2 between the projections is the L2 distance of
  their quantile functions, evaluated on a common grid of quantile levels.
  """
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  rng = np.random.default_rng(seed)
  dirs = rng.standard_normal((num_projections, a.shape[1]))
  dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
  n = max(len(a), len(b))
  levels = (np.arange(n) + 0.5) / n
  qa, qb = _quantiles(a @ dirs.T, levels), _quantiles(b @ dirs.T, levels)
  return float(np.sqrt(np.mean((qa - qb) ** 2)))


def _quantiles(values: np.ndarray, levels: np.ndarray) -> np.ndarray:
  """``np.quantile(values, levels, axis=0, method='linear')`` from one sort (numpy's takes
  time quadratic in the sample count for this many levels)."""
  v = np.sort(values, axis=0)
  pos = levels * (len(v) - 1)
  below = np.floor(pos).astype(int)
  above = np.minimum(below + 1, len(v) - 1)
  frac = (pos - below)[:, None]
  return v[below] + frac * (v[above] - v[below])


def grid_points(bounds: float = 1.5, num: int = 200) -> tuple[np.ndarray, float]:
  """(num*num, 2) grid on [-bounds, bounds]^2 and the area of one cell (for quadrature)."""
  g = np.linspace(-bounds, bounds, num, dtype=np.float32)
  xx, yy = np.meshgrid(g, g, indexing='xy')
  return np.stack([xx.ravel(), yy.ravel()], -1), float((g[1] - g[0]) ** 2)


__all__ = ['GaussianMixture', 'SmoothBox', 'ProductTarget', 'Mixture', 'BoxDifference',
           'Benchmark', 'benchmarks', 'ring', 'vertical_bar', 'horizontal_bar', 'box',
           'sliced_wasserstein', 'grid_points', 'log_ndtr_diff']
