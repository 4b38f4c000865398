"""Write analysis results into Tiled, batched, on a writer thread, with a local spool.

Layout (DESIGN.md "Tiled layout")::

    scatterflow/                      container, created if missing
      <source run uid>/               container; metadata: start (source start document),
                                      configuration, software, status, exit_status, reason
        q            (N,) float64     radial bin centres; metadata {"unit": ...}
        profiles     (frames, N) f32  mean intensity per bin, appended as frames arrive
        sigma        (frames, N) f32  its standard error
        frames       table            seq_num int64, time float64 (one row per profile row)
        peaks        table            PEAK_COLUMNS, one row per frame, peak and result
                                      (provisional final=False, then final=True)
        change_points table           the peaks rows flagged change_point=True
        snapshots    (k, h, w) f32    corrected 2D frames (raw - dark) / (flat·Ω·P), block-
                                      averaged, NaN = masked; only if the run sends any
        snapshot_frames table         seq_num int64, time float64: one row per snapshot
        phases       table            per frame: phase label, probability, crystallinity index
                                      (PHASE_COLUMNS of workers/columns.py), provisional then final
        phase_transitions table       from, to, seq_num, time, time_sigma, frame_sigma, change_point
        <other>      table            any table a feature adds with `add_table` (created on first append)
        qmap         (k, Nz, Nxy) f32 grazing-incidence (q_xy, q_z) maps, NaN = no pixel (missing
                                      wedge, off detector); axes q_xy (Nxy,), q_z (Nz,) 1/nm;
                                      frames in qmap_frames (sent by service/publish/hub.py)
        <profile>    (frames, N) f32  extra profiles of a modality (in_plane, vertical_cut), with
                                      <profile>_sigma, <profile>_radial (N,), <profile>_frames
        scalars      table            seq_num, time and per-frame scalars (hermans_orientation)

    A run with several detectors has one container per detector, ``scatterflow/<uid>.<detector>``,
    with metadata ``source_run`` (the run's uid) and ``detector`` (service/detectors.py).

Writes are batched by size (``flush_rows`` frames or peak rows) and by time
(``flush_seconds`` after the first buffered item) and at stop: Tiled serves about 20 write
requests/s on 2 cores, so one flush costs 3-5 requests whatever its size. The caller only
enqueues onto a bounded queue (blocking when full, counted in ``blocked``); a dedicated
thread buffers, flushes and retries.

Idempotence, so that retries and the spool neither lose nor duplicate: every write
carries its explicit position (frame or snapshot offset for array patches, row offset
for table appends). A patch at an offset overwrites, so it can be repeated; before repeating a
table append, the writer reads the table's row count and skips the append if the rows
are already there. When Tiled stays unreachable, writes go to ``spool_dir`` as numbered
``.npz``/``.parquet`` files, and everything after them too (order is kept); a health probe
every ``probe_seconds`` drains the spool in order once Tiled answers again. Spool files
left by a previous process are drained first.

Runs a previous process left "running" (killed, or stopped before the run's stop document)
are marked "interrupted" when a publisher starts: each run's metadata names its ``writer``
(host and spool directory); once the spool a new publisher on the same directory found is
drained into Tiled, it sets status "interrupted" on that writer's running runs (except its own).

Note: the tiled client retries each request itself (env ``TILED_RETRY_ATTEMPTS``,
default 10, within ``TILED_RETRY_TIMEOUT``, default 45 s) before this package sees the
failure; lower them where a faster switch to the spool matters.

Modules: ``publisher`` (the caller API: `TiledPublisher`), ``writer`` (the writer thread:
retries, spool, drain), ``buffer`` (per-run buffers, flush policy), ``ops`` (one write),
``spool`` (ops on disk), ``layout`` (the nodes each op writes, schemas), ``health`` (probe,
recovery of interrupted runs), ``metadata`` (run metadata, software versions), ``errors``,
``stats`` (counters).
"""

from .errors import TiledWriteError
from .metadata import software_versions
from .publisher import TiledPublisher

__all__ = ["TiledPublisher", "TiledWriteError", "software_versions"]
