"""``scatterflow calibrate``: refine a PONI geometry from one calibrant frame, unattended.

    scatterflow calibrate IMAGE --calibrant NAME --detector NAME --wavelength M
        --distance-guess M [--mask M] [--beam-center ROW COL] [--frame N]
        [--device auto|cpu|cuda] -o OUT.poni

IMAGE: a .npy file, an HDF5 dataset ``file.h5::/path/to/dataset``, or any image fabio reads
(frame ``--frame`` of a stack, default 0). Writes OUT.poni (pyFAI PONI v2.1, rot3 = 0) and
OUT.png (the frame on a log scale with the control points and the fitted rings).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from .integrate import _open_frames, _read_image


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``calibrate`` sub-command on an argparse ``subparsers`` object."""
    p = subparsers.add_parser("calibrate", help="refine the detector geometry from a calibrant frame",
                              description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image", metavar="IMAGE",
                   help="calibrant frame: file.npy, file.h5::/dataset, or an image fabio reads")
    p.add_argument("--calibrant", required=True,
                   help="pyFAI calibrant name (AgBh, LaB6, CeO2, Si, alpha_Al2O3, ...)")
    p.add_argument("--detector", required=True, help="pyFAI detector name (Pilatus1M, Eiger2_4M, ...)")
    p.add_argument("--wavelength", type=float, required=True, metavar="M", help="wavelength in m")
    p.add_argument("--distance-guess", type=float, required=True, metavar="M",
                   help="sample-detector distance guess in m (searched from 0.5 to 2 times it)")
    p.add_argument("--mask", default=None, help="mask image (nonzero = masked), added to the detector mask")
    p.add_argument("--beam-center", type=float, nargs=2, default=None, metavar=("ROW", "COL"),
                   help="beam-centre guess in pixels (array indices); default: found from the frame")
    p.add_argument("--frame", type=int, default=0, help="frame index in a stack (default 0)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("-o", "--output", required=True, metavar="OUT.poni", help="output PONI file")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Calibrate IMAGE; returns 0 on success, 2 on bad input or failure (message on stderr)."""
    try:
        return _run(args)
    except (ValueError, FileNotFoundError, KeyError, OSError) as exc:
        print(f"scatterflow calibrate: error: {exc}", file=sys.stderr)
        return 2


def _read_frame(spec: str, index: int) -> np.ndarray:
    n, _, read = _open_frames(spec)
    if not 0 <= index < n:
        raise ValueError(f"--frame {index} out of range: {spec} holds {n} frame(s)")
    return np.asarray(read(index, index + 1)[0])


def _run(args) -> int:
    import torch

    from workers.calibrate import calibrate
    from workers.geometry import pixel_positions, tth_chi

    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but CUDA is not available")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    out = Path(args.output)
    if out.suffix != ".poni":
        out = out.with_suffix(".poni")
    frame = _read_frame(args.image, args.frame)
    mask = None if args.mask is None else _read_image(args.mask) != 0
    res = calibrate(frame, detector=args.detector, calibrant=args.calibrant,
                    wavelength=args.wavelength, distance_guess=args.distance_guess, mask=mask,
                    beam_center_guess=None if args.beam_center is None else tuple(args.beam_center),
                    device=device)
    out.parent.mkdir(parents=True, exist_ok=True)
    res.geometry.to_poni(out)
    g = res.geometry
    pos = pixel_positions(g)
    tth = tth_chi(torch.tensor(g.params, dtype=torch.float64), *pos)[0].numpy()
    _plot(out.with_suffix(".png"), frame, tth, res, args.calibrant)
    fit2d = g.to_pyfai().getFit2D()
    print(f"{args.calibrant}: {res.rings_used} rings, {res.n_points} control points, "
          f"rms 2θ residual {res.rms_residual_deg:.2e} deg, {res.iterations} cycles, {res.seconds:.1f} s")
    print(f"dist {g.dist:.6f} m, poni1 {g.poni1:.6f} m, poni2 {g.poni2:.6f} m, "
          f"rot1 {g.rot1:.6f} rad, rot2 {g.rot2:.6f} rad; beam centre (row, col) "
          f"({fit2d['centerY'] - 0.5:.2f}, {fit2d['centerX'] - 0.5:.2f}) px -> {out}")
    return 0


def _plot(path: Path, frame: np.ndarray, tth: np.ndarray, res, calibrant: str) -> None:
    """Frame on a log scale, control points coloured by ring, fitted rings as 2θ contours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from workers.calibrate import calibrant_tth

    img = np.log10(np.clip(np.nan_to_num(frame.astype(np.float64)), 0, None) + 1.0)
    fig, ax = plt.subplots(figsize=(7, 7 * frame.shape[0] / max(frame.shape[1], 1) + 0.6))
    ax.imshow(img, cmap="gray_r", origin="upper", interpolation="nearest")
    _, ring_tth = calibrant_tth(calibrant, res.geometry.wavelength)
    levels = np.sort(ring_tth[np.isfinite(ring_tth) & (ring_tth > tth.min()) & (ring_tth < tth.max())])
    if levels.size:
        ax.contour(tth, levels=levels, colors="tab:red", linewidths=0.6, alpha=0.8)
    pts = res.ring_points
    if pts.size:
        ax.scatter(pts[:, 1], pts[:, 0], c=pts[:, 2], cmap="tab10", s=4, lw=0)
    ax.set_title(f"{calibrant}: {res.rings_used} rings, {res.n_points} points, "
                 f"rms {res.rms_residual_deg:.1e}°, dist {res.geometry.dist * 1e3:.2f} mm")
    ax.set_xlabel("column (px)")
    ax.set_ylabel("row (px)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
