/**
 * The volume viewer and painter: niivue on one canvas, holding the image, the drawing (the
 * annotator's labels, in niivue's RAS voxel order) and the result overlays (segmentation,
 * cluster map, uncertainty). Everything leaving or entering the drawing goes through `RasGrid`,
 * so labels are exchanged with the server on the image's own voxel grid.
 */

import { Niivue, NVImage, SLICE_TYPE } from "./vendor/niivue/niivue.js";
import { RasGrid } from "./grid.js";

export const UNANNOTATED = 255;

export const VIEWS = {
  axial: SLICE_TYPE.AXIAL,
  coronal: SLICE_TYPE.CORONAL,
  sagittal: SLICE_TYPE.SAGITTAL,
  multiplanar: SLICE_TYPE.MULTIPLANAR,
};

/** CT windows as [level, width] in HU. */
export const CT_WINDOWS = {
  "soft tissue": [40, 400],
  bone: [400, 1800],
  lung: [-600, 1500],
  brain: [40, 80],
  abdomen: [60, 360],
};

const CLUSTER_COLOURS = [
  "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
  "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94",
];

function rgb(hex) {
  const value = parseInt(hex.slice(1), 16);
  return [(value >> 16) & 255, (value >> 8) & 255, value & 255];
}

/** A niivue label colour table: value → colour, 0 transparent. */
function labelTable(colours) {
  const table = { R: [0], G: [0], B: [0], A: [0], I: [0], labels: ["background"] };
  for (const [value, { color, name }] of colours) {
    const [r, g, b] = rgb(color);
    table.R.push(r);
    table.G.push(g);
    table.B.push(b);
    table.A.push(255);
    table.I.push(value);
    table.labels.push(name);
  }
  return table;
}

export class Viewer {
  /**
   * @param {HTMLCanvasElement} canvas
   * @param {{onDrawingChanged?: () => void, onLocationChange?: () => void}} hooks
   */
  constructor(canvas, hooks = {}) {
    this.canvas = canvas;
    this.hooks = hooks;
    this.nv = new Niivue({
      backColor: [0.08, 0.08, 0.1, 1],
      crosshairColor: [1, 0.85, 0, 0.6],
      show3Dcrosshair: false,
      dragAndDropEnabled: false,
      isColorbar: false,
      penSize: 1,
      isFilledPen: false,
      drawingEnabled: false,
      logLevel: "warn",
    });
    this.grid = null;
    this.overlays = {};
    this.window = null;
    this.nv.onDrawingChanged = () => this.hooks.onDrawingChanged?.();
    this.nv.onLocationChange = () => this.hooks.onLocationChange?.();
  }

  async attach() {
    await this.nv.attachToCanvas(this.canvas);
  }

  get image() {
    return this.nv.volumes[0] || null;
  }

  /** Show the image in `bytes` (NIfTI, gzipped or not) with an empty drawing. */
  async open(bytes, name) {
    for (const volume of [...this.nv.volumes]) this.nv.removeVolume(volume);
    this.overlays = {};
    const volume = await NVImage.loadFromUrl({ url: bytes, name, colormap: "gray" });
    this.nv.addVolume(volume);
    this.robust = [volume.cal_min, volume.cal_max];
    this.grid = RasGrid.of(volume);
    this.nv.createEmptyDrawing();
    this.nv.drawScene();
  }

  close() {
    for (const volume of [...this.nv.volumes]) this.nv.removeVolume(volume);
    this.overlays = {};
    this.grid = null;
    this.nv.closeDrawing();
  }

  setView(name) {
    this.nv.setSliceType(VIEWS[name]);
  }

  /** Window the image: `[level, width]`, or null for the robust range niivue found on load. */
  setWindow(levelWidth) {
    const image = this.image;
    if (!image) return;
    const [low, high] = levelWidth
      ? [levelWidth[0] - levelWidth[1] / 2, levelWidth[0] + levelWidth[1] / 2]
      : this.robust;
    image.cal_min = low;
    image.cal_max = high;
    this.nv.updateGLVolume();
  }

  /** Drawing colours from the dataset's schema `{"1": {name, color}, …}`. */
  setClasses(schema) {
    const entries = Object.entries(schema).map(([value, cls]) => [Number(value), cls]);
    this.nv.setDrawColormap(labelTable(entries));
    this.schemaEntries = entries;
  }

  /** `tool`: "navigate", "pen", "filled" or "eraser"; `value`: the class painted. */
  setTool(tool, value, size) {
    if (tool === "navigate") {
      this.nv.setDrawingEnabled(false);
      return;
    }
    this.nv.setDrawingEnabled(true);
    this.nv.opts.penSize = size;
    if (tool === "eraser") this.nv.setPenValue(0, false);
    else this.nv.setPenValue(value, tool === "filled");
  }

  undo() {
    this.nv.drawUndo();
  }

  setDrawOpacity(opacity) {
    this.nv.setDrawOpacity(opacity);
  }

