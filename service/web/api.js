// Calls to this server's API. Every request carries the API key kept in sessionStorage; a 401
// asks the user for a key (through the callback the app registers) and retries the request.
// Failures become ApiError with the server's {"error": {"code", "message"}}.

const KEY_STORAGE = "simclr-embed.api-key";

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

let askForKey = null; // (reason: string) => Promise<string | null>
let pendingAsk = null; // one prompt at a time, shared by concurrent 401s

export function onKeyNeeded(callback) {
  askForKey = callback;
}

export function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE);
}

export function setApiKey(key) {
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
}

async function errorOf(response) {
  let code = `http_${response.status}`;
  let message = `${response.status} ${response.statusText}`.trim();
  try {
    const body = await response.json();
    if (body && body.error) {
      code = body.error.code || code;
      message = body.error.message || message;
    }
  } catch {
    // not JSON: keep the status line
  }
  return new ApiError(response.status, code, message);
}

function keyFromUser(reason) {
  pendingAsk ??= askForKey(reason).finally(() => { pendingAsk = null; });
  return pendingAsk;
}

/** fetch `path` with the key. `body`: FormData as is, anything else as JSON. Resolves to the Response (2xx). */
export async function request(path, { method = "GET", body, signal } = {}) {
  for (;;) {
    const headers = {};
    const sentKey = apiKey();
    if (sentKey) headers.Authorization = `Bearer ${sentKey}`;
    let payload = body;
    if (body !== undefined && !(body instanceof FormData)) {
      headers["Content-Type"] = "application/json";
      payload = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(path, { method, headers, body: payload, signal });
    } catch (err) {
      if (err.name === "AbortError") throw err;
      throw new ApiError(0, "network_error", `could not reach the server (${err.message})`);
    }
    if (response.ok) return response;
    const error = await errorOf(response);
    if (response.status !== 401 || !askForKey) throw error;
    // Another request may have stored a fresh key while this one was in flight.
    if (apiKey() && apiKey() !== sentKey) continue;
    const entered = await keyFromUser(error.message);
    if (!entered) throw error;
    setApiKey(entered);
  }
}

/** The JSON answer of `path` (null for 204). */
export async function json(path, options) {
  const response = await request(path, options);
  return response.status === 204 ? null : response.json();
}

const imageUrls = new Map(); // item id -> object URL of its original

/** An object URL for an item's original: fetched with the key, so thumbnails work when reads need one. */
export async function itemImageUrl(id) {
  if (!imageUrls.has(id)) {
    const url = request(`/items/${encodeURIComponent(id)}/image`)
      .then((r) => r.blob())
      .then((blob) => URL.createObjectURL(blob));
    url.catch(() => imageUrls.delete(id));
    imageUrls.set(id, url);
  }
  return imageUrls.get(id);
}

/** Drop cached originals (an item was replaced or deleted). */
export function forgetImages(ids) {
  for (const id of ids) {
    const url = imageUrls.get(id);
    imageUrls.delete(id);
    if (url) url.then(URL.revokeObjectURL, () => {});
  }
}
