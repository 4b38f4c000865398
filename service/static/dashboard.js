// scatterflow live dashboard: one EventSource on api/v1/events, uPlot charts (vendored).
// Trajectories: per peak, centre / FWHM / area against frame or time; provisional fits as dots,
// final fits as a line with a ±1σ band, change points as red vertical lines.
// The API key never goes into a URL: when the API answers 401 the page asks for it and trades it
// for a session cookie (POST api/v1/session), which fetches, the EventSource and images then send.
"use strict";
(function () {
  const params = new URLSearchParams(location.search);
  const $ = (id) => document.getElementById(id);

  const QUANTITIES = [
    ["center", "centre (1/nm)"], ["fwhm", "FWHM (1/nm)"], ["amplitude", "area (I·1/nm)"]];
  const COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#17becf"];  // red: change points

  const S = {
    wanted: params.get("run") || "latest",   // "latest" or a uid
    uid: null, start: null, t0: null,
    peaks: new Map(),          // peak name -> Map(seq -> {t, p: row|null, f: row|null})
    cards: new Map(),          // peak name -> {charts: [uPlot, ...]}
    profile: null, profileChart: null,
    xmode: "frame", dirty: false, es: null, connected: false,
    statusHist: [],            // [t, frames_fitted] for the rate
    frame: {seq: null, shown: null, loading: false, last: 0},
    qmap: {seq: null, shown: null, loading: false, last: 0},   // grazing runs only
    messages: 0,
    runFailed: null,           // frames failed in the run shown (its summary)
    phases: {chart: null, rows: [], transitions: [], loading: false, last: 0},
    inversion: newInversion(),
    loggedIn: false, checking: false,   // session: authenticated; a check in flight
  };
  const PHASE_COLORS = {crystalline: "#1f77b4", transition: "#ff7f0e", amorphous: "#2ca02c"};
  const phaseColor = (name) => PHASE_COLORS[name] || COLORS[(Object.keys(PHASE_COLORS).length +
    [...String(name)].reduce((a, c) => a + c.charCodeAt(0), 0)) % COLORS.length];

  // ---------------------------------------------------------------------------- helpers
  const fmt = (v, d = 3) => (v === null || v === undefined || Number.isNaN(v)) ? "–" :
    (Math.abs(v) >= 1e4 || (Math.abs(v) < 1e-3 && v !== 0)) ? Number(v).toExponential(d - 1) : Number(v).toFixed(d);
  const ms = (s) => (s === null || s === undefined) ? "–" : (1000 * s).toFixed(0) + " ms";
  const sum = (o) => Object.values(o || {}).reduce((a, b) => a + b, 0);
  const width = (el) => Math.max(260, (el.clientWidth || 400) - 4);
  // the x axis of every chart: frames are whole numbers (no tick at 2.5), times are seconds
  const FRAME_INCRS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1e3, 2e3, 5e3, 1e4, 2e4, 5e4, 1e5, 2e5, 5e5, 1e6];
  const xAxis = (labelled = true) => ({
    ...(S.xmode === "time" ? {} : {incrs: FRAME_INCRS}),
    ...(labelled ? {label: S.xmode === "time" ? "time since run start (s)" : "frame (seq_num)", labelSize: 18} : {}),
  });

  function rowsOf(cols) {
    const n = cols.seq_num.length, out = [];
    for (let i = 0; i < n; i++) {
      const r = {};
      for (const k in cols) r[k] = cols[k][i];
      out.push(r);
    }
    return out;
  }

  // change points drawn as vertical lines on every trajectory chart
  function changePointPlugin(getXs) {
    return {hooks: {draw: [(u) => {
      const xs = getXs();
      if (!xs.length) return;
      const ctx = u.ctx, {top, height} = u.bbox;
      ctx.save();
      ctx.strokeStyle = "rgba(214,39,40,0.7)";
      ctx.lineWidth = 1.5 * devicePixelRatio;
      ctx.setLineDash([4 * devicePixelRatio, 3 * devicePixelRatio]);
      for (const x of xs) {
        const px = u.valToPos(x, "x", true);
        if (px < u.bbox.left || px > u.bbox.left + u.bbox.width) continue;
        ctx.beginPath(); ctx.moveTo(px, top); ctx.lineTo(px, top + height); ctx.stroke();
      }
      ctx.restore();
    }]}};
  }

  // ---------------------------------------------------------------------- trajectories
  function ensureCard(name) {
    if (S.cards.has(name)) return S.cards.get(name);
    $("no-peaks") && $("no-peaks").remove();
    const color = COLORS[S.cards.size % COLORS.length];
    const card = document.createElement("div");
    card.className = "peak-card";
    card.dataset.peak = name;
    card.innerHTML = `<h3>${name}</h3>`;
    $("trajectories").appendChild(card);
    const entry = {charts: [], cps: [], color};
    for (const [qi, [key, label]] of QUANTITIES.entries()) {
      const last = qi === QUANTITIES.length - 1;
      const div = document.createElement("div");
      div.className = "chart";
      div.dataset.quantity = key;
      card.appendChild(div);
      const opts = {
        width: width(card), height: last ? 170 : 150,
        scales: {x: {time: false}},
        legend: {show: false},
        cursor: {drag: {x: true, y: false}},
        axes: [xAxis(last),
               {label, size: 60, labelSize: 18}],
        series: [
          {label: "x"},
          {label: "provisional", stroke: color + "99", paths: () => null,
           points: {show: true, size: 4, width: 1, fill: color + "55", stroke: color + "99"}},
          {label: "final", stroke: color, width: 1.5, points: {show: false}, spanGaps: false},
          {label: "final-σ", stroke: "transparent", width: 0, points: {show: false}},
          {label: "final+σ", stroke: "transparent", width: 0, points: {show: false}},
        ],
        bands: [{series: [4, 3], fill: color + "33"}],
        plugins: [changePointPlugin(() => entry.cps)],
      };
      entry.charts.push(new uPlot(opts, [[], [], [], [], []], div));
    }
    S.cards.set(name, entry);
    // cards share the row: a new peak narrows the others, so each follows its card's width
    new ResizeObserver(() => entry.charts.forEach((c) => {
      if (c.width !== width(card)) c.setSize({width: width(card), height: c.height});
    })).observe(card);
    return entry;
  }

  function xOf(seq, t) {
    if (S.xmode === "time" && t !== null && t !== undefined) return t - (S.t0 ?? t);
    return seq;
  }

  function redrawTrajectories() {
    for (const [name, bySeq] of S.peaks) {
      const entry = ensureCard(name);
      const seqs = Array.from(bySeq.keys()).sort((a, b) => a - b);
      const xs = seqs.map((s) => xOf(s, bySeq.get(s).t));
      entry.cps = seqs.filter((s) => bySeq.get(s).f && bySeq.get(s).f.change_point).map((s) => xOf(s, bySeq.get(s).t));
      QUANTITIES.forEach(([key], i) => {
        const prov = [], fin = [], lo = [], hi = [];
        for (const s of seqs) {
          const e = bySeq.get(s);
          prov.push(e.p ? e.p[key] : null);
          const v = e.f ? e.f[key] : null, err = e.f ? e.f[key + "_err"] : null;
          fin.push(v);
          const ok = v !== null && err !== null && Number.isFinite(err);
          lo.push(ok ? v - err : null);
          hi.push(ok ? v + err : null);
        }
        entry.charts[i].setData([xs, prov, fin, lo, hi]);
      });
    }
  }

  function addPeakRows(cols) {
    for (const r of rowsOf(cols)) {
      if (!S.peaks.has(r.peak)) S.peaks.set(r.peak, new Map());
      const bySeq = S.peaks.get(r.peak);
      const e = bySeq.get(r.seq_num) || {t: r.time, p: null, f: null};
      if (r.final) e.f = r; else e.p = r;
      if (S.t0 === null && r.time !== null) S.t0 = r.time;
      bySeq.set(r.seq_num, e);
    }
    S.dirty = true;
  }

  // --------------------------------------------------------------------------- profile
  function drawProfile(p) {
    S.profile = p;
    $("profile-seq").textContent = `frame ${p.seq_num}` + (p.unit ? ` · ${p.unit}` : "");
    const pos = (v) => (v !== null && v > 0) ? v : null;
    const I = p.intensity.map(pos);
    const lo = p.intensity.map((v, i) => (v !== null && p.sigma[i] !== null) ? pos(v - p.sigma[i]) : null);
    const hi = p.intensity.map((v, i) => (v !== null && p.sigma[i] !== null) ? pos(v + p.sigma[i]) : null);
    const data = [p.radial, I, lo, hi];
    if (!S.profileChart) {
      const el = $("profile-chart");
      S.profileChart = new uPlot({
        width: width(el), height: 300,
        scales: {x: {time: false}, y: {distr: 3}},
        legend: {show: false},
        axes: [{label: "q (1/nm)", labelSize: 18}, {label: "I (log)", size: 60, labelSize: 18}],
        series: [{label: "q"},
                 {label: "I", stroke: "#1d2b3a", width: 1, points: {show: false}},
                 {label: "I-σ", stroke: "transparent", width: 0, points: {show: false}},
                 {label: "I+σ", stroke: "transparent", width: 0, points: {show: false}}],
        bands: [{series: [3, 2], fill: "rgba(31,119,180,0.3)"}],
        plugins: [{hooks: {draw: [drawPeakMarkers]}}],
      }, data, el);
    } else {
      S.profileChart.setData(data);
    }
  }

  // fitted peak centres of the profile's frame (final if there, else provisional), ±FWHM/2
  function drawPeakMarkers(u) {
    const p = S.profile;
    if (!p) return;
    const ctx = u.ctx, {top, height, left, width: w} = u.bbox, dpr = devicePixelRatio;
    let k = 0;
    for (const [name, bySeq] of S.peaks) {
      const color = (S.cards.get(name) || {}).color || COLORS[k % COLORS.length];
      k++;
      const e = bySeq.get(p.seq_num);
      const r = e && (e.f || e.p);
      if (!r || r.center === null) continue;
      const x = u.valToPos(r.center, "x", true);
      if (x < left || x > left + w) continue;
      if (r.fwhm !== null) {
        const x0 = u.valToPos(r.center - r.fwhm / 2, "x", true), x1 = u.valToPos(r.center + r.fwhm / 2, "x", true);
        ctx.fillStyle = color + "22";
        ctx.fillRect(Math.max(x0, left), top, Math.min(x1, left + w) - Math.max(x0, left), height);
      }
      ctx.save();
      ctx.strokeStyle = color; ctx.lineWidth = 1.5 * dpr;
      if (!e.f) ctx.setLineDash([5 * dpr, 4 * dpr]);
      ctx.beginPath(); ctx.moveTo(x, top); ctx.lineTo(x, top + height); ctx.stroke();
      ctx.fillStyle = color; ctx.font = `${11 * dpr}px sans-serif`;
      ctx.fillText(name, x + 3 * dpr, top + 12 * dpr);
      ctx.restore();
    }
  }

  // ----------------------------------------------------------------------------- frame
  function loadFrame() {
    const f = S.frame;
    if (f.loading || f.seq === null || f.seq === f.shown || !S.uid) return;
    if (Date.now() - f.last < 1000) { setTimeout(loadFrame, 1000 - (Date.now() - f.last)); return; }
    f.loading = true; f.last = Date.now();
    const seq = f.seq, uid = S.uid, next = new Image();      // swapped in once loaded: no blank frame
    next.onload = () => {
      f.loading = false;
      if (uid !== S.uid) return;
      next.id = "frame-img"; next.alt = $("frame-img").alt;
      $("frame-img").replaceWith(next);
      f.shown = seq; $("frame-seq").textContent = `frame ${seq}`;
      loadFrame();
    };
    next.onerror = () => { f.loading = false; setTimeout(loadFrame, 2000); };
    next.src = `api/v1/runs/${encodeURIComponent(uid)}/frame.png?seq=${seq}`;
  }

  // q-map of grazing-incidence runs: the panel shows once the run has one
  function loadQmap() {
    const f = S.qmap;
    if (f.loading || f.seq === null || f.seq === f.shown || !S.uid) return;
    if (Date.now() - f.last < 2000) { setTimeout(loadQmap, 2000 - (Date.now() - f.last)); return; }
    f.loading = true; f.last = Date.now();
    const seq = f.seq, uid = S.uid, next = new Image();
    next.onload = () => {
      f.loading = false;
      if (uid !== S.uid) return;
      next.id = "qmap-img"; next.alt = $("qmap-img").alt;
      $("qmap-img").replaceWith(next);
      $("qmap-panel").hidden = false;
      f.shown = seq; $("qmap-seq").textContent = `frame ${seq}`;
      loadQmap();
    };
    next.onerror = () => { f.loading = false; setTimeout(loadQmap, 3000); };
    next.src = `api/v1/runs/${encodeURIComponent(uid)}/qmap.png?seq=${seq}`;
  }

  // ---------------------------------------------------------------------------- health
  function drawHealth(msg) {
    const st = msg.status || {}, m = msg.metrics || {}, lat = m.latency || {};
    const now = msg.time;
    S.statusHist.push([now, st.frames_fitted ?? m.frames_fitted ?? 0]);
    while (S.statusHist.length > 2 && now - S.statusHist[0][0] > 10) S.statusHist.shift();
    const [t0, n0] = S.statusHist[0];
    const rate = now > t0 ? ((st.frames_fitted ?? m.frames_fitted ?? 0) - n0) / (now - t0) : 0;
    const queues = Object.entries(st.queues || m.queue_depth || {}).map(([k, v]) => `${k} ${v}`).join(", ");
    const failed = st.frames_failed ?? sum(m.frames_failed);       // since the service started
    const rows = [
      ["uptime", st.uptime_s !== undefined ? `${(st.uptime_s / 60).toFixed(1)} min` : "–"],
      ["devices", (st.devices || []).join(", ") + (st.worker_restarts ? ` (restarts ${st.worker_restarts})` : "")],
      ["fitted rate (10 s)", `${rate.toFixed(1)} frames/s`],
      ["frames received / fitted / final", `${st.frames_received ?? m.frames_received} / ${st.frames_fitted ?? m.frames_fitted} / ${st.frames_final ?? m.frames_final}`],
      ["latency provisional p50 / p95", `${ms(lat.provisional && lat.provisional.p50_s)} / ${ms(lat.provisional && lat.provisional.p95_s)}`],
      ["latency final p50 / p95", `${ms(lat.final && lat.final.p50_s)} / ${ms(lat.final && lat.final.p95_s)}`],
      ["queues", queues || "–"],
      ["frames failed: this run / since service start", `${S.runFailed ?? "–"} / ${failed}`, S.runFailed > 0],
      ["frames dropped (back-pressure)", m.frames_dropped, m.frames_dropped > 0],
      ["lost upstream", sum(m.lost_upstream), sum(m.lost_upstream) > 0],
      ["rejected at ingest", sum(m.rejected), sum(m.rejected) > 0],
      ["fit re-seeds / change points", `${m.reseeds} / ${m.change_points}`],
      ["Tiled requests / failures", `${m.tiled_requests} / ${m.tiled_failures}`, m.tiled_failures > 0],
      ["runs active", st.runs_active ?? m.runs_active],
    ];
    // one row per worker (a process, or a Ray actor): where it runs and what it sustains
    for (const w of st.worker_pool || []) {
      const state = !w.alive ? "dead" : !w.ready ? "starting" : `${w.fps.toFixed(1)} frames/s, ${w.frames} frames, ${w.runs} run(s)`;
      rows.push([`${st.engine || "local"} worker ${w.index}: ${w.device} on ${w.node || "?"}`, state, !w.alive || !w.ready]);
    }
    const body = $("health").tBodies[0];
    body.innerHTML = "";
    for (const [k, v, warn] of rows) {
      const tr = body.insertRow();
      if (warn) tr.className = "warn";
      tr.insertCell().textContent = k;
      const td = tr.insertCell();
      td.className = "num";
      td.textContent = v ?? "–";
    }
  }

  // ------------------------------------------------------------------------ run state
  function resetRun(uid, start) {
    S.uid = uid; S.start = start || null;
    S.t0 = start && start.time ? start.time : null;
    S.peaks = new Map();
    for (const [, entry] of S.cards) entry.charts.forEach((c) => c.destroy());
    S.cards = new Map();
    $("trajectories").innerHTML = '<p class="muted" id="no-peaks">no fitted frames yet (none come when the run\'s fit has no peaks: fit.peaks [])</p>';
    S.profile = null;
    if (S.profileChart) { S.profileChart.destroy(); S.profileChart = null; }
    $("profile-seq").textContent = "";
    S.frame = {seq: null, shown: null, loading: false, last: 0};
    $("frame-img").removeAttribute("src");
    $("frame-seq").textContent = "(none yet)";
    S.qmap = {seq: null, shown: null, loading: false, last: 0};
    $("qmap-panel").hidden = true;
    S.runFailed = null;
    if (S.phases.chart) S.phases.chart.destroy();
    S.phases = {chart: null, rows: [], transitions: [], loading: false, last: 0};
    $("phase-panel").hidden = true;
    resetInversion();
  }

  // ---------------------------------------------------------------------------- phases
  // the run's final phase rows (label, crystallinity) polled while it has any: a strip of
  // label colours behind the crystallinity index, and the confirmed transitions
  function loadPhases() {
    const ph = S.phases;
    if (!S.uid || ph.loading || Date.now() - ph.last < 2000) return;
    ph.loading = true; ph.last = Date.now();
    const uid = S.uid;
    fetch(`api/v1/runs/${encodeURIComponent(uid)}/phases?final=true`)
      .then((r) => r.ok ? r.json() : null)
      .then((body) => {
        ph.loading = false;
        if (!body || uid !== S.uid || !body.columns || !body.columns.seq_num.length) return;
        ph.rows = rowsOf(body.columns).sort((a, b) => a.seq_num - b.seq_num);
        ph.transitions = body.transitions || [];
        drawPhases();
      })
      .catch(() => { ph.loading = false; });
  }

  function drawPhases() {
    const ph = S.phases, rows = ph.rows;
    $("phase-panel").hidden = false;
    const last = rows[rows.length - 1];
    $("phase-now").textContent = `frame ${last.seq_num}: ${last.phase} (p ${fmt(last.probability, 2)})`;
    const xs = rows.map((r) => xOf(r.seq_num, r.time));
    const ci = rows.map((r) => r.crystallinity);
    const lo = rows.map((r) => r.crystallinity !== null && r.crystallinity_sigma !== null ? r.crystallinity - r.crystallinity_sigma : null);
    const hi = rows.map((r) => r.crystallinity !== null && r.crystallinity_sigma !== null ? r.crystallinity + r.crystallinity_sigma : null);
    const labels = rows.map((r) => r.phase);
    const strip = {hooks: {drawClear: [(u) => {
      const ctx = u.ctx, {top, height} = u.bbox, x = u.data[0];
      for (let i = 0; i < x.length; i++) {
        const a = u.valToPos(i ? (x[i - 1] + x[i]) / 2 : x[i], "x", true);
        const b = u.valToPos(i < x.length - 1 ? (x[i] + x[i + 1]) / 2 : x[i], "x", true);
        ctx.fillStyle = phaseColor(labels[i]) + "40";
        ctx.fillRect(a, top, Math.max(b - a, 1), height);
      }
    }]}};
    if (ph.chart) ph.chart.destroy();
    const el = $("phase-chart");
    ph.chart = new uPlot({
      width: width(el), height: 170, scales: {x: {time: false}}, legend: {show: false},
      axes: [xAxis(),
             {label: "crystallinity", size: 60, labelSize: 18}],
      series: [{label: "x"}, {label: "crystallinity", stroke: "#222", width: 1.5, points: {show: false}},
               {label: "-σ", stroke: "transparent", points: {show: false}},
               {label: "+σ", stroke: "transparent", points: {show: false}}],
      bands: [{series: [3, 2], fill: "#2223"}],
      plugins: [strip],
    }, [xs, ci, lo, hi], el);
    $("phase-legend").innerHTML = [...new Set(labels)].map((l) =>
      `<span><i style="background:${phaseColor(l)}"></i>${l}</span>`).join("");
    const list = $("phase-transitions");
    list.innerHTML = "";
    for (const t of ph.transitions) {
      const li = document.createElement("li");
      li.textContent = `${t.from} → ${t.to} at frame ${t.seq_num} ± ${fmt(t.frame_sigma, 2)}` +
        (t.time_sigma !== null && t.time_sigma !== undefined ? ` (± ${fmt(t.time_sigma, 2)} s)` : "");
      list.appendChild(li);
    }
  }

  // ------------------------------------------------------------------------- inversion
  // per-frame structural parameters (runs with inversion.enabled), polled with since=: each
  // parameter against frame with its ±1σ band, and a strip of each frame's fit verdict behind
  // its reduced χ². The panel stays hidden while the run has no inversion rows.
  const VERDICT_COLORS = {good: "#2ca02c", poor: "#f0a500", bad: "#d62728"};
  const PARAM_UNITS = {radius: "nm", rg: "nm"};

  function newInversion() {
    return {rows: [], since: 0, names: [], strip: null, charts: new Map(), loading: false, last: 0};
  }

  function dropInversionCharts() {
    const inv = S.inversion;
    if (inv.strip) inv.strip.destroy();
    for (const [, c] of inv.charts) c.destroy();
    inv.strip = null; inv.charts = new Map();
    $("inversion-params").innerHTML = "";
  }

  function resetInversion() {
    dropInversionCharts();
    S.inversion = newInversion();
    $("inversion-panel").hidden = true;
  }

  function loadInversion() {
    const inv = S.inversion;
    if (!S.uid || inv.loading || Date.now() - inv.last < 2000) return;
    inv.loading = true; inv.last = Date.now();
    const uid = S.uid;
    fetch(`api/v1/runs/${encodeURIComponent(uid)}/inversion?since=${inv.since}`)
      .then((r) => r.ok ? r.json() : null)
      .then((body) => {
        inv.loading = false;
        if (!body || uid !== S.uid || S.inversion !== inv) return;
        inv.since = body.next_since;
        if (!body.columns.seq_num || !body.columns.seq_num.length) return;
        if (!inv.names.length) {      // the model's parameters: the columns with an _err and an _encoder
          inv.names = Object.keys(body.columns).filter((c) => (c + "_err") in body.columns && (c + "_encoder") in body.columns);
        }
        inv.rows.push(...rowsOf(body.columns));
        inv.rows.sort((a, b) => a.seq_num - b.seq_num);
        drawInversion();
      })
      .catch(() => { inv.loading = false; });
  }

  function inversionChart(el, label, height, series, {bands = [], plugins = [], y = {}} = {}) {
    return new uPlot({
      width: width(el), height, scales: {x: {time: false}, y}, legend: {show: false},
      axes: [xAxis(),
             {label, size: 60, labelSize: 18}],
      series: [{label: "x"}, ...series], bands, plugins,
    }, [[], ...series.map(() => [])], el);
  }

  function drawInversion() {
    const inv = S.inversion, rows = inv.rows;
    $("inversion-panel").hidden = false;
    const xs = rows.map((r) => xOf(r.seq_num, r.time));
    const counts = {good: 0, poor: 0, bad: 0};
    for (const r of rows) if (r.fit_quality in counts) counts[r.fit_quality]++;
    const last = rows[rows.length - 1];
    $("inversion-model").textContent = `model ${last.model} · ${rows.length} frames, last ${last.seq_num}`;
    $("inversion-counts").innerHTML = Object.entries(counts).map(([k, n]) =>
      `<span class="verdict"><i style="background:${VERDICT_COLORS[k]}"></i>${k} ${n}</span>`).join(" ");
    if (!inv.strip) {
      const strip = {hooks: {drawClear: [(u) => {
        const ctx = u.ctx, {top, height} = u.bbox, x = u.data[0];
        for (let i = 0; i < x.length; i++) {
          const a = u.valToPos(i ? (x[i - 1] + x[i]) / 2 : x[i], "x", true);
          const b = u.valToPos(i < x.length - 1 ? (x[i] + x[i + 1]) / 2 : x[i], "x", true);
          ctx.fillStyle = (VERDICT_COLORS[S.inversion.rows[i].fit_quality] || "#888888") + "80";
          ctx.fillRect(a, top, Math.max(b - a, 1), height);
        }
      }]}};
      inv.strip = inversionChart($("inversion-strip"), "χ²_red", 120,
        [{label: "chi2", stroke: "#222", width: 1.5, points: {show: true, size: 3}}], {plugins: [strip], y: {distr: 3}});
    }
    inv.strip.setData([xs, rows.map((r) => r.chi2 > 0 ? r.chi2 : null)]);
    for (const name of inv.names) {
      let chart = inv.charts.get(name);
      if (!chart) {
        const div = document.createElement("div");
        div.className = "chart";
        div.dataset.param = name;
        $("inversion-params").appendChild(div);
        const color = COLORS[inv.charts.size % COLORS.length];
        chart = inversionChart(div, PARAM_UNITS[name] ? `${name} (${PARAM_UNITS[name]})` : name, 150,
          [{label: name, stroke: color, width: 1.5, points: {show: false}},
           {label: "-σ", stroke: "transparent", points: {show: false}},
           {label: "+σ", stroke: "transparent", points: {show: false}}],
          {bands: [{series: [3, 2], fill: color + "33"}]});
        inv.charts.set(name, chart);
        new ResizeObserver(() => {
          if (chart.width !== width(div)) chart.setSize({width: width(div), height: chart.height});
        }).observe(div);
      }
      const v = rows.map((r) => r[name]), e = rows.map((r) => r[name + "_err"]);
      const ok = (i) => v[i] !== null && e[i] !== null && Number.isFinite(e[i]);
      chart.setData([xs, v, v.map((x, i) => ok(i) ? x - e[i] : null), v.map((x, i) => ok(i) ? x + e[i] : null)]);
    }
  }

  function drawRuns(runs) {
    const sel = $("run-select"), keep = S.wanted;
    sel.innerHTML = '<option value="latest">latest (follow)</option>';
    for (const r of runs.slice().sort((a, b) => b.created - a.created)) {
      const o = document.createElement("option");
      o.value = r.uid;
      o.textContent = `${r.uid.slice(0, 8)} · ${r.plan_name || "?"} · ${r.status} · ${r.frames_fitted} frames`;
      sel.appendChild(o);
    }
    sel.value = keep;
    const cur = runs.find((r) => r.uid === S.uid);
    if (cur) {
      const failed = sum(cur.frames_failed);
      S.runFailed = failed;
      $("run-info").textContent = `run ${cur.uid.slice(0, 8)}: ${cur.status}${cur.reason ? " (" + cur.reason + ")" : ""}, ` +
        `received ${cur.frames_received}, fitted ${cur.frames_fitted}, final ${cur.frames_final}` + (failed ? `, failed ${failed}` : "");
    }
  }

  // ----------------------------------------------------------------------- the stream
  function connect() {
    if (S.es) S.es.close();
    const es = new EventSource(`api/v1/events?run=${encodeURIComponent(S.wanted)}`);
    S.es = es;
    const on = (name, fn) => es.addEventListener(name, (ev) => { S.messages++; fn(JSON.parse(ev.data)); });
    es.onopen = () => { S.connected = true; $("conn").textContent = "live"; $("conn").className = "badge on"; };
    es.onerror = () => {          // also when the session ended (401): checkSession shows the form
      S.connected = false; $("conn").textContent = "reconnecting"; $("conn").className = "badge off";
      checkSession();
    };
    on("runs", (m) => drawRuns(m.runs));
    on("run", (m) => { if (m.reset || m.uid !== S.uid) resetRun(m.uid, m.start); });
    on("peaks", (m) => { if (m.uid === S.uid) addPeakRows(m.columns); });
    on("profile", (m) => { if (m.uid === S.uid) { drawProfile(m); } });
    on("frame", (m) => { if (m.uid === S.uid) { S.frame.seq = m.seq_num; loadFrame(); } });
    on("qmap", (m) => { if (m.uid === S.uid) { S.qmap.seq = m.seq_num; loadQmap(); } });
    on("status", (m) => { drawHealth(m); loadPhases(); loadInversion(); });
  }

  // ---------------------------------------------------------------------- the session
  // GET api/v1/session answers 401 when the service wants its API key and this browser has no
  // session cookie: then the key form shows, and its key is POSTed to api/v1/session. Once
  // authenticated, (re)connects the stream unless it is open or reconnecting by itself.
  function checkSession() {
    if (S.checking) return;
    S.checking = true;
    fetch("api/v1/session")
      .then((r) => {
        if (r.status === 401) { showLogin(S.loggedIn ? "session ended: the API key is needed again" : ""); return; }
        if (!r.ok) throw new Error(`HTTP ${r.status}`);
        return r.json().then((s) => {
          S.loggedIn = true;
          $("login-panel").hidden = true;
          $("logout").hidden = !s.key_required;
          if (!S.es || S.es.readyState === EventSource.CLOSED) connect();
        });
      })
      .catch(() => setTimeout(checkSession, 2000))          // service not (yet) reachable
      .finally(() => { S.checking = false; });
  }

  function showLogin(message) {
    if (S.es) { S.es.close(); S.es = null; }
    S.loggedIn = false; S.connected = false;
    $("conn").textContent = "API key needed"; $("conn").className = "badge off";
    $("logout").hidden = true;
    $("login-error").textContent = message;
    $("login-panel").hidden = false;
    $("login-key").focus();
  }

  $("login-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    fetch("api/v1/session", {method: "POST", headers: {"Content-Type": "application/json"},
                             body: JSON.stringify({api_key: $("login-key").value})})
      .then((r) => {
        if (!r.ok) { showLogin(r.status === 401 ? "wrong API key" : `log-in failed (HTTP ${r.status})`); return; }
        $("login-key").value = "";
        checkSession();
      })
      .catch(() => showLogin("the service does not answer"));
  });
  $("logout").addEventListener("click", () => {
    fetch("api/v1/session", {method: "DELETE"}).finally(() => showLogin(""));
  });


  $("run-select").addEventListener("change", (ev) => {
    S.wanted = ev.target.value;
    S.uid = null;
    connect();
  });
  $("x-mode").addEventListener("change", (ev) => {
    S.xmode = ev.target.value;
    for (const [, entry] of S.cards) entry.charts.forEach((c) => c.destroy());   // new axis labels
    S.cards = new Map();
    $("trajectories").innerHTML = "";
    S.dirty = true;
    dropInversionCharts();
    if (S.inversion.rows.length) drawInversion();
  });
  window.addEventListener("resize", () => {
    for (const [, entry] of S.cards) entry.charts.forEach((c) => c.setSize({width: width(c.root.parentNode), height: c.height}));
    if (S.profileChart) S.profileChart.setSize({width: width($("profile-chart")), height: 300});
  });
  setInterval(() => {
    if (!S.dirty) return;
    S.dirty = false;
    redrawTrajectories();
    if (S.profileChart) S.profileChart.redraw(false, false);
  }, 300);

  // for tests and the console: what the charts hold
  window.scatterflow = {
    state: S,
    counts() {
      let provisional = 0, final = 0, changePoints = 0;
      for (const [, entry] of S.cards) {
        const d = entry.charts[0].data;
        provisional += d[1].filter((v) => v !== null && v !== undefined).length;
        final += d[2].filter((v) => v !== null && v !== undefined).length;
        changePoints += entry.cps.length;
      }
      return {uid: S.uid, peaks: S.cards.size, provisional, final, changePoints,
              profileSeq: S.profile ? S.profile.seq_num : null,
              profileBins: S.profileChart ? S.profileChart.data[0].length : 0,
              frameShown: S.frame.shown, qmapShown: S.qmap.shown, connected: S.connected, messages: S.messages,
              phaseRows: S.phases.rows.length, transitions: S.phases.transitions.length, runFailed: S.runFailed,
              inversionRows: S.inversion.rows.length, inversionParams: S.inversion.names.length,
              loggedIn: S.loggedIn};
    },
  };
  checkSession();
})();
