/**
 * The page's client of the segassist REST API (`/api/v1`).
 *
 * Every request sends `Authorization: Bearer <token>` when the user typed a token (kept in
 * sessionStorage: gone when the tab closes). A 401 or 403 asks for a token through the handler
 * the page registers (`onAuthRequired`) and retries; any other error becomes an `ApiError`
 * whose message is the server's own `detail` ("dataset 'ab…' not found", "label shape …").
 */

export const API_ROOT = "/api/v1";
const TOKEN_KEY = "segassist.token";
const MAX_TOKEN_PROMPTS = 3;

/** An HTTP error answered by the server, with its readable message. */
export class ApiError extends Error {
  constructor(status, detail, method, path) {
    super(detail);
    this.name = "ApiError";
    this.status = status;
    this.method = method;
    this.path = path;
  }
}

export function getToken() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

export function setToken(token) {
  if (token) sessionStorage.setItem(TOKEN_KEY, token);
  else sessionStorage.removeItem(TOKEN_KEY);
}

let authHandler = null;

/**
 * Register `handler(message) -> Promise<boolean>`: ask the user for a token after a 401/403
 * (`message` is the server's); resolve true when a new token was stored, false to give up.
 */
export function onAuthRequired(handler) {
  authHandler = handler;
}

function url(path) {
  return path.startsWith("/") ? path : `${API_ROOT}/${path}`;
}

function authHeaders(extra = {}) {
  const token = getToken();
  return token ? { ...extra, Authorization: `Bearer ${token}` } : { ...extra };
}

/** The server's `{"detail": …}` as one readable sentence (validation lists are joined). */
export function readableDetail(status, statusText, body) {
  let detail = body;
  try {
    detail = JSON.parse(body).detail ?? body;
  } catch {
    // not JSON: the text itself (a proxy's error page, say)
  }
  if (Array.isArray(detail)) {
    detail = detail.map((e) => `${(e.loc || []).join(".")}: ${e.msg}`).join("; ");
  } else if (typeof detail !== "string") {
    detail = JSON.stringify(detail);
  }
  detail = (detail || "").trim();
  return detail || `${status} ${statusText}`.trim();
}

async function withToken(method, path, send) {
  for (let prompt = 0; ; prompt++) {
    const { status, statusText, body, value } = await send();
    if (status >= 200 && status < 300) return value;
    const message = readableDetail(status, statusText, body);
    if ((status === 401 || status === 403) && authHandler && prompt < MAX_TOKEN_PROMPTS) {
      if (await authHandler(message, status)) continue;
    }
    throw new ApiError(status, message, method, path);
  }
}

/**
 * `method path` with an optional JSON body; resolves to the parsed JSON (or, with
 * `as: "arrayBuffer"`, the bytes). Throws `ApiError` with the server's message.
 */
export async function request(method, path, { json, as = "json" } = {}) {
  return withToken(method, path, async () => {
    const init = { method, headers: authHeaders() };
    if (json !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(json);
    }
    let response;
    try {
      response = await fetch(url(path), init);
    } catch (err) {
      throw new ApiError(0, `the server did not answer (${err.message})`, method, path);
    }
    if (!response.ok) {
      return { status: response.status, statusText: response.statusText, body: await response.text() };
    }
    const value = as === "arrayBuffer" ? await response.arrayBuffer() : await response.json();
    return { status: response.status, value };
  });
}

/**
 * POST a multipart form with upload progress: `onProgress(fraction)` as bytes leave.
 * (fetch cannot report upload progress; XMLHttpRequest can.)
 */
export function upload(path, form, onProgress) {
  const method = "POST";
  return withToken(method, path, () => new Promise((resolve) => {
    const xhr = new XMLHttpRequest();
    xhr.open(method, url(path));
    for (const [name, value] of Object.entries(authHeaders())) xhr.setRequestHeader(name, value);
    xhr.upload.onprogress = (event) => {
      if (event.lengthComputable && onProgress) onProgress(event.loaded / event.total);
    };
    xhr.onload = () => {
      let value = null;
      if (xhr.status >= 200 && xhr.status < 300) value = JSON.parse(xhr.responseText);
      resolve({ status: xhr.status, statusText: xhr.statusText, body: xhr.responseText, value });
    };
    xhr.onerror = () => resolve({ status: 0, statusText: "", body: "the server did not answer the upload" });
    xhr.send(form);
  }));
}
