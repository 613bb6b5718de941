/**
 * The browser annotator: choose or create a dataset, upload a volume, paint a few slices, run the
 * server's assist workflow, look at the segmentation, correct a slice, run it again, download.
 *
 * State lives in the URL (`?dataset=<id>&image=<id>`), so a page can be linked: opening it shows
 * that image with its latest labels and its latest assist result. The page holds no workflow
 * logic: it saves a label volume (`POST /images/{id}/labels`) and starts the assist job
 * (`POST /datasets/{id}/assist`), which decides the rest.
 */

import { ApiError, getToken, onAuthRequired, request, setToken, upload } from "./api.js";
import { CT_WINDOWS, Viewer } from "./viewer.js";

const POLL_MS = 1000;
const PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6", "#bcf60c"];
const AXIS_NAMES = ["i", "j", "k"];
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
/** Refinement outcomes that put a segmentation of their own on screen (worker/refine.py). */
const REPLACES = new Set(["refined", "restored"]);

const $ = (id) => document.getElementById(id);

const state = {
  datasets: [],
  dataset: null,
  images: [],
  image: null,
  /** Slices saved as annotated before (the loaded label, corrected slices): they stay annotated. */
  kept: { axis: null, slices: new Set() },
  tool: "pen",
  classValue: null,
  job: null,
  result: null,
  /** The background refinement job of the result on screen (null: none). */
  refinement: null,
  pollToken: 0,
  annotatedTimer: 0,
};

let viewer;

// -- messages -------------------------------------------------------------------------------------

function showError(err) {
  const text = err instanceof ApiError || err instanceof Error ? err.message : String(err);
  $("error-text").textContent = text;
  $("error").hidden = false;
  console.error(err);
}

function clearError() {
  $("error").hidden = true;
  $("error-text").textContent = "";
}

/** Run an async UI action, showing whatever it throws as a readable message. */
function guarded(action) {
  return async (...args) => {
    try {
      clearError();
      await action(...args);
    } catch (err) {
      showError(err);
    }
  };
}

function askToken(message) {
  const dialog = $("token-dialog");
  $("token-reason").textContent = message;
  $("token-input").value = "";
  dialog.showModal();
  return new Promise((resolve) => {
    dialog.addEventListener(
      "close",
      () => {
        const token = $("token-input").value.trim();
        if (dialog.returnValue === "ok" && token) {
          setToken(token);
          renderToken();
          resolve(true);
        } else {
          resolve(false);
        }
      },
      { once: true },
    );
  });
}

function renderToken() {
  $("token-state").textContent = getToken() ? "token set" : "no token";
  $("token-forget").hidden = !getToken();
}

// -- URL --------------------------------------------------------------------------------------

function writeUrl() {
  const params = new URLSearchParams();
  if (state.dataset) params.set("dataset", state.dataset.id);
  if (state.image) params.set("image", state.image.id);
  const query = params.toString();
  history.replaceState(null, "", query ? `?${query}` : location.pathname);
}

// -- datasets ---------------------------------------------------------------------------------

async function loadDatasets() {
  state.datasets = await request("GET", "datasets");
  const select = $("dataset-select");
  select.replaceChildren(new Option("— choose a dataset —", ""));
  for (const ds of state.datasets) {
    const count = `${ds.image_count} image${ds.image_count === 1 ? "" : "s"}`;
    select.add(new Option(`${ds.name} (${ds.modality}, ${count})`, ds.id));
  }
  select.value = state.dataset ? state.dataset.id : "";
}

async function selectDataset(id) {
  stopPolling();
  closeImage();
  state.dataset = id ? await request("GET", `datasets/${id}`) : null;
  $("dataset-select").value = id || "";
  const ready = Boolean(state.dataset);
  $("images-section").hidden = !ready;
  renderClasses();
  renderWindowPresets();
  writeUrl();
  if (ready) await loadImages();
}