  /** Native voxel [i, j, k] under the crosshair. */
  crosshairVoxel() {
    const frac = this.nv.scene.crosshairPos;
    const rv = [0, 1, 2].map((p) =>
      Math.min(this.grid.dimsRAS[p] - 1, Math.max(0, Math.round(frac[p] * this.grid.dimsRAS[p] - 0.5))),
    );
    return this.grid.rasToNative(rv);
  }

  /** Move the crosshair to native slice `index` along native `axis` (keeping the rest). */
  showSlice(axis, index) {
    const here = this.grid.nativeToRas(this.crosshairVoxel());
    const voxel = this.crosshairVoxel();
    voxel[axis] = index;
    const there = this.grid.nativeToRas(voxel);
    this.nv.moveCrosshairInVox(there[0] - here[0], there[1] - here[1], there[2] - here[2]);
  }

  /** The native axis the current 2D view slices through (axial view: the one shown as S). */
  viewAxis() {
    const rasAxis = { [SLICE_TYPE.SAGITTAL]: 0, [SLICE_TYPE.CORONAL]: 1 }[this.nv.opts.sliceType] ?? 2;
    return this.grid.rasAxisOf.indexOf(rasAxis);
  }

  /** Native slices holding painted voxels, per native axis. */
  paintedSlices() {
    return this.nv.drawBitmap ? this.grid.occupiedSlices(this.nv.drawBitmap) : [new Set(), new Set(), new Set()];
  }

  /**
   * The drawing as a NIfTI label volume on the image's grid (gzipped bytes): slices along
   * `axis` outside `annotated` are 255 (unannotated); inside them unpainted voxels are 0.
   */
  async labelVolume(axis, annotated) {
    const ras = Uint8Array.from(this.nv.drawBitmap);
    this.grid.fillOtherSlices(ras, axis, annotated, UNANNOTATED);
    return this.image.saveToUint8Array("labels.nii.gz", ras);
  }

  /** Replace the drawing with a stored label volume (NIfTI bytes): 255 shows as unpainted. */
  async loadLabels(bytes) {
    const label = await NVImage.loadFromUrl({ url: bytes, name: "labels.nii.gz" });
    const ras = this.grid.toRas(label.img);
    for (let r = 0; r < ras.length; r++) if (ras[r] === UNANNOTATED) ras[r] = 0;
    this.replaceDrawing(ras);
  }

  replaceDrawing(ras) {
    this.nv.drawBitmap = ras;
    this.nv.drawAddUndoBitmap();
    this.nv.refreshDrawing(true);
    this.hooks.onDrawingChanged?.();
  }

  clearDrawing() {
    this.nv.createEmptyDrawing();
    this.hooks.onDrawingChanged?.();
  }

  /** Copy the segmentation's native slice `index` along `axis` into the drawing, to correct it. */
  copySegmentationSlice(axis, index) {
    const seg = this.overlays.segmentation;
    if (!seg) return;
    const ras = Uint8Array.from(this.nv.drawBitmap);
    const [nx, ny] = this.grid.dims;
    const coordinate = [
      (n) => n % nx,
      (n) => Math.floor(n / nx) % ny,
      (n) => Math.floor(n / (nx * ny)),
    ][axis];
    this.grid.forEach((r, n) => {
      if (coordinate(n) === index) ras[r] = seg.img[n];
    });
    this.replaceDrawing(ras);
  }

  /**
   * Show a result volume as an overlay. `kind`: "segmentation" (the schema's colours),
   * "clusters" (one colour per cluster), "uncertainty" (0 = certain … 1 = uniform, warm colours).
   */
  async setOverlay(kind, bytes, opacity) {
    this.removeOverlay(kind);
    let volume;
    if (kind === "uncertainty") {
      volume = await NVImage.loadFromUrl({
        url: bytes, name: `${kind}.nii.gz`, colormap: "warm", cal_min: 0.2, cal_max: 1, opacity,
      });
    } else {
      volume = await NVImage.loadFromUrl({ url: bytes, name: `${kind}.nii.gz`, opacity });
      if (kind === "segmentation") {
        volume.setColormapLabel(labelTable(this.schemaEntries || []));
      } else {
        const k = Math.max(1, Math.round(volume.global_max) + 1);
        const entries = Array.from({ length: k }, (_, i) => [
          i + 1, { name: `cluster ${i}`, color: CLUSTER_COLOURS[i % CLUSTER_COLOURS.length] },
        ]);
        // cluster 0 is a cluster too: shift so that it is not taken for background
        volume.img = Uint8Array.from(volume.img, (v) => v + 1);
        volume.global_max += 1;
        volume.setColormapLabel(labelTable(entries));
      }
    }
    this.overlays[kind] = volume;
    this.nv.addVolume(volume);
    this.nv.setOpacity(this.nv.getVolumeIndexByID(volume.id), opacity);
  }

  removeOverlay(kind) {
    const volume = this.overlays[kind];
    if (volume) this.nv.removeVolume(volume);
    delete this.overlays[kind];
  }

  setOverlayOpacity(kind, opacity) {
    const volume = this.overlays[kind];
    if (volume) this.nv.setOpacity(this.nv.getVolumeIndexByID(volume.id), opacity);
  }
}
