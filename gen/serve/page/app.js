// The page speaks gen's jobs API: POST a job, follow its server-sent events, show each image as it is made.
"use strict";
const $ = (id) => document.getElementById(id);
const FINAL = ["done", "failed", "cancelled", "interrupted"];
let current = null; // { id, source } of the job being followed

async function api(path, options = {}) {
  const response = await fetch(path, { headers: { "Content-Type": "application/json" }, ...options });
  const body = await response.json();
  if (!response.ok) throw new Error(body.detail || body.error || response.statusText);
  return body;
}

function status(text, error = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", error);
}

function option(select, value, label) {
  const o = document.createElement("option");
  o.value = value;
  o.textContent = label;
  select.append(o);
}

async function init() {
  const info = await api("/gen/v1/info");
  for (const m of info.models) option($("model"), m.title, m.title);
  const samplers = () => {
    // the chosen model's samplers only (SD3/Flux and the others run different sets); the choice kept if it fits
    const model = info.models.find((m) => m.title === $("model").value) || info.models[0];
    const chosen = $("sampler").value;
    $("sampler").replaceChildren();
    option($("sampler"), "", "model default");
    for (const s of info.samplers) if (model.samplers.includes(s.name)) option($("sampler"), s.name, s.label);
    if (model.samplers.includes(chosen)) $("sampler").value = chosen;
  };
  samplers();
  $("model").addEventListener("change", samplers);
  const size = info.models[0].default_size;
  $("width").value = $("height").value = size;
  $("steps").max = info.limits.max_steps;
  $("steps").value = info.defaults.steps;  // the server's default, within its --max-steps
  $("guidance").value = info.defaults.guidance;
  $("strength").value = info.defaults.strength;
  $("blur").value = info.defaults.mask_blur;
  for (const u of info.upscalers) option($("hires-upscaler"), u, u);
  $("hires-upscaler").value = info.defaults.hires_upscaler;
  $("hires-steps").value = info.defaults.hires_steps;
  $("hires-strength").value = info.defaults.hires_strength;
  $("batch").max = info.limits.max_images;
  for (const c of info.controlnets) option($("control-model"), c, c);
  for (const m of info.control_modules) option($("control-module"), m, m);
}

function number(id) {
  const value = $(id).value.trim();
  return value === "" ? null : Number(value);
}

// A chosen file as a data: URL (what the jobs API takes for init_image and mask), or null.
function dataUrl(id) {
  const file = $(id).files[0];
  if (!file) return Promise.resolve(null);
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error(`cannot read ${file.name}`));
    reader.readAsDataURL(file);
  });
}

async function request() {
  const init = await dataUrl("init");
  const mask = init ? await dataUrl("mask") : null;
  const images = init ? { init_image: init, mask, strength: number("strength"), mask_blur: number("blur") } : {};
  const hires = $("hires").checked ? {
    hires_scale: number("hires-scale"),
    hires_upscaler: $("hires-upscaler").value,
    hires_steps: number("hires-steps"),
    hires_strength: number("hires-strength"),
  } : {};
  // One ControlNet unit: its picture (the control image, or what the preprocessor makes one from) and net
  const picture = $("control-model").value ? await dataUrl("control") : null;
  const control = picture ? { control: [{
    model: $("control-model").value,
    image: picture,
    module: $("control-module").value,
    weight: number("control-weight") ?? 1,
  }] } : {};
  const body = {
    prompt: $("prompt").value,
    negative_prompt: $("negative").value,
    sampler: $("sampler").value || null,
    steps: number("steps"),
    guidance: number("guidance"),
    seed: number("seed"),
    width: number("width"),
    height: number("height"),
    n: number("batch") || 1,
    model: $("model").value || null,
    ...images,
    ...hires,
    ...control,
  };
  // A field left empty is left out: the server's default applies (a null would be refused where none is allowed)
  return Object.fromEntries(Object.entries(body).filter(([, value]) => value !== null));
}

function addImage(image) {
  const figure = document.createElement("figure");
  const img = document.createElement("img");
  img.src = image.url;
  img.alt = image.parameters.split("\n")[0];
  const caption = document.createElement("figcaption");
  const parameters = document.createElement("pre");
  parameters.className = "parameters";
  parameters.textContent = image.parameters;
  const link = document.createElement("a");
  link.href = image.url;
  link.download = `gen-${image.seed}.png`;
  link.textContent = "Download";
  caption.append(parameters, link);
  figure.append(img, caption);
  $("gallery").prepend(figure);
}

function busy(on) {
  $("generate").disabled = on;
  $("cancel").disabled = !on;
}

function follow(job) {
  const source = new EventSource(`/gen/v1/jobs/${job.id}/events`);
  current = { id: job.id, source };
  source.addEventListener("state", (e) => {
    const s = JSON.parse(e.data);
    $("progress").value = s.progress.steps ? s.progress.step / s.progress.steps : 0;
    status(s.status === "queued" ? `queued, ${s.position} ahead` : `step ${s.progress.step}/${s.progress.steps}`);
  });
  source.addEventListener("image", (e) => addImage(JSON.parse(e.data)));
  for (const name of FINAL) {
    source.addEventListener(name, (e) => {
      const j = JSON.parse(e.data);
      source.close();
      current = null;
      busy(false);
      $("progress").value = name === "done" ? 1 : 0;
      status(j.error ? `${name}: ${j.error}` : `${name}: ${j.images.length} image(s), seed ${j.seed}`, name === "failed");
    });
  }
  source.onerror = () => {
    if (current && current.source === source && source.readyState === EventSource.CLOSED) {
      busy(false);
      status("lost the connection to the server", true);
    }
  };
}

$("form").addEventListener("submit", async (event) => {
  event.preventDefault();
  busy(true);
  status("submitting");
  try {
    follow(await api("/gen/v1/jobs", { method: "POST", body: JSON.stringify(await request()) }));
  } catch (e) {
    busy(false);
    status(e.message, true);
  }
});

$("cancel").addEventListener("click", async () => {
  // cancel, not DELETE: the images already in the gallery stay downloadable
  if (current) await api(`/gen/v1/jobs/${current.id}/cancel`, { method: "POST" }).catch((e) => status(e.message, true));
});

// An init image brings its own size: empty width/height fields let the server use it (type one to resize).
$("init").addEventListener("change", () => {
  if ($("init").files.length) $("width").value = $("height").value = "";
});

init().catch((e) => status(e.message, true));