function parseClasses(text) {
  const names = text.split(",").map((s) => s.trim()).filter(Boolean);
  if (!names.length) throw new Error("name at least one class, e.g. 'liver, spleen'");
  return Object.fromEntries(
    names.map((name, i) => [String(i + 1), { name, color: PALETTE[i % PALETTE.length] }]),
  );
}

async function createDataset(event) {
  event.preventDefault();
  const form = event.target;
  const body = {
    name: form.elements.name.value.trim(),
    modality: form.elements.modality.value,
    labels: parseClasses(form.elements.classes.value),
  };
  const ds = await request("POST", "datasets", { json: body });
  form.reset();
  $("dataset-new").open = false;
  await loadDatasets();
  await selectDataset(ds.id);
}

// -- images -----------------------------------------------------------------------------------

async function loadImages() {
  state.images = await request("GET", `datasets/${state.dataset.id}/images`);
  renderImages();
}

function renderImages() {
  const list = $("image-list");
  list.replaceChildren();
  for (const img of state.images) {
    const item = document.createElement("li");
    const button = document.createElement("button");
    button.className = "image-item";
    button.dataset.imageId = img.id;
    button.setAttribute("aria-current", String(state.image?.id === img.id));
    const name = document.createElement("span");
    name.className = "image-name";
    name.textContent = img.name;
    const meta = document.createElement("span");
    meta.className = "image-meta";
    meta.textContent = `${img.shape.join("×")} · ${img.label_status}`;
    const status = document.createElement("span");
    status.className = `badge ${img.label_status}`;
    status.textContent = img.label_status === "labelled" ? `v${img.label_versions}` : "—";
    button.append(name, meta, status);
    button.addEventListener("click", guarded(() => openImage(img.id)));
    item.append(button);
    list.append(item);
  }
  $("image-empty").hidden = state.images.length > 0;
}

async function uploadFile(file) {
  if (!state.dataset) throw new Error("choose or create a dataset first");
  const progress = $("upload-progress");
  const status = $("upload-status");
  const form = new FormData();
  form.append("file", file, file.name);
  progress.hidden = false;
  progress.value = 0;
  status.textContent = `uploading ${file.name}…`;
  try {
    const image = await upload(`datasets/${state.dataset.id}/images`, form, (f) => {
      progress.value = f;
      status.textContent = f < 1 ? `uploading ${file.name}: ${Math.round(f * 100)} %` : `storing ${file.name}…`;
    });
    status.textContent = `uploaded ${image.name} (${image.shape.join("×")})`;
    await loadImages();
    await loadDatasets();
    await openImage(image.id);
  } catch (err) {
    status.textContent = `upload of ${file.name} failed`;
    throw err;
  } finally {
    progress.hidden = true;
  }
}

function closeImage() {
  state.image = null;
  state.kept = { axis: null, slices: new Set() };
  state.result = null;
  viewer?.close();
  $("viewer-empty").hidden = false;
  $("work-panel").hidden = true;
  renderResult();
}

async function openImage(id) {
  stopPolling();
  const image = await request("GET", `images/${id}`);
  if (!state.dataset || image.dataset_id !== state.dataset.id) {
    await selectDataset(image.dataset_id);
  }
  closeImage();
  state.image = image;
  writeUrl();
  renderImages();
  $("viewer-status").textContent = `loading ${image.name}…`;
  const bytes = await request("GET", `images/${id}/file`, { as: "arrayBuffer" });
  await viewer.open(bytes, `${image.id}.nii.gz`);
  $("viewer-empty").hidden = true;
  $("work-panel").hidden = false;
  viewer.setClasses(state.dataset.labels);
  applyView();
  applyWindow();
  applyTool();
  await loadFinalLabel(image);
  renderAnnotated();
  renderLocation();
  $("viewer-status").textContent = "";
  await loadLatestResult();
}

