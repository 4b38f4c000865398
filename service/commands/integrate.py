"""``scatterflow integrate``: azimuthal integration of a frame stack to an .npz (+ .png plot).

    scatterflow integrate FRAMES --poni FILE [--npt N] [--unit U] [--method no|bbox|full]
        [--polarization F] [--radial-range MIN MAX] [--mask M] [--dark D] [--flat F]
        [--batch N] [--device auto|cpu|cuda] -o OUT.npz

FRAMES: a .npy file (2D frame or 3D stack), an HDF5 dataset ``file.h5::/path/to/dataset``, or
any image fabio reads (all its frames). OUT.npz holds ``q`` (radial bin centres in ``unit``),
``unit``, ``I`` and ``sigma`` (frames x bins); a plot of the profiles goes to OUT.png.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Iterator

import numpy as np

from ..images import read_image as _read_image

UNITS = ("q_nm^-1", "q_A^-1", "2th_deg")
METHODS = ("no", "bbox", "full")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``integrate`` sub-command on an argparse ``subparsers`` object."""
    p = subparsers.add_parser("integrate", help="azimuthally integrate frames to 1D profiles",
                              description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("frames", metavar="FRAMES",
                   help="frames: file.npy, file.h5::/dataset, or an image fabio reads")
    p.add_argument("--poni", required=True, help="pyFAI PONI geometry file")
    p.add_argument("--npt", type=int, default=1000, help="number of radial bins (default 1000)")
    p.add_argument("--unit", choices=UNITS, default="q_nm^-1", help="radial unit")
    p.add_argument("--method", choices=METHODS, default="bbox", help="pixel splitting")
    p.add_argument("--polarization", type=float, default=None, metavar="F",
                   help="polarization factor in [-1, 1] (default: no correction)")
    p.add_argument("--radial-range", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="radial range in the unit")
    p.add_argument("--mask", default=None, help="mask image (nonzero = masked), replaces the detector mask")
    p.add_argument("--dark", default=None, help="dark image")
    p.add_argument("--flat", default=None, help="flat-field image")
    p.add_argument("--batch", type=int, default=16, help="frames per batch (default 16)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("-o", "--output", required=True, metavar="OUT.npz", help="output .npz file")
    p.set_defaults(func=run)
    return p


def _open_frames(spec: str) -> tuple[int, tuple[int, int], "callable"]:
    """(count, (H, W), read(start, stop) -> (n, H, W)) for the FRAMES argument."""
    if "::" in spec:
        import h5py

        fname, dset = spec.split("::", 1)
        h5 = h5py.File(fname, "r")
        data = h5[dset]
        if data.ndim == 2:
            return 1, data.shape, lambda a, b: data[()][None]
        if data.ndim != 3:
            raise ValueError(f"{spec}: expected a 2D or 3D dataset, got shape {data.shape}")
        return data.shape[0], data.shape[1:], lambda a, b: data[a:b]
    if spec.endswith(".npy"):
        data = np.load(spec, mmap_mode="r")
        if data.ndim == 2:
            data = data[None]
        if data.ndim != 3:
            raise ValueError(f"{spec}: expected a 2D or 3D array, got shape {data.shape}")
        return data.shape[0], data.shape[1:], lambda a, b: np.asarray(data[a:b])
    import fabio

    img = fabio.open(spec)
    n = max(1, int(getattr(img, "nframes", 1)))

    def read(a, b):
        return np.stack([img.data if n == 1 else img.getframe(i).data for i in range(a, b)])

    return n, img.data.shape, read


def _batches(n: int, size: int) -> Iterator[tuple[int, int]]:
    for a in range(0, n, size):
        yield a, min(n, a + size)


def _plot(path: Path, q: np.ndarray, intensity: np.ndarray, unit: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    n = intensity.shape[0]
    step = max(1, n // 50)
    cmap = plt.get_cmap("viridis")
    for k in range(0, n, step):
        ax.plot(q, intensity[k], lw=0.8, color=cmap(k / max(1, n - 1)))
    positive = intensity[intensity > 0]
    if positive.size and positive.max() / positive.min() > 100:
        ax.set_yscale("log")
    ax.set_xlabel({"q_nm^-1": "q (1/nm)", "q_A^-1": "q (1/Å)", "2th_deg": "2θ (deg)"}[unit])
    ax.set_ylabel("I (a.u.)")
    ax.set_title(f"{n} profile(s)" + (f", every {step}th shown" if step > 1 else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    """Integrate FRAMES; returns 0 on success, 2 on bad input (message on stderr)."""
    try:
        return _run(args)
    except (ValueError, FileNotFoundError, KeyError, OSError) as exc:
        print(f"scatterflow integrate: error: {exc}", file=sys.stderr)
        return 2


def _run(args) -> int:
    import torch
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from workers.geometry import Geometry
    from workers.integrate import build_integrator_1d

    if args.npt < 1:
        raise ValueError(f"--npt must be >= 1, got {args.npt}")
    if args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but CUDA is not available")
    out = Path(args.output)
    if out.suffix != ".npz":
        out = out.with_suffix(".npz")
    geometry = Geometry.from_poni(args.poni)
    n, shape, read = _open_frames(args.frames)
    if tuple(shape) != tuple(geometry.shape):
        raise ValueError(f"frames are {tuple(shape)} but the detector in {args.poni} is {geometry.shape}")
    integ = build_integrator_1d(
        geometry, npt=args.npt, unit=args.unit, method=args.method,
        radial_range=args.radial_range, polarization_factor=args.polarization,
        mask=None if args.mask is None else _read_image(args.mask) != 0,
        dark=None if args.dark is None else _read_image(args.dark),
        flat=None if args.flat is None else _read_image(args.flat),
        device=args.device, dtype=torch.float32)
    intensity = np.empty((n, integ.npt), np.float32)
    sigma = np.empty((n, integ.npt), np.float32)
    columns = (TextColumn("integrating"), BarColumn(), TextColumn("{task.completed}/{task.total} frames"),
               TimeRemainingColumn())
    with Progress(*columns, transient=True, disable=n < 2 * args.batch) as progress:
        task = progress.add_task("integrate", total=n)
        for a, b in _batches(n, args.batch):
            res = integ(read(a, b))
            intensity[a:b] = res.intensity.cpu().numpy()
            sigma[a:b] = res.sigma.cpu().numpy()
            progress.advance(task, b - a)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, q=integ.radial, unit=np.array(args.unit), I=intensity, sigma=sigma)
    _plot(out.with_suffix(".png"), integ.radial, intensity, args.unit)
    print(f"{n} frame(s) -> {out} ({integ.npt} bins, {args.unit}, {args.method} splitting)")
    return 0
