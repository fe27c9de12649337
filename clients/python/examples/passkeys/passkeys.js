// The passkey example page: signs in with a password, adds a passkey, signs out, and signs in
// again with the passkey alone (usernameless: the authenticator picks the account).
//
// The server speaks WebAuthn's JSON forms: creation and request options as py_webauthn's
// options_to_json writes them, and RegistrationResponseJSON / AuthenticationResponseJSON back.
// Their binary fields are base64url; navigator.credentials wants ArrayBuffers. The few lines
// below convert both ways, as @simplewebauthn/browser does, in any browser with WebAuthn.

const $ = (id) => document.getElementById(id);

// The signed-in session (Authenticate's response as proto3 JSON), in memory only: it is gone
// when the page is. Readable from the console (and by the example's test) as passkeyExample.session.
let session = null;
window.passkeyExample = Object.freeze({ get session() { return session; } });

function fromBase64url(text) {
  const base64 = text.replace(/-/g, "+").replace(/_/g, "/");
  const binary = atob(base64 + "=".repeat((4 - (base64.length % 4)) % 4));
  return Uint8Array.from(binary, (character) => character.charCodeAt(0)).buffer;
}

function toBase64url(buffer) {
  let binary = "";
  for (const byte of new Uint8Array(buffer)) binary += String.fromCharCode(byte);
  return btoa(binary).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

const withIds = (descriptors) => (descriptors ?? []).map((descriptor) => ({ ...descriptor, id: fromBase64url(descriptor.id) }));

function creationOptions(json) {
  return {
    ...json,
    challenge: fromBase64url(json.challenge),
    user: { ...json.user, id: fromBase64url(json.user.id) },
    excludeCredentials: withIds(json.excludeCredentials),
  };
}

function requestOptions(json) {
  return { ...json, challenge: fromBase64url(json.challenge), allowCredentials: withIds(json.allowCredentials) };
}

function credentialJSON(credential, response) {
  return JSON.stringify({
    id: credential.id,
    rawId: toBase64url(credential.rawId),
    type: credential.type,
    authenticatorAttachment: credential.authenticatorAttachment ?? undefined,
    clientExtensionResults: credential.getClientExtensionResults(),
    response,
  });
}

function registrationJSON(credential) {
  const response = credential.response;
  return credentialJSON(credential, {
    clientDataJSON: toBase64url(response.clientDataJSON),
    attestationObject: toBase64url(response.attestationObject),
    transports: response.getTransports?.() ?? [],
  });
}

function authenticationJSON(credential) {
  const response = credential.response;
  return credentialJSON(credential, {
    clientDataJSON: toBase64url(response.clientDataJSON),
    authenticatorData: toBase64url(response.authenticatorData),
    signature: toBase64url(response.signature),
    userHandle: response.userHandle ? toBase64url(response.userHandle) : undefined,
  });
}

class Refusal extends Error {}

// One RPC through the gateway: its request and response as proto3 JSON (what grpcurl shows).
async function call(method, request) {
  const headers = { "Content-Type": "application/json" };
  if (session) headers.Authorization = `Bearer ${session.accessToken}`;
  const reply = await fetch(`/rpc/${method}`, { method: "POST", headers, body: JSON.stringify(request) });
  const body = await reply.json();
  if (!reply.ok) throw new Refusal(`${method}: ${body.code} ${body.reason} ${body.message}`.trim());
  return body;
}

async function signedIn(newSession) {
  session = newSession;
  // The gateway verifies the access token against the service's key set (GetPublicKeys).
  const me = await fetch("/api/me", { headers: { Authorization: `Bearer ${session.accessToken}` } });
  const claims = await me.json();
  if (!me.ok) throw new Refusal(`/api/me: ${claims.message}`);
  $("who").textContent = `${session.user.username} (${claims.subject})`;
  $("signed-in").hidden = false;
  $("signed-out").hidden = true;
}

async function signInWithPassword() {
  await signedIn(await call("Authenticate", { identifier: $("identifier").value, password: $("password").value }));
  $("password").value = "";
  return "signed in with a password";
}

async function addPasskey() {
  const started = await call("StartPasskeyRegistration", {
    userId: session.user.id,
    password: $("current-password").value,
  });
  $("current-password").value = "";
  const credential = await navigator.credentials.create({ publicKey: creationOptions(JSON.parse(started.optionsJson)) });
  await call("FinishPasskeyRegistration", {
    userId: session.user.id,
    ceremonyId: started.ceremonyId,
    credentialJson: registrationJSON(credential),
    displayName: $("passkey-name").value,
  });
  return "passkey added";
}

async function signInWithPasskey() {
  const started = await call("StartPasskeySignIn", {});
  const credential = await navigator.credentials.get({ publicKey: requestOptions(JSON.parse(started.optionsJson)) });
  const credentialJson = authenticationJSON(credential);
  await signedIn(await call("FinishPasskeySignIn", { ceremonyId: started.ceremonyId, credentialJson }));
  return "signed in with a passkey";
}

async function signOut() {
  const ending = session;
  session = null;
  $("signed-in").hidden = true;
  $("signed-out").hidden = false;
  await call("RevokeSession", { refreshToken: ending.refreshToken });
  return "signed out";
}

// Runs an action and shows how it ended in #status (data-state busy, then ok or failed).
function action(run) {
  return async (event) => {
    event.preventDefault();
    const status = $("status");
    status.dataset.state = "busy";
    status.textContent = "…";
    try {
      status.textContent = await run();
      status.dataset.state = "ok";
    } catch (error) {
      // A Refusal is the service's answer; anything else the browser's (a DOMException from WebAuthn).
      status.textContent = error instanceof Refusal ? error.message : `${error.name}: ${error.message}`;
      status.dataset.state = "failed";
    }
  };
}

$("password-form").addEventListener("submit", action(signInWithPassword));
$("passkey-form").addEventListener("submit", action(addPasskey));
$("passkey-sign-in").addEventListener("click", action(signInWithPasskey));
$("sign-out").addEventListener("click", action(signOut));