/** The axis along which a stored label annotates a strict subset of slices (as the server reads it). */
function labelAxis(label, shape) {
  const sparse = Object.entries(label.annotated_slices || {})
    .map(([axis, slices]) => [Number(axis), slices.length])
    .filter(([axis, n]) => n > 0 && n < shape[axis]);
  sparse.sort((a, b) => a[1] - b[1] || b[0] - a[0]);
  return sparse.length ? sparse[0][0] : null;
}

async function loadFinalLabel(image) {
  if (!image.final_label_id) return;
  const labels = await request("GET", `images/${image.id}/labels`);
  const final = labels.find((l) => l.id === image.final_label_id);
  if (!final) return;
  const bytes = await request("GET", `labels/${final.id}/file`, { as: "arrayBuffer" });
  await viewer.loadLabels(bytes);
  const axis = labelAxis(final, image.shape);
  if (axis !== null) state.kept = { axis, slices: new Set(final.annotated_slices[String(axis)]) };
}

// -- viewing ----------------------------------------------------------------------------------

function applyView() {
  const view = document.querySelector("input[name=view]:checked").value;
  viewer.setView(view);
  renderLocation();
}

function renderWindowPresets() {
  const select = $("window-select");
  select.replaceChildren(new Option("auto (robust range)", ""));
  if (state.dataset?.modality.toUpperCase() === "CT") {
    for (const [name, [level, width]] of Object.entries(CT_WINDOWS)) {
      select.add(new Option(`${name} (L ${level} / W ${width})`, name));
    }
  }
  $("window-row").hidden = false;
}

function applyWindow() {
  const name = $("window-select").value;
  viewer.setWindow(name ? CT_WINDOWS[name] : null);
}

function renderLocation() {
  if (!viewer?.grid) {
    $("location").textContent = "";
    return;
  }
  const axis = viewer.viewAxis();
  const voxel = viewer.crosshairVoxel();
  $("location").textContent =
    `voxel (${voxel.join(", ")}) · slice ${voxel[axis]} of ${viewer.grid.dims[axis]} along axis ${axis} (${AXIS_NAMES[axis]})`;
}

// -- painting ---------------------------------------------------------------------------------

function renderClasses() {
  const box = $("class-buttons");
  box.replaceChildren();
  const entries = state.dataset ? Object.entries(state.dataset.labels) : [];
  if (!entries.some(([v]) => Number(v) === state.classValue)) {
    state.classValue = entries.length ? Number(entries[0][0]) : null;
  }
  for (const [value, cls] of entries) {
    const button = document.createElement("button");
    button.className = "class-button";
    button.dataset.classValue = value;
    button.setAttribute("aria-pressed", String(Number(value) === state.classValue));
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = cls.color;
    button.append(swatch, `${value} · ${cls.name}`);
    button.addEventListener("click", () => {
      state.classValue = Number(value);
      if (state.tool === "eraser" || state.tool === "navigate") state.tool = "pen";
      renderClasses();
      applyTool();
    });
    box.append(button);
  }
  $("no-classes").hidden = entries.length > 0;
}

function applyTool() {
  for (const button of document.querySelectorAll("[data-tool]")) {
    button.setAttribute("aria-pressed", String(button.dataset.tool === state.tool));
  }
  if (viewer?.grid) viewer.setTool(state.tool, state.classValue ?? 1, Number($("pen-size").value));
}

/**
 * The slices that count as annotated: along the axis kept from before if any, else the axis
 * along which the painted voxels occupy the fewest slices (the one painted on).
 */
function annotation() {
  const painted = viewer.paintedSlices();
  let axis = state.kept.axis;
  if (axis === null) {
    const candidates = [0, 1, 2].filter((a) => painted[a].size > 0);
    if (!candidates.length) return { axis: viewer.viewAxis(), slices: new Set() };
    candidates.sort((a, b) => painted[a].size - painted[b].size || (b === viewer.viewAxis()) - (a === viewer.viewAxis()));
    axis = candidates[0];
  }
  const slices = new Set([...painted[axis], ...(axis === state.kept.axis ? state.kept.slices : [])]);
  return { axis, slices };
}

