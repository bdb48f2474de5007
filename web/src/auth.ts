// Bearer-token handling: the page takes `?token=` from its URL once, keeps it in
// localStorage and drops it from the address bar so it does not end up in bookmarks or screenshots.

const STORAGE_KEY = "sdflow.token";

export function captureTokenFromUrl(): void {
  const url = new URL(window.location.href);
  const token = url.searchParams.get("token");
  if (token === null) return;
  setToken(token);
  url.searchParams.delete("token");
  window.history.replaceState(null, "", url.pathname + (url.search ? url.search : "") + url.hash);
}

export function getToken(): string | null {
  try {
    return localStorage.getItem(STORAGE_KEY);
  } catch {
    return null;
  }
}

export function setToken(token: string | null): void {
  try {
    if (token) localStorage.setItem(STORAGE_KEY, token);
    else localStorage.removeItem(STORAGE_KEY);
  } catch {
    /* storage disabled: the token lives only for this request */
  }
}
