"""The usual per-frame path as the benchmark's baseline: pyFAI integrate1d, then an lmfit Model
of the same peaks and background. lmfit comes with the ``bench`` extra."""
from __future__ import annotations

import time

import numpy as np

from ..errors import ScatterflowError

INSTALL_HINT = "the pyFAI + lmfit baseline needs lmfit: pip install 'scatterflow[bench]' (or use --no-baseline)"


class BaselineUnavailable(ScatterflowError, ImportError):
    """lmfit is not installed; the message is one line naming the extra to install."""


def require_lmfit() -> None:
    """BaselineUnavailable (one line, `INSTALL_HINT`) when lmfit cannot be imported."""
    try:
        import lmfit  # noqa: F401
    except ImportError:
        raise BaselineUnavailable(INSTALL_HINT) from None


def baseline_pyfai_lmfit(ai, pool: np.ndarray, mask: np.ndarray, settings, n: int = 8) -> float:
    """Frames/s of the usual per-frame path: pyFAI integrate1d (bbox CSR) then an lmfit Model
    of the same peaks and background, warm-started from the previous frame."""
    require_lmfit()
    import lmfit
    cfg = settings.fit
    model = None
    params = None
    t0 = time.perf_counter()
    for k in range(n):
        res = ai.integrate1d(pool[k % len(pool)], settings.reduction.npt, unit="q_nm^-1",
                             method=("bbox", "csr", "cython"), mask=mask, polarization_factor=0.95,
                             error_model="poisson", dummy=-1, delta_dummy=0.5)
        q, i, s = res.radial, res.intensity, res.sigma
        sel = (q >= cfg.q_range[0]) & (q <= cfg.q_range[1]) & (s > 0)
        if model is None:
            model = lmfit.models.PowerLawModel(prefix="bg_") + lmfit.models.ConstantModel(prefix="c_")
            for p in cfg.peaks:
                model = model + lmfit.models.PseudoVoigtModel(prefix=f"{p.name}_")
            params = model.make_params(bg_amplitude=600.0, bg_exponent=-3.0, c_c=10.0)
            for p in cfg.peaks:
                params[f"{p.name}_center"].set(value=p.center, min=p.center_min, max=p.center_max)
                params[f"{p.name}_sigma"].set(value=p.fwhm / 2, min=0.005)
                params[f"{p.name}_amplitude"].set(value=50.0, min=0)
                params[f"{p.name}_fraction"].set(value=0.5, min=0, max=1)
        out = model.fit(i[sel], params, x=q[sel], weights=1 / s[sel])
        params = out.params
    return n / (time.perf_counter() - t0)