function renderAnnotated() {
  const box = $("annotated");
  box.replaceChildren();
  if (!viewer?.grid) return;
  const { axis, slices } = annotation();
  const sorted = [...slices].sort((a, b) => a - b);
  $("annotated-summary").textContent = sorted.length
    ? `${sorted.length} slice${sorted.length > 1 ? "s" : ""} along axis ${axis} (${AXIS_NAMES[axis]}):`
    : "none yet: paint a few slices";
  for (const index of sorted) {
    const chip = document.createElement("button");
    chip.className = "chip";
    chip.dataset.slice = String(index);
    chip.textContent = String(index);
    chip.title = `show slice ${index}`;
    chip.addEventListener("click", () => viewer.showSlice(axis, index));
    box.append(chip);
  }
  $("submit").disabled = sorted.length === 0;
}

// -- the assist loop --------------------------------------------------------------------------

async function submit() {
  const { axis, slices } = annotation();
  if (!slices.size) throw new Error("paint at least one slice before submitting");
  const painted = viewer.paintedSlices()[axis];
  if (!painted.size) throw new Error("the annotated slices hold background only: paint a class");
  $("submit").disabled = true;
  try {
    const labels = await viewer.labelVolume(axis, slices);
    const form = new FormData();
    form.append("file", new Blob([labels], { type: "application/gzip" }), "labels.nii.gz");
    form.append("tag", "final");
    $("job-status").textContent = "saving labels…";
    $("job").hidden = false;
    const label = await upload(`images/${state.image.id}/labels`, form);
    state.kept = { axis, slices: new Set(label.annotated_slices[String(axis)] || slices) };
    state.image = await request("GET", `images/${state.image.id}`);
    await loadImages();
    const body = { image_ids: [state.image.id], probabilities: $("with-uncertainty").checked };
    const job = await request("POST", `datasets/${state.dataset.id}/assist`, { json: body });
    await followJob(job);
  } finally {
    renderAnnotated();
  }
}

function stopPolling() {
  state.pollToken += 1;
}

function formatSeconds(s) {
  if (s == null || !isFinite(s)) return "";
  return s >= 90 ? `${Math.round(s / 60)} min` : `${Math.round(s)} s`;
}

function renderJob(job) {
  $("job").hidden = false;
  const p = job.progress || {};
  $("job-status").textContent = job.status;
  $("job-phase").textContent = p.phase || "—";
  const bar = $("job-progress");
  if (p.total) {
    bar.max = p.total;
    bar.value = p.step || 0;
    $("job-step").textContent = `${p.step ?? 0} / ${p.total}`;
  } else {
    bar.removeAttribute("value");
    $("job-step").textContent = "";
  }
  $("job-eta").textContent = p.eta_seconds && job.status === "running" ? `about ${formatSeconds(p.eta_seconds)} left` : "";
  $("job-error").textContent = job.error ? `the job ${job.status}: ${job.error}` : "";
  $("job-error").hidden = !job.error;
}

/** Poll `job` until it ends, then show its result. */
async function followJob(job) {
  stopPolling();
  const token = state.pollToken;
  state.refinement = null;
  renderRefinement();
  state.job = job;
  renderJob(job);
  while (!TERMINAL.has(job.status)) {
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
    if (token !== state.pollToken) return;
    job = await request("GET", `jobs/${job.id}`);
    if (token !== state.pollToken) return;
    state.job = job;
    renderJob(job);
  }
  if (job.status === "succeeded") {
    await showResult(job);
    if (job.result?.refine_job_id) await followRefinement(job.result.refine_job_id, token);
  } else if (job.status === "failed") throw new Error(`the assist job failed: ${job.error || "no message"}`);
}

/**
 * Poll the background refinement of the assist result on screen (a network trained from scratch,
 * kept only if it scores better on a held-out labelled slice) and show its segmentation when it
 * replaces the assist's. Stops when the page starts following another job.
 */
async function followRefinement(jobId, token) {
  let job = await request("GET", `jobs/${jobId}`);
  state.refinement = job;
  renderRefinement();
  while (!TERMINAL.has(job.status)) {
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
    if (token !== state.pollToken) return;
    job = await request("GET", `jobs/${jobId}`);
    if (token !== state.pollToken) return;
    state.refinement = job;
    renderRefinement();
  }
  if (job.status === "succeeded" && REPLACES.has(job.result?.outcome)) await showResult(job);
}

/**
 * "held-out slice Dice: propagation 0.703 · blend 0.790 → blend replaced it": what the
 * refinement of the result on screen is doing or decided (candidates of models/refinement.py:
 * the propagation, its blend with a network from scratch, and after a refit the answer it
 * replaced, "previous").
 */
function refinementText(job) {
  if (!job) return "—";
  if (!TERMINAL.has(job.status)) {
    const p = job.progress || {};
    const step = p.total ? ` ${p.step ?? 0}/${p.total}` : "";
    return `training a network in the background (${job.status}${p.phase ? `, ${p.phase}${step}` : ""})…`;
  }
  if (job.status !== "succeeded") return `the refinement ${job.status}${job.error ? `: ${job.error}` : ""}`;
  const r = job.result;
  if (r.outcome === "superseded") return "skipped: a newer run replaced this one";
  const scores = Object.entries(r.validation)
    .filter(([, v]) => typeof v === "number")
    .map(([name, v]) => `${name} ${v.toFixed(3)}`)
    .join(" · ");
  const decision = {
    refined: `${r.method} replaced it`,
    restored: "the answer before the refit is back",
  }[r.outcome] || "propagation kept";
  return `held-out slice Dice: ${scores} → ${decision}`;
}

function renderRefinement() {
  $("result-refinement").textContent = refinementText(state.refinement);
  $("result-refinement-row").hidden = !state.refinement;
}

/** The newest assist job that segmented the open image: the dataset's latest, else the newest succeeded one. */
async function loadLatestResult() {
  const image = state.image;
  let latest = null;
  try {
    latest = await request("GET", `datasets/${state.dataset.id}/assist`);
  } catch (err) {
    if (!(err instanceof ApiError && err.status === 404)) throw err;
    return;
  }
  const covers = (job) => (job.params?.image_ids || []).includes(image.id);
  if (covers(latest) && !TERMINAL.has(latest.status)) {
    await followJob(latest);
    return;
  }
  let done = latest.status === "succeeded" && latest.result?.predictions?.[image.id] ? latest : null;
  if (!done) {
    const jobs = await request("GET", `jobs?dataset_id=${state.dataset.id}&status=succeeded`);
    done = jobs.find((j) => j.kind === "assist" && j.result?.predictions?.[image.id]) || null;
  }
  if (done) {
    renderJob(done);
    await showResult(done);
    if (done.result.refine_job_id) await followRefinement(done.result.refine_job_id, state.pollToken);
  }
}

async function showResult(job) {
  const result = job.result;
  const urls = result.predictions?.[state.image.id];
  if (!urls) return;
  viewer.removeOverlay("clusters");
  viewer.removeOverlay("uncertainty");
  const bytes = await request("GET", urls.labels, { as: "arrayBuffer" });
  await viewer.setOverlay("segmentation", bytes, Number($("seg-opacity").value));
  $("show-segmentation").checked = true;
  $("show-clusters").checked = false;
  $("show-uncertainty").checked = false;
  // the state names the result on screen only once its segmentation and rows are there
  state.result = { job, urls, segmenter: result.segmenter_id, axis: result.axis };
  renderResult();
}

/**
 * "probe-linear 0.612 · probe-mlp 0.598 · finetune skipped" from a job's validation record:
 * method auto's (candidate → {dice, seconds, held_out} or {skipped: reason}) or head auto's
 * (head → Dice). The reasons are in the element's tooltip.
 */
function validationText(validation) {
  return Object.entries(validation)
    .map(([name, entry]) => {
      if (entry !== null && typeof entry === "object" && "skipped" in entry) return `${name} skipped`;
      const dice = entry !== null && typeof entry === "object" ? entry.dice : entry;
      return `${name} ${dice == null ? "—" : dice.toFixed(3)}`;
    })
    .join(" · ");
}

/**
 * "propagated (0.9 s) · prior ×1 · 8 stray objects removed": what the image's own labelled slices
 * changed in its prediction (the job result's propagation, slice_prior and components entries).
 */
function ownLabelsText(result, imageId) {
  const parts = [];
  const propagation = result.propagation?.[imageId];
  if (propagation?.applied) parts.push(`propagated (${propagation.seconds.toFixed(1)} s)`);
  const prior = result.slice_prior?.[imageId];
  if (prior?.applied) parts.push(`prior ×${prior.scale}`);
  const components = result.components?.[imageId];
  const removed = Object.values(components?.removed_objects ?? {}).reduce((a, b) => a + b, 0);
  if (removed > 0) parts.push(`${removed} stray object${removed === 1 ? "" : "s"} removed`);
  return parts.length ? parts.join(" · ") : "—";
}

function renderResult() {
  const r = state.result;
  $("result").hidden = !r;
  if (!r) return;
  const result = r.job.result;
  $("result-method").textContent = result.method || "—";
  $("result-own-labels").textContent = ownLabelsText(result, state.image.id);
  const validation = r.job.kind === "refine" ? null : result.validation; // refinement: its own row
  $("result-validation").textContent = validation ? validationText(validation) : "";
  $("result-validation").title = validation ? JSON.stringify(validation, null, 1) : "";
  $("result-validation-row").hidden = !validation;
  const mean = result.uncertainty?.[state.image.id];
  $("result-uncertainty").textContent = mean != null ? mean.toFixed(3) : "—";
  $("show-uncertainty").disabled = !r.urls.uncertainty;
  $("uncertainty-note").hidden = Boolean(r.urls.uncertainty);
  const next = result.next_slice?.[state.image.id];
  $("next-slice").textContent = next != null ? `slice ${next} along axis ${r.axis}` : "every slice is annotated";
  $("go-next").hidden = next == null;
  $("download-dicom").hidden = !["dicom", "dicomweb"].includes(state.image.source);
}

async function toggleOverlay(kind, checkbox, opacity) {
  if (!checkbox.checked) {
    viewer.setOverlayOpacity(kind, 0);
    return;
  }
  if (!viewer.overlays[kind]) {
    const url = state.result.urls[kind];
    if (!url) throw new Error(`this result has no ${kind} map`);
    await viewer.setOverlay(kind, await request("GET", url, { as: "arrayBuffer" }), opacity);
  } else {
    viewer.setOverlayOpacity(kind, opacity);
  }
}

function correctSlice() {
  const axis = state.result.axis;
  const index = viewer.crosshairVoxel()[axis];
  if (state.kept.axis !== null && state.kept.axis !== axis) {
    throw new Error(`this image is annotated along axis ${state.kept.axis}, the result along ${axis}`);
  }
  viewer.copySegmentationSlice(axis, index);
  state.kept = { axis, slices: new Set([...state.kept.slices, index]) };
  renderAnnotated();
  $("correct-note").textContent = `slice ${index} copied into the drawing: fix it with the pen and eraser, then submit`;
}

async function download(url, filename) {
  const bytes = await request("GET", url, { as: "arrayBuffer" });
  const link = document.createElement("a");
  link.href = URL.createObjectURL(new Blob([bytes]));
  link.download = filename;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10000);
}

function stem(name) {
  return name.replace(/\.(nii\.gz|nii|zip)$/i, "");
}

// -- wiring -----------------------------------------------------------------------------------

function wire() {
  $("error-close").addEventListener("click", clearError);
  $("token-button").addEventListener("click", guarded(async () => {
    if (await askToken("Enter the server's API token (kept for this tab only).")) await loadDatasets();
  }));
  $("token-forget").addEventListener("click", () => {
    setToken("");
    renderToken();
  });
  $("dataset-select").addEventListener("change", guarded((e) => selectDataset(e.target.value)));
  $("dataset-form").addEventListener("submit", guarded(createDataset));
  $("file-input").addEventListener("change", guarded(async (e) => {
    const [file] = e.target.files;
    e.target.value = "";
    if (file) await uploadFile(file);
  }));
  const zone = $("drop-zone");
  zone.addEventListener("dragover", (e) => {
    e.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", guarded(async (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    const [file] = e.dataTransfer.files;
    if (file) await uploadFile(file);
  }));
  for (const input of document.querySelectorAll("input[name=view]")) input.addEventListener("change", applyView);
  $("window-select").addEventListener("change", applyWindow);
  for (const button of document.querySelectorAll("[data-tool]")) {
    button.addEventListener("click", () => {
      state.tool = button.dataset.tool;
      applyTool();
    });
  }
  $("pen-size").addEventListener("input", () => {
    $("pen-size-value").textContent = $("pen-size").value;
    applyTool();
  });
  $("undo").addEventListener("click", () => viewer.undo());
  $("submit").addEventListener("click", guarded(submit));
  $("seg-opacity").addEventListener("input", () => {
    if ($("show-segmentation").checked) viewer.setOverlayOpacity("segmentation", Number($("seg-opacity").value));
  });
  $("show-segmentation").addEventListener("change", (e) => {
    viewer.setOverlayOpacity("segmentation", e.target.checked ? Number($("seg-opacity").value) : 0);
  });
  $("show-clusters").addEventListener("change", guarded((e) => toggleOverlay("clusters", e.target, 0.5)));
  $("show-uncertainty").addEventListener("change", guarded((e) => toggleOverlay("uncertainty", e.target, 0.7)));
  $("go-next").addEventListener("click", () => {
    const next = state.result.job.result.next_slice[state.image.id];
    viewer.showSlice(state.result.axis, next);
  });
  $("correct-slice").addEventListener("click", guarded(correctSlice));
  $("download-nifti").addEventListener("click", guarded(() =>
    download(state.result.urls.labels, `${stem(state.image.name)}_segmentation.nii.gz`)));
  $("download-dicom").addEventListener("click", guarded(() =>
    download(`/api/v1/predictions/${state.result.segmenter}/${state.image.id}/segmentation.dcm`,
      `${stem(state.image.name)}_segmentation.dcm`)));
  window.addEventListener("unhandledrejection", (e) => showError(e.reason));
}

async function start() {
  const params = new URLSearchParams(location.search);
  await loadDatasets();
  if (params.get("image")) await openImage(params.get("image"));
  else if (params.get("dataset")) await selectDataset(params.get("dataset"));
}

async function main() {
  viewer = new Viewer($("gl"), {
    onDrawingChanged: () => {
      // after the stroke, not during it: a scan of the drawing costs ~0.1 s on a large CT
      clearTimeout(state.annotatedTimer);
      state.annotatedTimer = setTimeout(renderAnnotated, 150);
    },
    onLocationChange: () => renderLocation(),
  });
  await viewer.attach();
  window.segassist = { viewer, state }; // for the browser console and the page's tests
  onAuthRequired(askToken);
  wire();
  renderToken();
  applyTool();
  await guarded(start)(); // errors are shown on the page
  document.body.dataset.ready = "true";
}

main();
